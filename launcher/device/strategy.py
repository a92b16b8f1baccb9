"""trainer.strategy: how the model is spread over ranks (none, ddp, fsdp), plus compile/channels_last.

FSDP is FSDP2's fully_shard: each module whose class name is in trainer.fsdp_wrap becomes a unit
(its parameters gathered for its forward/backward only), then the root. Accumulation skips the
gradient all-reduce on all but the last micro-batch (DDP no_sync; FSDP2 set_requires_gradient_sync).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterable, Optional

import torch
from torch import nn

from ..config import Strategy, UserError
from .dist import Dist
from .memory import checkpoint_blocks, root_options
from .mesh import full_state, grad_norm_over_meshes, has_packed, meshes_of


def dcp_api() -> Any:
    """torch.distributed.checkpoint.state_dict, imported on first use: it costs ~1 s of start-up
    (it imports all of DCP) and only sharded runs and sharded checkpoints need it."""
    import torch.distributed.checkpoint.state_dict as sd

    return sd


def resolve(strategy: Strategy, d: Dist, tp: int = 1) -> Strategy:
    """What runs: hsdp is FSDP2 over a 2-D mesh (device/mesh.py), and TP's data dimension shards with it."""
    if strategy == "hsdp" or (strategy == "auto" and tp > 1):
        return "fsdp"
    if strategy == "auto":
        return "ddp" if d.distributed else "none"
    return strategy


def full_weights(model: nn.Module, sharded: bool, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The bare model's full state_dict on rank 0 (None elsewhere); a collective under FSDP."""
    if sharded and has_packed(model):  # a packed q|k|v under TP: DTensor cannot gather it (device/mesh.py)
        return full_state(model, dcp_api().get_model_state_dict(model), is_main)
    if sharded:
        sd = dcp_api().get_model_state_dict(model, options=dcp_api().StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
        return sd if is_main else None
    return model.state_dict() if is_main else None


def wrap(model: nn.Module, strategy: Strategy, d: Dist, fsdp_wrap: Iterable[str], compile: bool,
         channels_last: bool, checkpointing: Any = "off", fsdp_options: Optional[dict] = None,
         mesh: Any = None) -> nn.Module:
    """The module to train through; `model` itself stays the bare module (FSDP2 shards it in place over
    `mesh`: device/mesh.py's data-parallel mesh; None = the whole world, flat). checkpointing:
    trainer.activation_checkpointing; fsdp_options: fully_shard's (device/memory.py)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    checkpointed = checkpoint_blocks(model, checkpointing)  # first: fully_shard, compile, DDP take the wrappers
    if strategy == "fsdp":
        try:  # FSDP runs only
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6 has FSDP2 under its private module only
            from torch.distributed._composable.fsdp import fully_shard

        names = set(fsdp_wrap)
        units = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if names and not units:
            found = sorted({type(m).__name__ for m in model.modules()})
            raise UserError(f"trainer.fsdp_wrap={sorted(names)}: no such module class in the model; "
                             f"valid: {', '.join(found)}")
        for unit in units:
            fully_shard(checkpointed.get(unit, unit), mesh=mesh, **(fsdp_options or {}))
        fully_shard(model, mesh=mesh, **root_options(fsdp_options or {}))
    if compile:
        model.compile()  # in place: state_dict keys keep their names (torch.compile(m) would prefix them)
    if strategy == "ddp" and d.distributed:
        return nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None)
    return model


def no_sync(net: nn.Module, strategy: Strategy, skip: bool) -> ContextManager:
    """Inside: backward accumulates locally, no gradient all-reduce (micro-batches but the last)."""
    if not skip:
        return contextlib.nullcontext()
    if isinstance(net, nn.parallel.DistributedDataParallel):
        return net.no_sync()
    if strategy == "fsdp":
        return _fsdp_no_sync(net)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(net: nn.Module):
    net.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)  # type: ignore[operator]


def grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Total gradient norm over all ranks' shards; clips to max_norm when > 0. A plain tensor."""
    if meshes_of(params) > 1:  # tensor parallel: 1-D and 2-D DTensors (device/mesh.py)
        return grad_norm_over_meshes(params, max_norm)
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = _total_norm(grads) if grads else torch.zeros(())
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all grads together, as torch.nn.utils.get_total_norm gives it."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads)
    # torch < 2.6 has no get_total_norm: the norm of the per-tensor norms, as it computes them. Bitwise
    # its result on CPU (checked on 2.6-2.13, plain and FSDP2 grads); on CUDA its fused _foreach_norm
    # may round the per-tensor norms differently (only the guard's isfinite reads this norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def eager_if_odd(model: nn.Module, batch: int, full: int) -> ContextManager:
    """A model compiled in place (trainer.compile) runs a batch of another size than its full one
    (the epoch's last, shorter batch) eagerly: compiling it would cost a recompile, and the graph
    dynamo then makes for a dynamic batch size would serve every later full batch too, slower."""
    compiled = getattr(model, "_compiled_call_impl", None)
    if compiled is None or batch == full:
        return contextlib.nullcontext()
    return _without_compiled(model, compiled)


@contextlib.contextmanager
def _without_compiled(model: nn.Module, compiled: Any):
    model._compiled_call_impl = None  # nn.Module.__call__ falls back to the eager forward
    try:
        yield
    finally:
        model._compiled_call_impl = compiled
