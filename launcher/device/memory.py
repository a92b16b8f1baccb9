"""Memory for models that do not fit (docs/big-models.md): activation checkpointing of the blocks
trainer.activation_checkpointing names, and FSDP2's knobs (trainer.fsdp_*) as fully_shard's arguments.

Activation checkpointing wraps each chosen block in torch's checkpoint_wrapper (non-reentrant
torch.utils.checkpoint underneath), in place in its parent, as torchtitan applies it: before
fully_shard (the FSDP unit is then the wrapper, so its all-gather hooks stay outside the recomputed
region and run once), before compile and before DDP. The wrapper's state_dict hooks and DCP drop its
`_checkpoint_wrapped_module.` prefix, so checkpoints keep the plain names and load with it on or off.
The RNG state is preserved (torch's default): dropout recomputes the same mask, and the gradients are
bitwise those without it on CPU (tests/test_memory.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import TrainerConfig, UserError
from ..config.memory import ac_rule, param_dtype_fits

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# checkpoint_wrapper's child name (torch's _CHECKPOINT_PREFIX), which state_dict hooks and DCP drop
WRAPPED = "_checkpoint_wrapped_module."


def plain_name(name: str) -> str:
    """A parameter's name (named_parameters) as the bare model's state_dict has it."""
    return name.replace(WRAPPED, "")


def checkpoint_blocks(model: nn.Module, spec: Any) -> dict[nn.Module, nn.Module]:
    """Wrap the blocks `spec` (trainer.activation_checkpointing) picks; {block: its wrapper}."""
    rule = ac_rule(spec)
    if not rule:
        return {}
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    seen = {name: 0 for name in rule}
    chosen: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            cls = type(child).__name__
            if cls in rule:
                seen[cls] += 1
                if seen[cls] % rule[cls] == 0:  # every k-th, counted from 1: k, 2k, ... (torchtitan's count)
                    chosen.append((parent, name, child))
    missing = [n for n, count in seen.items() if not count]
    if missing:
        found = sorted({type(m).__name__ for m in model.modules() if m is not model})
        raise UserError(f"trainer.activation_checkpointing={missing[0]!r}: no such module class in the model "
                        f"(below its root); valid: {', '.join(found)}")
    wrapped = {}
    for parent, name, child in chosen:
        wrapped[child] = checkpoint_wrapper(child)
        parent.register_module(name, wrapped[child])
    return wrapped


def fsdp_options(t: TrainerConfig, precision: str, device: torch.device) -> dict[str, Any]:
    """fully_shard's keyword arguments for the blocks from trainer.fsdp_*; {} where all are defaults.
    The compute dtype has one truth, trainer.precision (resolved); the policy only carries it out."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
    except ImportError:  # torch < 2.6: FSDP2 under its private module only
        from torch.distributed._composable.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    out: dict[str, Any] = {}
    if t.fsdp_reshard_after_forward is not True:
        out["reshard_after_forward"] = t.fsdp_reshard_after_forward
    if t.fsdp_cpu_offload:
        # pinned host memory makes the copies to the GPU asynchronous; there is nothing to pin for on a CPU run
        out["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    if t.fsdp_param_dtype != "auto" or t.fsdp_reduce_dtype != "auto":
        try:  # trainer.precision=auto became `precision` on this device: the parent could not check it
            param_dtype_fits(t.fsdp_param_dtype, precision)
        except UserError as e:
            raise UserError(f"{e} (trainer.precision={t.precision} resolved to {precision} here)") from None
        out["mp_policy"] = MixedPrecisionPolicy(param_dtype=_DTYPES.get(t.fsdp_param_dtype),
                                                reduce_dtype=_DTYPES.get(t.fsdp_reduce_dtype))
    return out


def root_options(options: dict[str, Any]) -> dict[str, Any]:
    """The root's: the blocks' but reshard_after_forward, left to FSDP2 (false for the root: backward
    needs its parameters first thing, so gathering them again would be wasted)."""
    return {k: v for k, v in options.items() if k != "reshard_after_forward"}


def describe(model: nn.Module, options: dict[str, Any]) -> str:
    """What the memory keys did, for the log line of the run's choices; "" when none is on."""
    n = sum(hasattr(m, "_checkpoint_wrapped_module") for m in model.modules())
    parts = [f"activation checkpointing on {n} block(s)"] if n else []
    if options:
        parts.append("fully_shard(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")")
    return "".join(f", {p}" for p in parts)
