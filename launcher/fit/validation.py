"""Validation inside fit and what it decides: the monitored value and early stopping."""

from __future__ import annotations

import logging
from typing import Any, Optional

from ..config import TrainerConfig
from .evaluation import evaluate
from .state import EarlyStopping

log = logging.getLogger("launcher")


class Validation:
    """Runs fit's validation (every rank: a collective) and judges trainer.monitor with early stopping.
    The EarlyStopping it owns is a resumable part of the run (registered by the Trainer)."""

    def __init__(self, t: TrainerConfig, fp: Any, device: Any, callbacks: Any) -> None:
        self.t, self.fp, self.device, self.callbacks = t, fp, device, callbacks  # fp: fit.parts.FitParts
        self.stopper = EarlyStopping(t.mode, t.patience, t.min_delta)
        if fp.val is None:  # what the monitor judges then (the Python API's default switched to it)
            log.info("no validation data: trainer.monitor=%s (early stopping, the best checkpoint and "
                     "ReduceLROnPlateau follow it)", t.monitor)

    def run(self) -> dict[str, float]:
        """val_* over every rank's shard, between the callbacks' on_validation_start and _end."""
        fp = self.fp
        self.callbacks.fire("on_validation_start")
        with fp.phases.timing("validation"):
            values = evaluate(fp.model, fp.step, fp.val, fp.val_acc, self.device, fp.prec, lockstep=fp.sharded)
        self.callbacks.fire("on_validation_end", values)
        return values

    def judge(self, values: dict[str, float]) -> tuple[Optional[float], bool]:
        """(the monitored value, or None where `values` lacks it; whether early stopping says stop)."""
        value = values.get(self.t.monitor)
        if value is None or not isinstance(value, float):
            return None, False
        stop = self.stopper.update(value)
        if stop:
            log.info("early stopping: %s did not improve for %d validations (best %.6g)",
                     self.t.monitor, self.stopper.wait, self.stopper.best)
        return value, stop
