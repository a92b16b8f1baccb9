"""What each rank holds for the chosen strategy and mesh (issue 29): parameters, gradients and
optimizer state, in bytes per rank, logged with the model summary before the first step, so a user
sees whether it fits before training does.

Counted from the model as it will train (after FSDP / HSDP / tensor parallel have split it in place:
each parameter's local shard), not estimated from formulas. The optimizer's state is not there yet
(torch makes it at the first step): it is the local trainable bytes times the state tensors its
class keeps per parameter. Activations, the allocator's cache and communication buffers are not
counted: they depend on the batch (trainer.activation_checkpointing trades them for compute).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

# state tensors the optimizer keeps per parameter element, each of the parameter's dtype
_PER_PARAM = {"Adam": 2, "AdamW": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adadelta": 2, "Adagrad": 1,
              "Rprop": 2, "ASGD": 1, "LBFGS": 0}


def state_tensors(optimizer: torch.optim.Optimizer) -> Optional[int]:
    """State tensors per parameter for `optimizer` (its first group's settings); None if unknown."""
    name, group = type(optimizer).__name__, optimizer.param_groups[0] if optimizer.param_groups else {}
    if name == "SGD":
        return 1 if group.get("momentum", 0) else 0
    if name == "RMSprop":
        return 1 + bool(group.get("momentum", 0)) + bool(group.get("centered", False))
    n = _PER_PARAM.get(name)
    return None if n is None else n + (name in ("Adam", "AdamW") and bool(group.get("amsgrad", False)))


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # a DTensor's shard on this rank


def _mib(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n / 2**10:,.1f} KiB"


def holdings(model: nn.Module, optimizer: torch.optim.Optimizer, layout: str, shard: int,
             units: list[nn.Module]) -> dict[str, Any]:
    """Bytes this rank holds: parameters, gradients, optimizer state; `gathered`, the most one FSDP
    unit adds while its forward/backward runs (its parameters all-gathered over the `shard` ranks)."""
    params = list(model.parameters())
    local = sum(_local(p).numel() * p.element_size() for p in params)
    trainable = sum(_local(p).numel() * p.element_size() for p in params if p.requires_grad)
    whole = sum(p.numel() * p.element_size() for p in params)  # a DTensor's numel is the global one
    per = state_tensors(optimizer)
    gathered = max((sum(_local(p).numel() * p.element_size() for p in u.parameters()) * (shard - 1)
                    for u in units), default=0) if shard > 1 else 0
    return {"layout": layout, "params": local, "grads": trainable, "optimizer": None if per is None else per * trainable,
            "per_param": per, "optimizer_class": type(optimizer).__name__, "gathered": gathered, "whole": whole,
            "whole_trainable": sum(p.numel() * p.element_size() for p in params if p.requires_grad)}


def describe(h: dict[str, Any]) -> str:
    """One line for the log: what this rank holds, and what one unsharded rank would hold."""
    opt = "unknown" if h["optimizer"] is None else _mib(h["optimizer"])
    total = h["params"] + h["grads"] + (h["optimizer"] or 0)
    unsharded = h["whole"] + h["whole_trainable"] * (1 + (h["per_param"] or 0))
    gathered = f"; + {_mib(h['gathered'])} while the largest FSDP unit is gathered" if h["gathered"] else ""
    return (f"each rank holds ({h['layout']}): parameters {_mib(h['params'])}, gradients {_mib(h['grads'])}, "
            f"optimizer state {opt} ({h['optimizer_class']}: {h['per_param'] if h['per_param'] is not None else '?'} "
            f"per parameter) = {_mib(total)}{gathered}; unsharded, one rank would hold {_mib(unsharded)} "
            "(activations not counted)")


def for_run(model: nn.Module, optimizer: torch.optim.Optimizer, t: Any, world: int, strategy: str) -> str:
    """describe() for this fit: `strategy` as it runs (fsdp for hsdp and TP too), t the trainer config."""
    from ..config.mesh import sizes

    if strategy != "fsdp":
        layout = f"{strategy}, {world} rank{'s' if world > 1 else ''}: every rank a whole copy"
        return describe(holdings(model, optimizer, layout, 1, []))
    s = sizes(t, world)
    # (fully_shard has swapped each unit's class for a subclass named FSDP<Class>: the MRO holds the name)
    units = [m for m in model.modules() if m is not model and {c.__name__ for c in type(m).__mro__} & set(t.fsdp_wrap)]
    name = "hsdp" if s.replicate > 1 else "fsdp"
    return describe(holdings(model, optimizer, f"{name} over {s.describe()}, {world} ranks", s.shard, units or [model]))
