"""The one place that initialises torch.distributed, and the few collectives the loop uses.

Without the torch env vars (RANK, WORLD_SIZE, ...) everything degrades to a world of one: no
process group, collectives are identities. That is what lets the Python API run in a notebook
and the CLI run one rank in-process with no spawn at all.
"""

from __future__ import annotations

import datetime
import io
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as td


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_rank() -> Optional[tuple[int, int, int, int]]:
    """(rank, local_rank, world_size, local_world_size) from torchrun/elastic env vars, or None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return rank, local, world, local_world


def init(gpus: int = 0, timeout_s: float = 600.0) -> Dist:
    """Join the process group the env describes (gloo on CPU, nccl on CUDA), or a world of one."""
    env = env_rank()
    rank, local, world, local_world = env or (0, 0, 1, 1)
    if gpus > 0:
        device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not td.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        td.init_process_group(backend=backend, rank=rank, world_size=world,
                              timeout=datetime.timedelta(seconds=timeout_s),
                              device_id=device if device.type == "cuda" else None)
    return Dist(rank, local, world, local_world, device)


def current() -> Dist:
    """The Dist of an already-initialised process (or a world of one)."""
    if not td.is_initialized():
        return Dist()
    env = env_rank() or (td.get_rank(), td.get_rank(), td.get_world_size(), td.get_world_size())
    device = torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")
    return Dist(td.get_rank(), env[1], td.get_world_size(), env[3], device)


def cleanup() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; identity in a world of one."""
    if td.is_initialized() and td.get_world_size() > 1:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's obj on every rank."""
    if not (td.is_initialized() and td.get_world_size() > 1):
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank; obj holds tensors, containers, primitives."""
    if not (td.is_initialized() and td.get_world_size() > 1):
        return [obj]
    # torch.save bytes rather than pickled tensors: all_gather_object's own tensor pickling fails to
    # load back in torch 2.13 ("UntypedStorage has no attribute dtype"), and bytes keep the loading
    # side on weights_only=True.
    buf = io.BytesIO()
    torch.save(obj, buf)
    out: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]


def barrier() -> None:
    if td.is_initialized() and td.get_world_size() > 1:
        td.barrier()
