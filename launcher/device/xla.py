"""trainer.accelerator=xla: TPUs through torch-xla, imported only when asked for.

What torch-xla recommends for data parallel training, and what this path does:
- processes: `torch_xla.launch` spawns one process per local device (PJRT runtime); ranks come from
  torch_xla.runtime (global_ordinal, world_size), and torch.distributed runs on the "xla" backend
  (init_method "xla://") so the loop's metric syncs and gathers work unchanged;
- gradients: no DDP; `xm.reduce_gradients` averages them across replicas (as xm.optimizer_step
  would), then clipping and the guard see the same global gradients on every rank, then the step;
- graphs: `xm.mark_step()` after each optimizer step cuts and runs the lazy graph;
- input: `MpDeviceLoader` moves batches to the device in the background;
- checkpoints: `xm.save` (tensors moved to CPU, written by the master only; every rank calls it).
Processes are started by launch/pjrt.py; this module is what runs inside them.

Not run on a real TPU here (no TPU in CI): the tests run this path against a stand-in module that
implements the same five calls on CPU; see docs/training.md (TPUs).
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
from typing import Any, Iterable

import torch
import torch.distributed as td

from .dist import Dist


def available() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


class XLA:
    """The handful of torch-xla calls the loop needs, in one place."""

    def __init__(self) -> None:
        # imported here: torch-xla is optional, and only accelerator=xla runs construct this
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.parallel_loader as pl
        import torch_xla.runtime as xr

        self.torch_xla, self.xm, self.pl, self.xr = torch_xla, xm, pl, xr

    def device(self) -> torch.device:
        return self.xm.xla_device()

    def ranks(self) -> tuple[int, int, int, int]:
        """(rank, local rank, world size, local world size) from the PJRT runtime."""
        xr = self.xr
        return xr.global_ordinal(), xr.local_ordinal(), xr.world_size(), xr.local_device_count()

    def init_process_group(self, timeout: Any) -> None:
        if not td.is_initialized():
            td.init_process_group("xla", init_method="xla://", timeout=timeout)

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Average the gradients over replicas (what xm.optimizer_step does before stepping), so
        clipping and the non-finite guard see the global gradients, the same on every rank."""
        self.xm.reduce_gradients(optimizer)

    def mark_step(self) -> None:
        self.xm.mark_step()

    def loader(self, batches: Iterable[Any], device: torch.device) -> Iterable[Any]:
        return self.pl.MpDeviceLoader(batches, device)

    def save(self, state: dict[str, Any], path: str) -> None:
        self.xm.save(state, path, master_only=True)


def init(timeout_s: float) -> tuple[Dist, XLA]:
    """This process's Dist on its XLA device (the process group on the xla backend when > 1 rank)."""
    x = XLA()
    importlib.import_module("torch_xla.distributed.xla_backend")  # registers the "xla" process-group backend
    rank, local, world, local_world = x.ranks()
    if world > 1:
        x.init_process_group(datetime.timedelta(seconds=timeout_s))
    return Dist(rank, local, world, local_world, x.device()), x
