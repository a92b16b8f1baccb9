"""Rank 0's trackers, one module each (csv_files, wandb_run, tensorboard_events, mlflow_run).

Every tracker has the same three calls: log_metrics(step, values) for per-step and per-epoch
values, log_history(history) once per epoch with the whole history, and finish(...) at the end of
fit. launcher/observe/loggers.py feeds the selected ones together; each imports its library only when chosen.
"""

from __future__ import annotations

from typing import Any


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys, {"trainer": {"max_epochs": 3}} -> {"trainer.max_epochs": 3}:
    the shape trackers' parameter tables take."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
