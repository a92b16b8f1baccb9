"""Trainer: fit / evaluate / predict, for the CLI's ranks and the Python API alike.

    history = Trainer(max_epochs=10, monitor="val_loss", patience=5, run_dir="runs/a").fit(
        net, loss_fn, optimizer, train_data, val_data, metrics={"acc": torchmetrics.Accuracy(...)})

fit() is set-up, then one loop (`while self.should_continue(): one optimizer step, then what
follows it`), then teardown. The Trainer owns the loop's state; what must survive a restart is
registered once in `self.states` and the checkpoint manager saves and restores exactly that.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from torch import nn

from . import config as C
from . import dist as D
from . import drift, faults, options, parts
from . import run as R
from . import strategy as S
from .checkpoint import format as F
from .checkpoint.manager import CheckpointManager
from .epochs import EpochEnd
from .outputs import Outputs
from .loggers import NullLogger, open_logger, setup_logging
from .progress import Progress
from .recipe import check_monitor
from .resume import restore
from .state import (EarlyStopping, History, Hyperparameters, Maybe, PerRank, TrainProgress, make_deterministic,
                    seed_everything)
from .summary import print_summary
from .xla import init as xla_init

log = logging.getLogger("launcher")


class Trainer(EpochEnd, Outputs):
    summary = staticmethod(print_summary)  # Trainer.summary(model, example_input): the Keras-style table
    def __init__(self, config: Optional[C.Config] = None, *, dist: Optional[D.Dist] = None,
                 stop: Optional[Any] = None, **kwargs: Any) -> None:
        self.cfg = config if config is not None else options.from_kwargs(kwargs)
        options.check(self.cfg)  # the Python API has no parent process that checked it
        self._init(dist, stop)

    @classmethod
    def for_rank(cls, cfg: C.Config, dist: D.Dist, stop: Optional[Any]) -> "Trainer":
        """A CLI rank's Trainer: its config was resolved and checked once, in the parent."""
        self = cls.__new__(cls)
        self.cfg = cfg
        self._init(dist, stop)
        return self

    def _init(self, dist: Optional[D.Dist], stop: Optional[Any]) -> None:
        self.dist = dist
        self.stop = stop  # a preempt.StopRequest: stop at an agreed step and checkpoint (SLURM requeue)
        self.preempted = False  # fit() returned early because of a stop request
        self.model: Optional[nn.Module] = None  # the bare module (never the DDP wrapper)
        self.run_dir = Path(self.cfg.run.dir).expanduser().absolute()
        self.run_id = self.cfg.run.id
        self.progress = TrainProgress()
        self.ckpt: Optional[CheckpointManager] = None
        self.parts: Optional[parts.FitParts] = None  # built by fit(); evaluate() after it reuses them
        self.lock: Optional[R.RunLock] = None  # this run dir's, while fit() runs (rank 0)
        self.logger: Any = NullLogger()
        self.bar: Optional[Progress] = None

    # ---- set-up ------------------------------------------------------------------------------------
    def _dist(self) -> D.Dist:
        if self.dist is None and self.cfg.trainer.accelerator == "xla":
            self.dist, _ = xla_init(self.cfg.trainer.dist_timeout_s)
        if self.dist is None:
            # the same device rules as the CLI (gpus unset: one GPU if CUDA is there), in or out of torchrun
            gpus = C.resolve_gpus(self.cfg.trainer, local=True)
            fsdp = self.cfg.trainer.strategy == "fsdp"  # shards over a group, of one rank if need be
            make_deterministic(self.cfg.trainer.deterministic)
            self.dist = (D.init(gpus, self.cfg.trainer.dist_timeout_s, group_of_one=fsdp)
                         if D.env_rank() or gpus or fsdp else D.current())
        return self.dist

    def _prepare_run(self, d: D.Dist) -> None:
        config = C.to_dict(self.cfg) if not self.run_id else None  # a CLI rank's parent wrote it already
        self.run_dir, self.run_id, self.lock, self.unwritable = R.agree_on_run(d, self.run_dir, self.run_id, config)
        self.cfg.run.id, self.cfg.run.dir = self.run_id, str(self.run_dir)
        # a finished run on a read-only filesystem may still be asked whether it is finished
        setup_logging(self.run_dir if self.unwritable is None else None, d.rank)
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        log.info("run %s: rank %d of %d (local rank %d) on node %s, device %s, pid %d", self.run_id, d.rank,
                 d.world_size, d.local_rank, node, d.device, os.getpid(), extra={"file_only": True})

    def _setup(self, model: nn.Module, loss_fn: Callable, optimizer: Any, train_data: Any, val_data: Any,
               metrics: dict[str, Any], scheduler: Any, batch_size: Optional[int]) -> None:
        t, cfg = self.cfg.trainer, self.cfg
        d = self._dist()
        self.progress, self.preempted = TrainProgress(), False  # a second fit() starts over (or resumes)
        check_monitor(t.monitor, list(metrics), has_val=val_data is not None)  # only fit() knows the data
        self._prepare_run(d)
        self.parts = fp = parts.build(t, d, model, loss_fn, optimizer, train_data, val_data, metrics, scheduler,
                                      batch_size)
        self.model = fp.model
        self.stopper = EarlyStopping(t.mode, t.patience, t.min_delta)
        # Everything that must survive a restart, registered once; the manager adds its own retention.
        # Order matters on load: the model before its optimizer, the progress before the per-rank
        # part (which reseeds from the step at another world size).
        self.states: dict[str, Any] = {
            "model": S.ModelState(fp.model, fp.sharded),
            "optimizer": S.OptimizerState(fp.model, fp.optimizer, fp.sharded),
            "scheduler": Maybe(fp.scheduler),
            "hyperparameters": Hyperparameters(fp.optimizer, fp.scheduler),  # after both: see its docstring
            "scaler": fp.prec,
            "loop": self.progress,
            "early_stopping": self.stopper,
            "ranks": PerRank({"train": fp.train_acc}, d,
                             reseed=lambda: seed_everything(t.seed + d.rank + self.progress.step)),
            "data": fp.train,
        }
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint, mode=t.mode, dist=d,
                                      states=self.states, sharded=fp.sharded, xla=fp.xla,
                                      info={"run_id": self.run_id, "config": C.to_dict(cfg)})
        point = restore(self.ckpt, d, self.run_dir, self.cfg.resume)
        if point is not None:
            # another world size: the rest of the epoch is the samples its ranks had not yet seen
            p = self.progress
            p.batch_in_epoch = fp.train.continue_epoch(p.epoch, p.batch_in_epoch)
            drift.log_changes(self.ckpt.restored_config, C.to_dict(cfg))
            log.info("resumed from %s: step %d, epoch %d at batch %d", point, self.progress.step,
                     self.progress.epoch + 1, self.progress.batch_in_epoch)
        else:
            seed_everything(t.seed + d.rank)  # per-rank streams (dropout differs per rank, like torchrun)
        # early stopping is judged by this run's patience, as if it had been set from the start: a
        # run stopped early continues when trainer.patience is raised (or set to 0)
        self.progress.stopped_early = self.stopper.should_stop()
        if self.unwritable is not None and self.should_continue():  # training would write: say why it cannot
            raise faults.io_error(self.unwritable, str(self.run_dir)) or self.unwritable
        if point is not None and self.progress.step > 0 and self.should_continue():
            fp.stepper.settle_buckets(fp.train)  # DDP's buckets as the uninterrupted run has them by now
        # opened once the run is known to go on (a refused resume opens no W&B run; a finished run on
        # a read-only filesystem writes nothing)
        self.logger = open_logger(d.is_main and self.unwritable is None, self.run_dir, cfg.logger,
                                  run_id=self.run_id, run_name=cfg.run.name, config=C.to_dict(cfg),
                                  resumed_at=self.progress.step, monitor=t.monitor)
        self.start_step = self.progress.step
        self.ckpt.retire_after(self.progress.step)
        self.bar = Progress(d.is_main and t.progress, t.progress_refresh_s, fp.speed)
        self._epoch: Optional[Iterator[Any]] = None  # the batches left in the epoch in progress

    # ---- fit: set-up, one loop, teardown -------------------------------------------------------------
    def fit(self, model: nn.Module, loss_fn: Callable, optimizer: Any, train_data: Any, val_data: Any = None,
            metrics: Optional[dict[str, Any]] = None, scheduler: Any = None,
            batch_size: Optional[int] = None) -> History:
        """Train; returns the history (also self.history). Resumes per `resume` (default: auto)."""
        fresh = R.is_new(self.run_dir)  # (a CLI rank's parent has made it: not new)
        set_up = False
        try:
            self._setup(model, loss_fn, optimizer, train_data, val_data, dict(metrics or {}), scheduler, batch_size)
            set_up = True
            if not self.should_continue():
                log.info(self.progress.complete(self.cfg.trainer, self.stopper))
            with D.RollCall().naming_late_ranks(lambda: self.progress.step, self.cfg.trainer.dist_timeout_s):
                while self.should_continue():
                    if self._epoch is None:
                        self._start_epoch()
                    if not self._epoch_done():  # resumed at an epoch's end, or an empty epoch: no step
                        self._train_step()
                        self._after_step()
                    if self._epoch_over():
                        self._end_epoch()
                self._teardown()
        except BaseException as e:  # an error, or a signal (faults.Interrupted): close what is open
            self._abandon()
            user = faults.io_error(e)  # a full disk, a read-only run dir: the user's, one line
            if isinstance(e, C.UserError) or user:
                if fresh and not set_up and self.lock is not None:  # this run's own new dir, nobody else's
                    R.discard(self.run_dir)  # failed before training began: only the logs stay
                if user:
                    raise user from e
            raise
        finally:
            if self.lock is not None:
                self.lock.release(keep_record=self.preempted)  # requeued: the next attempt is this owner
                self.lock = None
        return self.history

    def _abandon(self) -> None:
        """Best effort on the way out of a failed or interrupted fit (what failed is the error the user
        must see, not a second one from here): the bar closed, the loggers finished (W&B's run closed)."""
        try:
            if self.bar is not None:
                self.bar.close()
            if self.ckpt is not None and self.dist is not None and self.dist.is_main:
                self.ckpt.wait()  # a background save in flight: done (or failed) before the lock goes
        except Exception as e:  # noqa: BLE001 - the error in flight is the one to report
            log.warning("the checkpoint in flight failed: %s", C.one_line(e))
        try:
            self.logger.finish(self.progress.history, trained=False, exit_code=1)
        except Exception as e:  # noqa: BLE001 - e.g. the full disk that ended the run
            log.warning("closing the loggers failed: %s", C.one_line(e))

    def should_continue(self) -> bool:
        return not self.preempted and not self._ends_at(self.progress.epoch)

    def _ends_at(self, epochs_done: int) -> bool:
        """The one end rule, asked at every point that must know it: early stopping, max_steps, or
        max_epochs with `epochs_done` complete."""
        p, t = self.progress, self.cfg.trainer
        return p.stopped_early or epochs_done >= t.max_epochs or 0 < t.max_steps <= p.step

    def _epoch_done(self) -> bool:
        return self.progress.batch_in_epoch >= len(self.parts.train)  # type: ignore[union-attr]

    def _train_step(self) -> None:
        """One optimizer step: the micro-batches of one accumulation group (shorter at the epoch's end)."""
        p, t = self.progress, self.cfg.trainer
        n, k = len(self.parts.train), t.accumulate_grad_batches
        start = p.batch_in_epoch - p.batch_in_epoch % k
        end = min(start + k, n)
        group = end - p.batch_in_epoch  # a world-size change may resume between group boundaries
        loss = None
        for i in range(p.batch_in_epoch, end):
            loss = self.parts.stepper.micro(next(self._epoch), last=i + 1 == end, group=group)  # type: ignore[arg-type]
            p.batch_in_epoch += 1
        stepped = self.parts.stepper.step(loss, p.step + 1)  # type: ignore[arg-type]
        p.step += 1
        if stepped and self.parts.scheduler is not None and t.scheduler_interval == "step":
            self.parts.scheduler.step()
        self.parts.speed.tick(p.step)
        self.bar.update(self.parts.train_acc.running_loss_lagged)

    def _start_epoch(self) -> None:
        p, t = self.progress, self.cfg.trainer
        done = p.batch_in_epoch // t.accumulate_grad_batches
        left = math.ceil(len(self.parts.train) / t.accumulate_grad_batches) - done
        total = done + (left if t.max_steps < 0 else min(left, t.max_steps - p.step))
        self.bar.start(f"epoch {p.epoch + 1}/{t.max_epochs}", total, done)
        self.parts.speed.start_epoch(p.step, total - done)
        batches: Any = self.parts.train.epoch(p.epoch, start=p.batch_in_epoch)
        if self.parts.xla is not None:
            batches = self.parts.xla.loader(batches, self.dist.device)  # type: ignore[union-attr]
        self._epoch = iter(batches)

    def _epoch_over(self) -> bool:
        """The epoch ends with its batches, or early where the run ends (not for a requeue: the
        requeued job finishes the epoch)."""
        return not self.preempted and (self._epoch_done() or self._ends_at(self.progress.epoch))

    def _after_step(self) -> None:
        """Step-boundary work: per-step logging, step validation, step checkpoints, stop requests."""
        p, t = self.progress, self.cfg.trainer
        # the epoch's last step (or the run's) is validated and saved once, by _end_epoch
        mid_epoch = not (self._epoch_done() or self._ends_at(p.epoch))
        if t.log_every_n_steps and p.step % t.log_every_n_steps == 0:
            self.logger.log_step(p.step, {"train_loss_step": self.parts.train_acc.running_loss(),
                                          "lr": self.parts.optimizer.param_groups[0]["lr"],
                                          **self.parts.speed.recent()})  # the rate now, not the average
        if t.val_every_n_steps and p.step % t.val_every_n_steps == 0 and mid_epoch and self.parts.val is not None:
            with self.parts.speed.paused():
                values = self._validate()
            self.logger.log_step(p.step, values)
            log.info("validation at step %d: %s", p.step, "  ".join(f"{k}={v:.4g}" for k, v in values.items()
                                                                    if isinstance(v, float)), extra={"file_only": True})
            self._monitor(values)
        if self.ckpt.due_step(p.step) and mid_epoch:  # type: ignore[union-attr]
            with self.parts.speed.paused():
                self._save(None)
        # agreed() is a collective on every rank every step; a stop request at the run's last step
        # is no reason to requeue (every rank agrees: the terms are the same on all of them)
        if self.stop is not None and self.stop.agreed(p.step) and not self._ends_at(p.epoch + (not mid_epoch)):
            self.preempted = True

    def _teardown(self) -> None:
        """A requeue: checkpoint and leave together. The end: last checkpoint, model.pt, plots, W&B."""
        p, ckpt, d = self.progress, self.ckpt, self.dist
        assert ckpt is not None and d is not None
        trained = p.step != self.start_step  # a finished run asked again writes nothing
        self.parts.stepper.check()  # type: ignore[union-attr]  # no bad step unheard of in the last weights
        self.bar.close()
        if self.preempted:  # mid-epoch: no epoch row; the requeued job finishes this epoch
            if ckpt.last_saved_step != p.step:
                self._save(None)
            ckpt.wait()
            D.barrier()  # every rank leaves only once rank 0's checkpoint is on disk
            log.info("stopped at step %d for a requeue (signal %s); checkpoint written", p.step,
                     self.stop.signame if self.stop else "?")
        else:
            if ckpt.cfg.enabled and ckpt.last_saved_step != p.step:
                self._save(None)
            ckpt.wait()
            dest = self.run_dir / "model.pt"
            # the last checkpoint's model.pt holds these very weights: a hard link, no second
            # serialisation (False where there is none: sharded, checkpoints off, another filesystem)
            if not ((trained or not dest.exists()) and ckpt.publish_weights(dest)):
                # every rank gets here alike under FSDP, where full_weights is a collective
                weights = S.full_weights(self.model, self.parts.sharded, d.is_main)  # type: ignore
                if weights is not None and (trained or not dest.exists()):
                    F.save_atomic(weights, dest)  # a kill mid-write must not leave half of it
        ckpt.close()  # the async saves' host buffers (pinned on a GPU) go back
        self.logger.finish(p.history, trained=trained, requeued=self.preempted)
