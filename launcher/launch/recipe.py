"""The recipe contract: `_target_` nodes checked in the parent, built on each rank without Hydra.

The contract is Hydra's (_target_, _partial_, _args_, nested nodes built first), so a recipe
written for hydra.utils.instantiate works here; ranks skip Hydra's import cost. The parent checks
that every target imports and that trainer.monitor names a metric the recipe produces, so a typo
fails once, before any process starts, and not on every rank after spawning.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from ..config import RECIPE_KEYS, Config, ConfigError, UserError, one_line
from .slim_imports import defer_torchmetrics_pyplot


def locate(path: str) -> Any:
    defer_torchmetrics_pyplot()  # a recipe's metrics are torchmetrics: ~0.5 s less start-up
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def instantiate(node: Any) -> Any:
    """A node with _target_ becomes the call's result (or a partial); containers are built item-wise."""
    if isinstance(node, list):
        return [instantiate(v) for v in node]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {k: instantiate(v) for k, v in node.items()}
    kwargs = {k: instantiate(v) for k, v in node.items() if k not in ("_target_", "_partial_", "_args_")}
    args = [instantiate(a) for a in node.get("_args_", [])]
    fn = locate(node["_target_"])
    return functools.partial(fn, *args, **kwargs) if node.get("_partial_") else fn(*args, **kwargs)


def build(cfg: Config) -> dict[str, Any]:
    """The keyword arguments of Trainer.fit from a Config's recipe nodes. What the recipe's own code
    raises (a model that cannot be built, missing or corrupt data) is the user's: a UserError naming
    the recipe key and its target, the original exception chained for the rank log."""
    data = _built("data", cfg.data)
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise UserError(f"data ({target_of(cfg.data)}): returned {type(data).__name__}; valid: (train_dataset, "
                        "val_dataset), val_dataset may be None")
    train, val = data
    metrics = cfg.metrics or {}
    return {
        "model": _built("model", cfg.model),
        "loss_fn": _built("loss", cfg.loss) if cfg.loss is not None else None,
        "step": _built("step", cfg.step) if cfg.step is not None else None,  # a short name is resolved by fit
        "optimizer": _built("optimizer", cfg.optimizer),
        "train_data": train,
        "val_data": val,
        "metrics": {k: _built(f"metrics.{k}", v) for k, v in metrics.items()},
        "scheduler": _built("scheduler", cfg.scheduler) if cfg.scheduler else None,
        "callbacks": [_built(f"callbacks[{i}]", c) for i, c in enumerate(cfg.callbacks or [])],
    }


def _built(key: str, node: Any) -> Any:
    try:
        return instantiate(node)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the recipe's code: any failure there is the user's to fix
        raise UserError(f"{key} ({target_of(node)}): {one_line(e)}") from e


def target_of(node: Any) -> str:
    return str(node.get("_target_", "?")) if isinstance(node, dict) else type(node).__name__


# ---- checks (the parent's; a rank trusts the resolved config) -------------------------------------

def check(cfg: Config) -> None:
    for key in ("model", "data", "optimizer"):
        if getattr(cfg, key) is None:
            raise ConfigError(key, None, "the recipe does not define it", "a _target_ node (see conf/recipe/)")
    metrics = cfg.metrics or {}
    if not isinstance(metrics, dict):
        raise ConfigError("metrics", metrics, "must map names to torchmetrics _target_ nodes")
    if cfg.callbacks is not None and not isinstance(cfg.callbacks, list):
        raise ConfigError("callbacks", cfg.callbacks, "must be a list", "a list of _target_ nodes building "
                          "launcher.Callback objects")
    for key in RECIPE_KEYS:
        _check_targets(key, getattr(cfg, key))
    _check_step(cfg.step, has_loss=cfg.loss is not None)
    check_monitor(cfg.trainer.monitor, list(metrics))


def _check_step(step: Any, has_loss: bool) -> None:
    """The step: a built-in's short name or a _target_ node; a built-in that computes `loss(outputs,
    targets)` needs the recipe's loss."""
    if step is None:
        if not has_loss:
            raise ConfigError("loss", None, "the recipe does not define it, and the default step (supervised) computes "
                              "loss(outputs, targets)", "a _target_ node (e.g. torch.nn.CrossEntropyLoss), or "
                              "step=model_loss for a model that computes its own")
        return
    from ..fit.steps import BUILT_IN  # torch: imported by the parent only for a recipe that names a step

    valid = f"{', '.join(BUILT_IN)}, or a _target_ node building a callable step(model, batch)"
    if isinstance(step, str):
        if step not in BUILT_IN:
            raise ConfigError("step", step, "not a built-in step", valid)
        needs = BUILT_IN[step]
    elif isinstance(step, dict) and isinstance(step.get("_target_"), str):
        fn = locate(step["_target_"])
        if not isinstance(fn, type) and not step.get("_partial_"):  # Hydra's rule would call it with no batch
            raise ConfigError("step._partial_", step.get("_partial_"), f"{step['_target_']} is a function: without "
                              "`_partial_: true` it is called when the recipe is built", "_partial_: true")
        needs = fn
    else:
        raise ConfigError("step", step, "not a step", valid)
    if getattr(needs, "needs_loss", False) and not has_loss and (not isinstance(step, dict) or "loss_fn" not in step):
        raise ConfigError("loss", None, f"the recipe does not define it, and step={step if isinstance(step, str) else step['_target_']} "
                          "computes loss(outputs, targets)", "a _target_ node (e.g. torch.nn.CrossEntropyLoss), or "
                          "step=model_loss for a model that computes its own")


def _check_targets(key: str, node: Any) -> None:
    """Every _target_ must import."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_targets(f"{key}[{i}]", item)
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str):
            try:
                locate(target)
            except Exception as e:  # noqa: BLE001 - importing runs the user's module: a broken build of a
                # library it imports raises anything (RuntimeError, OSError...), and it is still their one line
                raise ConfigError(f"{key}._target_", target, f"cannot be imported ({one_line(e)})",
                                  "a dotted path to a class or function") from None
        for k, v in node.items():
            if k != "_target_":
                _check_targets(f"{key}.{k}", v)


def check_monitor(monitor: str, metric_names: list[str], has_val: bool = True) -> str:
    """`monitor` must be a metric the run produces: {train,val}_loss and {train,val}_<metric>. Returns it;
    "" (the Python API's default: Trainer(...) without monitor=) follows the data fit() was given, val_loss
    or, with no validation data, train_loss (fit/validation.py says which in the log)."""
    monitor = monitor or ("val_loss" if has_val else "train_loss")
    produced = [f"{split}_{name}" for split in ("train", "val") if split == "train" or has_val
                for name in ["loss", *metric_names]]
    if monitor not in produced:
        raise ConfigError("trainer.monitor", monitor, "not a metric this run produces", ", ".join(produced))
    return monitor
