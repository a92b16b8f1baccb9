"""One truth per run directory: which settings may change when a run is continued.

A run continued from its own checkpoints (resume=auto, a requeue, a restart) is compared, key by
key, with the config the run directory holds, before anything is written:

- how long and how it runs may change, and is applied: the limits (trainer.max_epochs, max_steps,
  early-stopping patience), logging, checkpoint cadence and retention, the launcher's resources,
  the number of ranks and their strategy (the rest of an epoch then covers exactly the samples not
  yet seen: data.Batches.continue_epoch), evaluation cadence, and speed knobs that leave the maths
  alone (compile, channels_last, num_workers);
- the optimizer's hyperparameters (optimizer.lr, weight_decay, betas...) are applied to the
  optimizer, its state (moments, step counts) kept: strategy.OptimizerState;
- anything else (the recipe: model, data, loss, metrics, scheduler, optimizer class; the data
  order: seed, batch_size, accumulation; precision; the monitored metric) would not be the run
  the checkpoints hold, and is refused in one line listing every differing key.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import config as C

log = logging.getLogger("launcher")
_UNSET = "(unset)"
# Whole sections that may change between segments of one run.
_FREE_SECTIONS = ("checkpoint", "logger", "launcher", "run")
_FREE_TRAINER = {
    "max_epochs", "max_steps", "patience", "min_delta",  # limits: how long it runs
    "progress", "progress_refresh_s", "log_every_n_steps", "summary", "peak_tflops",  # what it reports
    "ledger", "ledger_counts",  # what it records (an epoch resumed without counts is marked incomplete)
    "hang_timeout_s", "profile",  # what it observes (docs/observing.md): no effect on the training
    "val_every_n_epochs", "val_every_n_steps", "eval_batch_size",  # when and how it validates
    "gpus", "nproc", "nodes", "accelerator", "strategy", "fsdp_wrap",  # where it runs, how many ranks
    "hsdp_replicas", "tensor_parallel", "tp_plan",  # the mesh: checkpoints are DCP's, which reshards on load
    "num_workers", "persistent_workers", "prefetch_factor", "dist_timeout_s", "join_timeout_s", "compile", "channels_last",  # speed and patience, same maths
    "gradient_clip_val", "nonfinite",  # read at every step from the config: applied as they are
    "activation_checkpointing", "fsdp_reshard_after_forward", "fsdp_cpu_offload",  # memory for time, same maths
}
_OPTIMIZER_FIXED = {"_target_", "_partial_"}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty or None section is one key with its value."""
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def _normalized(config: dict[str, Any]) -> dict[str, Any]:
    """A config.yaml written by an older launcher, with the fields added since at their defaults
    (so a new field is not taken for a change)."""
    try:
        return C.to_dict(C.from_dict(config))
    except (TypeError, KeyError):  # a field that no longer exists: compare as written
        return config


# The example recipes' module before they shipped inside the package (issue 21): a run dir written
# then names `recipes.mnist.Net`; it is the same code as `launcher.recipes.mnist.Net` now.
_OLD_RECIPES = ("recipes.", "launcher.recipes.")


def _renamed(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_OLD_RECIPES[0]):
        return _OLD_RECIPES[1] + value[len(_OLD_RECIPES[0]):]
    return value


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    a = {k: _renamed(v) if k.endswith("_target_") else v for k, v in flatten(_normalized(old)).items()}
    b = flatten(_normalized(new))
    return {k: (a.get(k, _UNSET), b.get(k, _UNSET)) for k in sorted(set(a) | set(b))
            if a.get(k, _UNSET) != b.get(k, _UNSET) and k not in ("run.id", "run.dir")}


def free(key: str, old: Any = None, new: Any = None) -> bool:
    """May `key` change from `old` to `new` between two segments of one run?"""
    section, _, leaf = key.partition(".")
    if section in _FREE_SECTIONS or key == "resume":
        return True
    if section == "trainer":
        return leaf in _FREE_TRAINER
    # numbers only: state.Hyperparameters applies those; a flag such as amsgrad changes what the
    # optimizer's state holds, and the restored state would not fit it
    return (section == "optimizer" and leaf not in _OPTIMIZER_FIXED and "." not in leaf
            and _number(old) and _number(new))


def _number(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return bool(v) and all(_number(x) for x in v)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def check(run_dir: str, old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The changes a continued run applies; ConfigError (one line, every refused key) for the rest."""
    changes = differences(old, new)
    refused = {k: v for k, v in changes.items() if not free(k, *v)}
    if refused:
        raise C.ConfigError("run.dir", run_dir, f"holds a run with other settings; cannot continue it with "
                            f"{describe(refused)}", "the run's own values for these keys, or a new run.dir "
                            "(resume=PATH starts a new run from one of its checkpoints)")
    return changes


def log_changes(saved: Any, current: dict[str, Any]) -> None:
    """Record in the run log what this segment runs with that the checkpoint's segment did not."""
    if not isinstance(saved, dict):
        return
    changes = {k: v for k, v in differences(saved, current).items() if free(k, *v) and k != "resume"}
    if changes:
        log.info("continuing with changed settings: %s", describe(changes))
