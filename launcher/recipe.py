"""Build a recipe's objects from its `_target_` nodes, on each rank, without importing Hydra.

The contract is Hydra's (_target_, _partial_, _args_, nested nodes built first), so a recipe
written for hydra.utils.instantiate works here; ranks skip Hydra's import cost.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any


def locate(path: str) -> Any:
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


def build(cfg: Any) -> dict[str, Any]:
    """The keyword arguments of Trainer.fit from a Config's recipe nodes."""
    train, val = instantiate(cfg.data)
    return {
        "model": instantiate(cfg.model),
        "loss_fn": instantiate(cfg.loss),
        "optimizer": instantiate(cfg.optimizer),
        "train_data": train,
        "val_data": val,
        "metrics": {k: instantiate(v) for k, v in (cfg.metrics or {}).items()},
        "scheduler": instantiate(cfg.scheduler) if cfg.scheduler else None,
    }
