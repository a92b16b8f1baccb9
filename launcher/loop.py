"""The training loop of one fit() call: steps, epoch ends, validation, checkpoints, resume.

One loop (DESIGN.md habit 7): `for batch: train_step(); maybe validate; maybe save`, and at each
epoch end one synced row of metrics. Per step: forward, backward, optimizer step, metric update,
nothing that waits on the device except the progress bar at its refresh rate.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from . import checkpoint as ckpt
from . import config as C
from . import dist as D
from .data import Batches, batch_size_of, to_device
from .loggers import NullLogger, RunLogger
from .progress import Progress
from .state import Accumulator, EarlyStopping, TrainState, rank_state, seed_everything, set_rng_state

if TYPE_CHECKING:
    from .fit import Trainer

log = logging.getLogger("launcher")


def evaluate(model: nn.Module, loss_fn: Callable, batches: Batches, acc: Accumulator,
              device: torch.device) -> dict[str, float]:
    # The bare module, not DDP: ranks hold different numbers of eval batches, and DDP's forward
    # would start a collective (buffer broadcast) per batch and hang the ranks that ran out.
    was_training = model.training
    model.eval()
    acc.reset()
    with torch.no_grad():
        for batch in batches.epoch(0):
            x, y = to_device(batch, device)
            out = model(x)
            acc.update(loss_fn(out, y), batch_size_of(y), out, y)
    model.train(was_training)
    return acc.compute("val")


class Loop:
    """The loop and its state for one fit() call."""

    def __init__(self, tr: "Trainer", net: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                 scheduler: Any, train: Batches, val: Optional[Batches], metrics: dict[str, Any], d: D.Dist) -> None:
        cfg = tr.cfg
        self.tr, self.t, self.net, self.loss_fn, self.opt, self.sched = tr, cfg.trainer, net, loss_fn, optimizer, scheduler
        self.train, self.val, self.d = train, val, d
        self.metric_protos = metrics
        self.train_acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
        self.val_acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
        self.state = TrainState()
        self.stop = tr.stop
        self.preempted = False
        self.stopper = EarlyStopping(self.t.mode, self.t.patience, self.t.min_delta)
        self.ckpt = ckpt.Checkpointer(tr.run_dir / "checkpoints", enabled=cfg.checkpoint.enabled,
                                      every_n_epochs=cfg.checkpoint.every_n_epochs,
                                      every_n_steps=cfg.checkpoint.every_n_steps,
                                      save_top_k=cfg.checkpoint.save_top_k, mode=self.t.mode,
                                      keep_last=cfg.checkpoint.keep_last)
        lg = cfg.logger
        self.logger: Any = NullLogger()
        if d.is_main:
            self.ckpt.clean_temp()
            if lg.name != "none":
                self.logger = RunLogger(tr.run_dir, name=cfg.run.name or tr.run_dir.name, run_id=tr.run_id,
                                        config=C.to_dict(cfg), wandb=vars(lg) if lg.name == "wandb" else None,
                                        plots=lg.plots)
        tr._loop = self  # evaluate() after fit() reuses the loss and metrics

    # ---- checkpoint ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        bare = self.tr.model
        ranks = D.all_gather_object(rank_state(self.train_acc))  # every rank's RNG and running sums
        return {"model": bare.state_dict(), "optimizer": self.opt.state_dict(),  # type: ignore[union-attr]
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "loop": self.state.state_dict(), "early_stopping": self.stopper.state_dict(),
                "checkpointer": self.ckpt.state_dict(), "ranks": ranks,
                "data": {"epoch": self.state.epoch, "batch_in_epoch": self.state.batch_in_epoch,
                         "seed": self.t.seed, "world_size": self.d.world_size, "shuffle": self.train.shuffle},
                "run_id": self.tr.run_id, "config": C.to_dict(self.tr.cfg)}

    def save(self, score: Optional[float]) -> None:
        state = self.state_dict()  # collective: every rank contributes its RNG state
        if self.d.is_main:
            meta = {"step": self.state.step, "epoch": self.state.epoch, "run_id": self.tr.run_id}
            folder = self.ckpt.save(self.state.step, state, meta, score)
            log.debug("checkpoint %s", folder)
            if self.ckpt.best:
                self.tr.best_score, self.tr.best_checkpoint = self.ckpt.best
        self.ckpt.last_saved_step = self.state.step

    def restore(self, folder: Path) -> None:
        sd = ckpt.load(folder)
        self.tr.model.load_state_dict(sd["model"])  # type: ignore[union-attr]
        self.opt.load_state_dict(sd["optimizer"])
        if self.sched is not None and sd["scheduler"] is not None:
            self.sched.load_state_dict(sd["scheduler"])
        self.state.load_state_dict(sd["loop"])
        self.stopper.load_state_dict(sd["early_stopping"])
        self.ckpt.load_state_dict(sd["checkpointer"])
        self.ckpt.last_saved_step = self.state.step
        ranks = sd["ranks"]
        if len(ranks) == self.d.world_size:
            set_rng_state(ranks[self.d.rank]["rng"])
            self.train_acc.load_state_dict(ranks[self.d.rank]["train"])
        else:
            log.warning("checkpoint from world size %d resumed at %d: data order and RNG streams differ "
                        "from an uninterrupted run", len(ranks), self.d.world_size)
            seed_everything(self.t.seed + self.d.rank + self.state.step)
        self.tr.history[:] = self.state.history
        if self.ckpt.best:
            self.tr.best_score, self.tr.best_checkpoint = self.ckpt.best
        log.info("resumed from %s: step %d, epoch %d at batch %d", folder, self.state.step,
                 self.state.epoch + 1, self.state.batch_in_epoch)

    # ---- the loop ----------------------------------------------------------------------------------
    def done(self) -> bool:
        s, t = self.state, self.t
        return s.stopped_early or s.epoch >= t.max_epochs or (t.max_steps > 0 and s.step >= t.max_steps)

    def run(self) -> None:
        s, t = self.state, self.t
        steps_per_epoch = len(self.train)
        progress = Progress(self.d.is_main and t.progress, t.progress_refresh_s)
        while not self.done():
            total = steps_per_epoch if t.max_steps < 0 else min(steps_per_epoch, t.max_steps - s.step + s.batch_in_epoch)
            progress.start(f"epoch {s.epoch + 1}/{t.max_epochs}", total, s.batch_in_epoch)
            for batch in self.train.epoch(s.epoch, start=s.batch_in_epoch):
                self.train_step(batch)
                progress.update(self.train_acc.running_loss)
                last_of_epoch = s.batch_in_epoch >= steps_per_epoch
                if t.log_every_n_steps and s.step % t.log_every_n_steps == 0:
                    self.logger.log_step(s.step, {"train_loss_step": self.train_acc.running_loss(),
                                                  "lr": self.opt.param_groups[0]["lr"]})
                if t.val_every_n_steps and s.step % t.val_every_n_steps == 0 and not last_of_epoch and self.val:
                    values = evaluate(self.tr.model, self.loss_fn, self.val, self.val_acc, self.d.device)  # type: ignore[arg-type]
                    self.logger.log_step(s.step, values)
                    self.monitor(values)
                if self.ckpt.due_step(s.step) and not last_of_epoch:
                    self.save(None)
                if self.stop is not None and self.stop.agreed(s.step):
                    self.preempted = True
                    break
                if s.stopped_early or (t.max_steps > 0 and s.step >= t.max_steps):
                    break
            if self.preempted:  # mid-epoch: no epoch row; the requeued job finishes this epoch
                progress.close()
                if self.ckpt.last_saved_step != s.step:
                    self.save(None)
                D.barrier()  # every rank leaves only once rank 0's checkpoint is on disk
                log.info("stopped at step %d for a requeue (signal %s); checkpoint written", s.step,
                         self.stop.signame if self.stop else "?")
                self.logger.finish(self.tr.history)
                return
            progress.close(self.end_epoch())
        if self.ckpt.enabled and self.ckpt.last_saved_step != s.step:
            self.save(None)
        if self.d.is_main:
            torch.save(self.tr.model.state_dict(), self.tr.run_dir / "model.pt")  # type: ignore[union-attr]
        self.logger.finish(self.tr.history)

    def train_step(self, batch: Any) -> None:
        x, y = to_device(batch, self.d.device)
        out = self.net(x)
        loss = self.loss_fn(out, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.train_acc.update(loss, batch_size_of(y), out.detach(), y)
        self.state.step += 1
        self.state.batch_in_epoch += 1
        if self.sched is not None and self.t.scheduler_interval == "step":
            self.sched.step()

    def monitor(self, values: dict[str, float]) -> Optional[float]:
        """Feed the monitored value (if present) to early stopping; returns it."""
        value = values.get(self.t.monitor)
        if value is None or not isinstance(value, float):
            return None
        if self.stopper.update(value):
            log.info("early stopping: %s did not improve for %d validations (best %.6g)",
                     self.t.monitor, self.stopper.wait, self.stopper.best)
            self.state.stopped_early = True
        return value

    def end_epoch(self) -> dict[str, Any]:
        """Sync the epoch's metrics, validate, log, step schedulers and early stopping; returns the row."""
        s, t = self.state, self.t
        lr = self.opt.param_groups[0]["lr"]
        row: dict[str, Any] = {"epoch": s.epoch + 1, "step": s.step, "lr": lr}
        row.update(self.train_acc.compute("train"))
        last = s.stopped_early or s.epoch + 1 >= t.max_epochs or (t.max_steps > 0 and s.step >= t.max_steps)
        if self.val is not None and ((s.epoch + 1) % t.val_every_n_epochs == 0 or last):
            row.update(evaluate(self.tr.model, self.loss_fn, self.val, self.val_acc, self.d.device))  # type: ignore[arg-type]
        score = self.monitor(row) if t.monitor in row else None
        if self.sched is not None and t.scheduler_interval == "epoch":
            if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if score is not None:
                    self.sched.step(score)
            else:
                self.sched.step()
        s.history.append(row)
        self.tr.history[:] = s.history
        self.logger.log_epoch(s.history)
        if self.d.is_main and not t.progress:  # with a bar, the bar shows the row
            log.info("epoch %d: %s", row["epoch"], "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "epoch"))
        s.epoch += 1
        s.batch_in_epoch = 0
        self.train_acc.reset()
        if self.ckpt.due_epoch(s.epoch) or self.ckpt.due_step(s.step):
            self.save(score if score is not None and not math.isnan(score) else None)
        return row
