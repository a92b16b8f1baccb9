"""Stand-in for torch_xla.core.xla_model (see torch_xla/__init__.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as td

from torch_xla import record


def xla_device() -> torch.device:
    record("xla_device")
    return torch.device("cpu")


def optimizer_step(optimizer: torch.optim.Optimizer, barrier: bool = False) -> None:
    """Like xm.optimizer_step: average the gradients over replicas, then step."""
    record("optimizer_step")
    reduce_gradients(optimizer)
    optimizer.step()


def reduce_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Like xm.reduce_gradients: average the gradients over replicas."""
    record("reduce_gradients")
    if td.is_initialized() and td.get_world_size() > 1:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    td.all_reduce(p.grad)
                    p.grad.div_(td.get_world_size())


def mark_step() -> None:
    record("mark_step")


def save(data: Any, path: str, master_only: bool = True, global_master: bool = False) -> None:
    """Like xm.save: a rendezvous of all ranks; the master writes CPU tensors."""
    record("save")
    if td.is_initialized():
        td.barrier()
    if not td.is_initialized() or td.get_rank() == 0 or not master_only:
        torch.save(data, path)
    if td.is_initialized():
        td.barrier()
