"""Trainer: fit / evaluate / predict, for the CLI's ranks and the Python API alike.

    history = Trainer(max_epochs=10, monitor="val_loss", patience=5, run_dir="runs/a").fit(
        net, loss_fn, optimizer, train_data, val_data, metrics={"acc": torchmetrics.Accuracy(...)})

fit() is set-up, then one loop (`while self.should_continue(): one optimizer step, then what follows
it`), then teardown. The Trainer owns the loop's state; the run directory is a RunDir (rundir/), the
save decision the checkpoint manager's (maybe_save after each step and at each epoch end); what must
survive a restart is registered once (checkpoint/adapters.run_states)."""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from . import config as C
from .checkpoint import format as F
from .checkpoint.adapters import run_states
from .checkpoint.manager import CheckpointManager
from .checkpoint.restore import restore
from .config import faults, keywords
from .device import dist as D
from .device.world import world_for
from .fit import ledger, parts
from .fit.callbacks import Callbacks, RunView
from .observe.built_ins import built_ins, goodput
from .fit.spike import SpikeGuard
from .fit.evaluation import evaluate, outside_fit, predict
from .fit.metrics import Accumulator
from .fit.seeding import seed_everything
from .fit.state import History, TrainProgress
from .fit.validation import Validation
from .launch.api_world import form as form_world
from .launch.recipe import check_monitor
from .observe.loggers import NullLogger, open_logger, report_epoch, setup_logging
from .observe.progress import Progress
from .observe.summary import print_summary
from .rundir import drift
from .rundir.files import restarted, results
from .rundir.run_dir import RunDir

log = logging.getLogger("launcher")


class Trainer:
    summary = staticmethod(print_summary)  # Trainer.summary(model, example_input): the Keras-style table

    def __init__(self, config: Optional[C.Config] = None, *, dist: Optional[D.Dist] = None,
                 stop: Optional[Any] = None, **kwargs: Any) -> None:
        self.cfg, self.api = (config if config is not None else keywords.from_kwargs(kwargs)), True
        keywords.check(self.cfg)  # the Python API has no parent process that checked it
        self._init(dist, stop)

    @classmethod
    def for_rank(cls, cfg: C.Config, dist: D.Dist, stop: Optional[Any]) -> "Trainer":
        """A CLI rank's Trainer: its config was resolved and checked once, in the parent."""
        self = cls.__new__(cls)
        self.cfg, self.api = cfg, False  # not the API's: the CLI's parent prints `launcher: done: RUN_DIR (...)`
        self._init(dist, stop)
        return self

    def _init(self, dist: Optional[D.Dist], stop: Optional[Any]) -> None:
        self.dist, self.stop = dist, stop  # stop: launch.preempt.StopRequest (stop at an agreed step, checkpoint)
        self.preempted = False  # fit() returned early because of a stop request
        self.monitor_given = self.cfg.trainer.monitor  # "" follows the data: each fit() resolves it anew
        self.model: Optional[nn.Module] = None  # the bare module (never the DDP wrapper)
        self.run: Optional[RunDir] = None  # claimed (or joined) by each fit(); its lock held while fit() runs
        self.progress = TrainProgress()
        self.ckpt: Optional[CheckpointManager] = None
        self.parts: Optional[parts.FitParts] = None  # built by fit(); evaluate() after it reuses them
        self.logger: Any = NullLogger()
        self.bar: Optional[Progress] = None

    @property
    def run_dir(self) -> Path:
        return self.run.path if self.run is not None else Path(self.cfg.run.dir).expanduser().absolute()

    # ---- set-up ------------------------------------------------------------------------------------
    def _dist(self) -> D.Dist:
        if self.dist is None:
            self.dist = world_for(form_world(self.cfg.trainer))  # torchrun's, srun's, or ranks it starts
        return self.dist

    def _setup(self, model: nn.Module, loss_fn: Optional[Callable], optimizer: Any, train_data: Any, val_data: Any,
               metrics: dict[str, Any], scheduler: Any, batch_size: Optional[int], step: Any, callbacks: Any) -> None:
        t, cfg = self.cfg.trainer, self.cfg
        d = self._dist()
        self.progress, self.preempted = TrainProgress(), False  # a second fit() starts over (or resumes)
        t.monitor = check_monitor(self.monitor_given, list(metrics), has_val=val_data is not None)  # only fit() knows the data
        run = self.run = RunDir.join(d, self.run_dir, self.cfg.run.id, C.to_dict(self.cfg))
        # a finished run on a read-only filesystem may still be asked whether it is finished
        setup_logging(run.path if run.unwritable is None else None, d.rank)
        log.info("run %s: rank %d of %d (local rank %d) on node %s, device %s, pid %d", run.id, d.rank, d.world_size,
                 d.local_rank, os.environ.get("SLURMD_NODENAME") or socket.gethostname(), d.device, os.getpid(),
                 extra={"file_only": True})
        self.parts = fp = parts.build(t, d, model, loss_fn, optimizer, train_data, val_data, metrics, scheduler,
                                      batch_size, step)
        self.model = fp.model
        self.callbacks = cbs = Callbacks(built_ins(callbacks, t), RunView(self))
        self.validation = Validation(t, fp, d.device, cbs)
        self.stopper = self.validation.stopper
        self.ledger = ledger.Ledger(t, d, fp.train, self.progress, run.path)  # which samples each epoch trained
        self.spikes = SpikeGuard(t, d, fp.train_acc, fp.train)  # loss-spike rollback (trainer.spike_factor)
        states = run_states(fp, self.progress, self.stopper, d, self.ledger, lambda: seed_everything(
            t.seed + fp.train.dist.rank + self.progress.step), cbs.stateful(), self.spikes)
        self.ckpt = CheckpointManager(run.path / "checkpoints", cfg.checkpoint, mode=t.mode, dist=d, states=states,
                                      sharded=fp.sharded, xla=fp.xla, info={"run_id": run.id, "config": run.config},
                                      **cbs.around_saves(fp.stepper.check))
        point = restore(self.ckpt, d, lambda below: run.resume_point(d, cfg.resume, below), cfg.resume, restarted())
        if point is not None:  # (at another world size: the rest of the epoch is the samples not yet seen)
            p = self.progress
            p.batch_in_epoch = fp.train.continue_epoch(p.epoch, p.batch_in_epoch)
            drift.log_changes(self.ckpt.restored_config, run.config)
            log.info("resumed from %s: step %d, epoch %d at batch %d", point, p.step, p.epoch + 1, p.batch_in_epoch)
        else:
            seed_everything(t.seed + fp.train.dist.rank)  # per data rank (dropout differs per rank, not per tp peer)
        # judged by this run's patience as if set from the start: raising it continues a run stopped early
        self.progress.stopped_early = self.stopper.should_stop()
        if run.unwritable is not None and self.should_continue():  # training would write: say why it cannot
            raise faults.io_error(run.unwritable, str(run.path)) or run.unwritable
        if point is not None and self.progress.step > 0 and self.should_continue():
            fp.stepper.settle_buckets(fp.train)  # DDP's buckets as the uninterrupted run has them by now
        # opened once the run goes on (a refused resume opens no W&B run; a finished read-only run writes nothing)
        self.logger = open_logger(d.is_main and run.unwritable is None, run.path, cfg.logger, run_id=run.id,
                                  run_name=cfg.run.name, config=run.config or {}, resumed_at=self.progress.step,
                                  monitor=t.monitor)
        self.start_step = self.progress.step
        self.ckpt.retire_after(self.progress.step)
        self.bar = Progress(d.is_main and t.progress, t.progress_refresh_s, fp.speed)
        self._epoch: Optional[Iterator[Any]] = None  # the batches left in the epoch in progress
        cbs.start(point)  # on_checkpoint_restored (a resumed run), on_fit_start

    # ---- fit: set-up, one loop, teardown -------------------------------------------------------------
    def fit(self, model: nn.Module, loss_fn: Optional[Callable] = None, optimizer: Any = None, train_data: Any = None,
            val_data: Any = None, metrics: Optional[dict[str, Any]] = None, scheduler: Any = None,
            batch_size: Optional[int] = None, step: Any = None, callbacks: Optional[list[Any]] = None) -> History:
        """Train; returns the history (also self.history). Resumes per `resume` (default: auto). `step`: what
        one micro-batch makes (launcher.StepOutput; "supervised" by default, "dict_batch", "model_loss" or a
        callable step(model, batch)); loss_fn only where the step uses one; `callbacks`: launcher.Callback."""
        self.run, self.callbacks = None, Callbacks(None, RunView(self))
        try:
            self._setup(model, loss_fn, optimizer, train_data, val_data, dict(metrics or {}), scheduler, batch_size,
                        step, callbacks)
            with D.RollCall().naming_late_ranks(lambda: self.progress.step, self.cfg.trainer.dist_timeout_s):
                while self.should_continue():
                    if self._epoch is None:
                        self._start_epoch()
                    # no step: resumed at an epoch's end, an empty epoch; or a loss spike rolled the run back
                    trained = not self._epoch_done() and self._train_step()
                    # the end rule, once per step: are the epoch's batches done, does the run end here?
                    epoch_done = self._epoch_done()
                    run_ends = self.progress.ends(self.cfg.trainer, self.progress.epoch + epoch_done)
                    if trained:
                        self._after_step(mid_epoch=not (epoch_done or run_ends), run_ends=run_ends)
                    if not self.preempted and (epoch_done or run_ends):  # (requeued: the next job ends it)
                        self._end_epoch(partial=not epoch_done, last=run_ends)
                self._teardown()
        except BaseException as e:  # an error, or a signal (faults.Interrupted): close what is open
            self.callbacks.fire("on_error", e)
            self._abandon()
            user = faults.io_error(e)  # a full disk, a read-only run dir: the user's, one line
            if (isinstance(e, C.UserError) or user) and self.run is not None:
                self.run.abandon()  # this fit's own new run dir, nothing committed: only the logs stay
            if user:
                raise user from e
            raise
        finally:
            parts.close(self.parts)  # persistent loader workers end with fit(), before the lock they share goes
            if self.run is not None:
                self.run.release(keep_record=self.preempted)  # requeued: the next attempt is this owner
        return self.history

    def _abandon(self) -> None:
        """Best effort on the way out of a failed fit (the error in flight is the one to report)."""
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
        return not self.preempted and not self.progress.ends(self.cfg.trainer, self.progress.epoch)

    def _epoch_done(self) -> bool:  # (a stream learns its end by agreement: fit/stream.py)
        return self.parts.train.done(self.progress.batch_in_epoch)  # type: ignore[union-attr]

    def _start_epoch(self) -> None:
        p, t, fp = self.progress, self.cfg.trainer, self.parts
        done, total = p.steps_total(t, fp.train.steps_in_epoch(t.accumulate_grad_batches))  # type: ignore
        self.bar.start(f"epoch {p.epoch + 1}/{t.max_epochs}", total, done)  # type: ignore[union-attr]
        fp.speed.start_epoch(p.step, None if total is None else total - done)  # type: ignore[union-attr]
        batches: Any = fp.train.epoch(p.epoch, start=p.batch_in_epoch)  # type: ignore[union-attr]
        if fp.xla is not None:  # type: ignore[union-attr]
            batches = fp.xla.loader(batches, self.dist.device)  # type: ignore[union-attr]
        self._epoch = fp.phases.batches(iter(batches))  # type: ignore[union-attr]  # its next(): data wait

    def _train_step(self) -> bool:
        """One optimizer step (an accumulation group's micro-batches); False: its loss spiked (fit/spike.py)."""
        p, t, fp = self.progress, self.cfg.trainer, self.parts
        self.spikes.begin(p.batch_in_epoch)
        end = fp.train.group_end(p.batch_in_epoch, t.accumulate_grad_batches)  # type: ignore[union-attr]
        group = end - p.batch_in_epoch  # a world-size change may resume between group boundaries
        loss = None
        for i in range(p.batch_in_epoch, end):
            loss = fp.stepper.micro(next(self._epoch), last=i + 1 == end, group=group)  # type: ignore
            p.batch_in_epoch += 1
        stepped = fp.stepper.step(loss, p.step + 1)  # type: ignore
        p.step += 1
        if stepped and fp.scheduler is not None and t.scheduler_interval == "step":  # type: ignore[union-attr]
            fp.scheduler.step()  # type: ignore[union-attr]
        if self.spikes.rolled_back(p, self.run, self.ckpt, self.callbacks):  # (without the spike's batches)
            self._epoch = None
            return False
        fp.speed.tick(p.step)  # type: ignore[union-attr]
        self.bar.update(fp.train_acc.running_loss_lagged)  # type: ignore
        return True

    def _after_step(self, mid_epoch: bool, run_ends: bool) -> None:
        """Step-boundary work: per-step logging, step validation, step checkpoints, stop requests. The
        epoch's last step (or the run's) is validated and saved once, by _end_epoch."""
        p, t, fp = self.progress, self.cfg.trainer, self.parts
        assert fp is not None and self.ckpt is not None
        self.callbacks.fire("on_step_end")
        if t.log_every_n_steps and p.step % t.log_every_n_steps == 0:
            self.logger.log_step(p.step, {"train_loss_step": fp.train_acc.running_loss(),
                                          "lr": fp.optimizer.param_groups[0]["lr"],
                                          **fp.speed.recent(), **fp.phases.row()})  # the rate now, not the average
        if t.val_every_n_steps and p.step % t.val_every_n_steps == 0 and mid_epoch and fp.val is not None:
            with fp.speed.paused():
                values = self.validation.run()
            self.logger.log_step(p.step, values)
            log.info("validation at step %d: %s", p.step, "  ".join(f"{k}={v:.4g}" for k, v in values.items()
                                                                    if isinstance(v, float)), extra={"file_only": True})
            self._monitor(values)
        if mid_epoch:
            fp.speed.exclude(fp.phases.add("checkpoint", self.ckpt.maybe_save(p.step, p.epoch, "step")))
        # agreed() is a collective on every rank every step; a stop request at the run's last step
        # is no reason to requeue (every rank agrees: the terms are the same on all of them)
        if self.stop is not None and self.stop.agreed(p.step) and not run_ends:
            self.preempted = True

    def _monitor(self, values: dict[str, float]) -> Optional[float]:
        """The monitored value in `values` (None if absent), fed to early stopping."""
        value, stop = self.validation.judge(values)
        self.progress.stopped_early = self.progress.stopped_early or stop
        return value

    def _end_epoch(self, partial: bool, last: bool) -> None:
        """Sync the epoch's metrics, validate, log, step schedulers and early stopping, maybe save.

        A run that ends inside an epoch (`partial`: max_steps, or early stopping at a step validation)
        reports it too (a row for the part trained), but the epoch stays open: its position, running
        metrics and the loop's state are checkpointed as they are, and a run continued with a larger
        limit finishes that very epoch, bitwise as if never stopped (the partial row is then replaced
        by the whole epoch's). `last`: the run ends here (validated whatever val_every_n_epochs says)."""
        p, t, fp = self.progress, self.cfg.trainer, self.parts
        assert fp is not None and self.ckpt is not None
        fp.stepper.check()  # every rank at the same step: the guard's collective is safe here
        speed = fp.speed.end_epoch(p.step)
        row: dict[str, Any] = {"epoch": p.epoch + 1, "step": p.step, "lr": fp.optimizer.param_groups[0]["lr"]}
        row.update(fp.train_acc.compute("train"))
        if fp.val is not None and ((p.epoch + 1) % t.val_every_n_epochs == 0 or last):
            row.update(self.validation.run())
        # a partial epoch's validation reaches neither early stopping nor the scheduler (their state
        # would differ from a run that never stopped there); it may still rank the checkpoint
        score = (row.get(t.monitor) if partial else self._monitor(row)) if t.monitor in row else None
        if t.scheduler_interval == "epoch" and not partial:
            fp.epoch_scheduler_step(score)
        p.record(row)
        report_epoch(self.logger, p, row, speed, self.dist.is_main, partial, t.progress, fp.phases)  # type: ignore
        if not partial:  # (a run ending inside the epoch reports its row so far, but the epoch goes on)
            self.callbacks.fire("on_epoch_end", row)
        self.ledger.end_epoch(p.step, partial)  # before the position moves on: the epoch's counts
        self._epoch = None
        score = score if isinstance(score, float) and not math.isnan(score) else None
        if not partial:  # (partial: the run ends here, and its checkpoint is this exact position)
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
            fp.train_acc.reset()
        fp.phases.add("checkpoint", self.ckpt.maybe_save(p.step, p.epoch, "partial_epoch" if partial else "epoch", score))
        self.bar.close({**row, **speed})  # type: ignore[union-attr]

    def _teardown(self) -> None:
        """A requeue: checkpoint and leave together. The end: last checkpoint, model.pt, plots, W&B."""
        p, ckpt, d, fp = self.progress, self.ckpt, self.dist, self.parts
        assert ckpt is not None and d is not None and fp is not None and self.run is not None
        trained = p.step != self.start_step  # a finished run asked again writes nothing
        fp.stepper.check()  # no bad step unheard of in the last weights
        self.bar.close()  # type: ignore[union-attr]
        fp.phases.add("checkpoint", ckpt.maybe_save(p.step, p.epoch, "requeue" if self.preempted else "end"))
        ckpt.settle()  # (an async save: written, and on_checkpoint_saved told of it)
        if self.preempted:  # mid-epoch: no epoch row; the requeued job finishes this epoch
            D.barrier()  # every rank leaves only once rank 0's checkpoint is on disk
            log.info("stopped at step %d for a requeue (signal %s); checkpoint written", p.step,
                     self.stop.signame if self.stop else "?")
        else:
            ckpt.final_weights(self.run.path / "model.pt", self.model, trained)
        ckpt.close()  # the async saves' host buffers (pinned on a GPU) go back
        self.logger.log_step(p.step, goodput.close(self.callbacks.callbacks, self.preempted))  # to the trackers
        self.logger.finish(p.history, trained=trained, requeued=self.preempted)
        if not self.preempted:  # what ended the run; the Python API also says where its results are
            log.info(p.complete(self.cfg.trainer, self.stopper, trained, results(self.run.path) if self.api else ""))
        self.callbacks.fire("on_fit_end")

    # ---- what fit() leaves behind, and evaluation / predictions with or without it -------------------
    history = property(lambda self: History(self.progress.history))

    @property
    def best_checkpoint(self) -> Optional[Path]:
        return self.ckpt.best[1] if self.ckpt is not None and self.ckpt.best else None

    @property
    def best_score(self) -> Optional[float]:
        return self.ckpt.best[0] if self.ckpt is not None and self.ckpt.best else None

    def evaluate(self, data: Any, model: Optional[nn.Module] = None, loss_fn: Optional[Callable] = None,
                 metrics: Optional[dict[str, Any]] = None, batch_size: Optional[int] = None,
                 prefix: str = "test", step: Any = None) -> dict[str, float]:
        """<prefix>_loss, <prefix>_<metric> (test_* unless named; fit's are val_*): each sample once, all ranks.
        What is not given is the fit's (its model, step, loss and metrics)."""
        d = self._dist()
        o = outside_fit(self.cfg.trainer, d, self.parts, data, batch_size, model, loss_fn, step, "evaluate")
        metrics = (self.parts.metrics if self.parts is not None else {}) if metrics is None else metrics
        acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
        return evaluate(o.model, o.step, o.batches, acc, d.device, o.prec, o.lockstep, prefix)

    def predict(self, data: Any, model: Optional[nn.Module] = None, batch_size: Optional[int] = None,
                step: Any = None) -> Optional[torch.Tensor]:
        """The step's outputs (the model's by default) for every sample, in dataset order, on rank 0 (else None)."""
        d = self._dist()
        o = outside_fit(self.cfg.trainer, d, self.parts, data, batch_size, model, None, step, "predict")
        return predict(o.model, o.step, o.batches, d, o.prec, o.lockstep)

    def load_best(self) -> nn.Module:
        """Load the best checkpoint's weights into the model and return it."""
        if self.best_checkpoint is None or self.model is None:
            raise RuntimeError("no best checkpoint: fit with checkpointing and a validated monitor first")
        if F.is_sharded(self.best_checkpoint):
            raise RuntimeError(f"{self.best_checkpoint} is sharded (FSDP): load it with "
                               "launcher.checkpoint.export_model(path, out) or resume=PATH")
        self.model.load_state_dict(F.load_weights(self.best_checkpoint))  # model.pt alone, not the optimizer
        return self.model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bare model's weights (no DDP 'module.' prefix)."""
        assert self.model is not None, "fit() first"
        return self.model.state_dict()