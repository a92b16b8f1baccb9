"""The checks of the memory keys of trainer (docs/big-models.md): activation checkpointing and
FSDP2's knobs (reshard after forward, CPU offload, the mixed-precision policy's dtypes).

The schema's fields are in TrainerConfig (config/__init__.py); their checks live here, and
launcher/device/memory.py applies them. A leaf like the rest of the package.
"""

from __future__ import annotations

from typing import Any, Optional

from .errors import ConfigError

SHARDED = ("fsdp", "hsdp")  # the strategies that shard with fully_shard, where the fsdp_* knobs apply
FSDP_DTYPES = ("auto", "float32", "bfloat16")  # auto: the dtype the parameters have (trainer.precision's)
AC_OFF = (None, False, "off", "")
AC_VALID = "off, a block class name or a list of them ([Block]), or {Block: k} (every k-th Block)"
# the defaults of the fsdp_* keys: FSDP2's own behaviour, so a key left alone changes nothing
FSDP_DEFAULTS = {"fsdp_reshard_after_forward": True, "fsdp_cpu_offload": False, "fsdp_param_dtype": "auto",
                 "fsdp_reduce_dtype": "auto"}


def ac_rule(value: Any) -> Optional[dict[str, int]]:
    """trainer.activation_checkpointing as {class name: k} (every k-th module of that class, counted
    in model order from 1: k=1 is every one), None when off; a bad shape is one ConfigError."""
    if value in AC_OFF or (isinstance(value, (list, tuple, dict)) and not value):
        return None
    if isinstance(value, str):
        value = [value]
    items = value.items() if isinstance(value, dict) else ((name, 1) for name in value) \
        if isinstance(value, (list, tuple)) else None
    if items is None:
        raise ConfigError("trainer.activation_checkpointing", value, "not a block rule", AC_VALID)
    rule: dict[str, int] = {}
    for name, k in items:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError("trainer.activation_checkpointing", value, f"{name!r} is not a class name", AC_VALID)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError("trainer.activation_checkpointing", value, f"every {k!r}-th {name}: k must be an "
                              "integer >= 1", AC_VALID)
        rule[name] = k
    return rule


def check_memory(t: Any) -> None:
    """The memory keys of a TrainerConfig, alone and against trainer.strategy / trainer.precision."""
    ac_rule(t.activation_checkpointing)
    r = t.fsdp_reshard_after_forward
    if not isinstance(r, bool) and (not isinstance(r, int) or r < 2):
        raise ConfigError("trainer.fsdp_reshard_after_forward", r, "reshard after forward",
                          "true (free the gathered parameters), false (keep them for backward), or N >= 2 "
                          "(keep them sharded over groups of N ranks)")
    if not isinstance(t.fsdp_cpu_offload, bool):
        raise ConfigError("trainer.fsdp_cpu_offload", t.fsdp_cpu_offload, "must be true or false")
    for key in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
        if getattr(t, key) not in FSDP_DTYPES:
            raise ConfigError(f"trainer.{key}", getattr(t, key), "unknown dtype", ", ".join(FSDP_DTYPES))
    changed = [k for k, v in FSDP_DEFAULTS.items() if getattr(t, k) != v or type(getattr(t, k)) is not type(v)]
    if changed and t.strategy not in SHARDED:
        raise ConfigError(f"trainer.{changed[0]}", getattr(t, changed[0]), f"applies to sharded runs only "
                          f"(trainer.strategy={t.strategy})", "trainer.strategy=" + ", ".join(SHARDED))
    param_dtype_fits(t.fsdp_param_dtype, t.precision)


def param_dtype_fits(param_dtype: str, precision: str) -> None:
    """One truth for the compute dtype: trainer.precision. FSDP's param dtype may carry it out
    (bfloat16 gathers under bf16-mixed), never contradict it; precision=auto is checked once resolved."""
    if param_dtype == "bfloat16" and precision == "32":
        raise ConfigError("trainer.fsdp_param_dtype", param_dtype, "computes in bf16 but trainer.precision=32 "
                          "asks for float32", "auto, float32, or trainer.precision=bf16-mixed")
    if param_dtype == "float32" and precision == "bf16-true":
        raise ConfigError("trainer.fsdp_param_dtype", param_dtype, "trainer.precision=bf16-true keeps the "
                          "parameters in bf16", "auto, bfloat16, or trainer.precision=bf16-mixed")


def check_reshard_world(reshard: Any, shard_ranks: int) -> None:
    """An int reshard_after_forward must divide the ranks a parameter is sharded over, strictly
    between 1 and all of them (FSDP2's rule: 1 would replicate, all of them is `true`)."""
    if isinstance(reshard, bool) or not isinstance(reshard, int):
        return
    if not 1 < reshard < shard_ranks or shard_ranks % reshard:
        raise ConfigError("trainer.fsdp_reshard_after_forward", reshard, f"must divide the {shard_ranks} "
                          "sharding rank(s), strictly between 1 and all of them", "true, false, or such a divisor")
