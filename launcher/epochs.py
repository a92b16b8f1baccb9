"""What happens at an epoch's end and at a validation or checkpoint point inside one: the epoch's
synced metrics, validation, early stopping, the epoch-interval scheduler, the history row, the
throughput line, the checkpoint. A mixin of trainer.Trainer, which owns the state these change."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from .evaluation import evaluate

log = logging.getLogger("launcher")


class EpochEnd:
    """Trainer's bookkeeping at epoch ends and checkpoint points; the attributes are Trainer's."""

    cfg: Any
    parts: Any
    progress: Any
    ckpt: Any
    stopper: Any
    logger: Any
    bar: Any
    dist: Any
    _epoch: Any

    def _epoch_done(self) -> bool:
        raise NotImplementedError  # Trainer's

    def _ends_at(self, epochs_done: int) -> bool:
        raise NotImplementedError  # Trainer's

    def _save(self, score: Optional[float]) -> None:
        self.parts.stepper.check()  # a step the device skipped is heard of before its checkpoint
        self.ckpt.save(self.progress.step, self.progress.epoch, score)  # type: ignore[union-attr]

    def _validate(self) -> dict[str, float]:
        fp = self.parts
        return evaluate(fp.model, fp.loss_fn, fp.val, fp.val_acc, self.dist.device, fp.prec,  # type: ignore
                        lockstep=fp.sharded)

    def _monitor(self, values: dict[str, float]) -> Optional[float]:
        """Feed the monitored value (if present) to early stopping; returns it."""
        t = self.cfg.trainer
        value = values.get(t.monitor)
        if value is None or not isinstance(value, float):
            return None
        if self.stopper.update(value):
            log.info("early stopping: %s did not improve for %d validations (best %.6g)",
                     t.monitor, self.stopper.wait, self.stopper.best)
            self.progress.stopped_early = True
        return value

    def _end_epoch(self) -> None:
        """Sync the epoch's metrics, validate, log, step schedulers and early stopping, maybe save.

        A run that ends inside an epoch (max_steps) reports it too (a row for the part trained), but
        the epoch stays open: its position, running metrics and the loop's state are checkpointed
        as they are, and a run continued with a larger limit finishes that very epoch, bitwise as
        if never stopped (the partial row is then replaced by the whole epoch's)."""
        p, t = self.progress, self.cfg.trainer
        self.parts.stepper.check()  # every rank at the same step: the guard's collective is safe here
        partial = not self._epoch_done()
        speed = self.parts.speed.end_epoch(p.step)
        row: dict[str, Any] = {"epoch": p.epoch + 1, "step": p.step, "lr": self.parts.optimizer.param_groups[0]["lr"]}
        row.update(self.parts.train_acc.compute("train"))
        if self.parts.val is not None and ((p.epoch + 1) % t.val_every_n_epochs == 0 or self._ends_at(p.epoch + 1)):
            row.update(self._validate())
        # a partial epoch's validation reaches neither early stopping nor the scheduler (their state
        # would differ from a run that never stopped there); it may still rank the checkpoint
        score = (row.get(t.monitor) if partial else self._monitor(row)) if t.monitor in row else None
        if self.parts.scheduler is not None and t.scheduler_interval == "epoch" and not partial:
            if isinstance(self.parts.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if score is not None:
                    self.parts.scheduler.step(score)
            else:
                self.parts.scheduler.step()
        if p.history and p.history[-1]["epoch"] == row["epoch"]:
            p.history[-1] = row  # this epoch's partial row, from the run that stopped inside it
        else:
            p.history.append(row)
        self.logger.log_epoch(p.history)
        # the epoch's steady rate, beside (not instead of) the recent rate the step rows carry
        self.logger.log_step(p.step, {f"epoch_{k}": v for k, v in speed.items()})  # not in the (deterministic) history
        if self.dist.is_main:  # type: ignore[union-attr]
            text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in {**row, **speed}.items() if k != "epoch")
            log.info("epoch %d%s: %s", row["epoch"], " (so far)" if partial else "", text,
                     extra={"file_only": t.progress})
        self._epoch = None
        score = score if isinstance(score, float) and not math.isnan(score) else None
        if partial:  # the run ends here: its checkpoint is this exact position
            if self.ckpt.cfg.enabled:  # type: ignore[union-attr]
                self._save(score)
        else:
            p.epoch += 1
            p.batch_in_epoch = 0
            self.parts.train_acc.reset()
            if self.ckpt.due_epoch(p.epoch) or self.ckpt.due_step(p.step):  # type: ignore[union-attr]
                self._save(score)
        self.bar.close({**row, **speed})

