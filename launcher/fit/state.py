"""The loop's own resumable parts, each Stateful (state_dict / load_state_dict).

TrainProgress is the loop position and history (the same on every rank, rank 0 saves it);
EarlyStopping counts validations without improvement. What differs per rank, and the run's other
objects as checkpoint parts, are in checkpoint/adapters.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import TrainerConfig


class History(list):
    """One dict per epoch (epoch, step, lr, train_*, val_*); `.df` is the same as a pandas DataFrame."""

    @property
    def df(self) -> Any:
        import pandas as pd  # optional extra ([pandas]); only this property needs it

        return pd.DataFrame(list(self))


@dataclass
class TrainProgress:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches of epoch `epoch` already trained (the data position)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    stopped_early: bool = False

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "history": [dict(r) for r in self.history], "stopped_early": self.stopped_early}

    def ends(self, t: TrainerConfig, epochs_done: int) -> bool:
        """The one end rule: early stopping, max_steps, or max_epochs with `epochs_done` complete."""
        return self.stopped_early or epochs_done >= t.max_epochs or 0 < t.max_steps <= self.step

    def complete(self, t: TrainerConfig, stopper: "EarlyStopping", trained: bool = False, results: str = "") -> str:
        """The run's last line: what ended it (max_steps, max_epochs, early stopping), so a bar left at
        "epoch 7/10" is explained; for a run with nothing left to train, which limit would continue it;
        `results`: where they are (the Python API's; the CLI's parent prints its own `launcher: done:`)."""
        if self.stopped_early:
            why, limit = f"early stopping: no better {t.monitor} in {stopper.wait} validations", "patience"
        elif 0 < t.max_steps <= self.step:
            why, limit = f"trainer.max_steps={t.max_steps}", "max_steps"
        else:
            why, limit = f"trainer.max_epochs={t.max_epochs}", "max_epochs"
        # inside an epoch (max_steps, or early stopping at a step validation): the epoch the bar showed
        at = (f"step {self.step}, in epoch {self.epoch + 1} of {t.max_epochs}" if self.batch_in_epoch
              else f"epoch {self.epoch}, step {self.step}")
        text = f"run complete at {at} ({why})"
        if not trained:
            text += f"; raise trainer.{limit} to continue it, or start over in a new run.dir"
        return f"{text}; results: {results}" if results else text

    def steps_total(self, t: TrainerConfig, per_epoch: Optional[int]) -> tuple[int, Optional[int]]:
        """(steps done in this epoch, the steps it will have: its own, or fewer where max_steps ends the
        run inside it; None for a stream without max_steps: no length)."""
        done = self.batch_in_epoch // t.accumulate_grad_batches
        left = ([per_epoch - done] if per_epoch is not None else []) + ([t.max_steps - self.step] if t.max_steps >= 0
                                                                       else [])
        return done, (done + min(left) if left else None)

    def record(self, row: dict[str, Any]) -> None:
        """An epoch's row: it replaces the epoch's partial row from a run that stopped inside it."""
        if self.history and self.history[-1]["epoch"] == row["epoch"]:
            self.history[-1] = row
        else:
            self.history.append(row)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch, self.step, self.batch_in_epoch = sd["epoch"], sd["step"], sd["batch_in_epoch"]
        self.history = [dict(r) for r in sd["history"]]
        self.stopped_early = sd["stopped_early"]


class EarlyStopping:
    """Counts validations without an improvement of `monitor` larger than min_delta."""

    def __init__(self, mode: str, patience: int, min_delta: float) -> None:
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best: Optional[float] = None
        self.wait = 0

    def improved(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best):
            return not math.isnan(value)
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def update(self, value: float) -> bool:
        """Record one validation; True when the run should stop."""
        if self.improved(value):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        return self.should_stop()

    def should_stop(self) -> bool:
        return self.patience > 0 and self.wait >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.best, self.wait = sd["best"], sd["wait"]
