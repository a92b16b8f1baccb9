"""The training loop of one fit() call: micro-batches, optimizer steps, epoch ends, validation.

One loop (DESIGN.md habit 7): for each micro-batch forward/backward (gradients all-reduced only on
the last of an accumulation group); after the last, unscale, clip, the non-finite guard and the
optimizer step; then maybe validate, checkpoint, or stop for a requeue. The step path holds no
host sync except the guard's one flag (trainer.nonfinite=off removes it) and the progress bar's
loss read at its refresh rate. Each epoch ends with one row of metrics synced over ranks.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from torch import nn

from . import checkpoint as ckpt
from . import config as C
from . import dist as D
from . import snapshot
from . import strategy as S
from .data import Batches, batch_size_of, to_device
from .loggers import NullLogger, RunLogger
from .precision import Precision
from .progress import Progress, Speed
from .saver import Saver
from .state import Accumulator, EarlyStopping, TrainState

if TYPE_CHECKING:
    from .fit import Trainer

log = logging.getLogger("launcher")


def forward_all(model: nn.Module, batches: Batches, device: torch.device, prec: Precision,
                lockstep: bool) -> Iterator[tuple[Any, Any, bool]]:
    """(batch on device, outputs, real) over this rank's evaluation shard, without gradients.

    Under FSDP every forward is a collective (parameters are gathered), so ranks with fewer eval
    batches repeat one and discard it (real=False) until the rank with the most is done.
    """
    own = len(batches)
    most = math.ceil(math.ceil(batches.n / batches.dist.world_size) / batches.batch_size) if lockstep else own
    was_training = model.training
    model.eval()
    first = None
    with torch.no_grad():
        for i, batch in enumerate(batches.epoch(0)):
            batch = to_device(batch, device)
            first = batch if first is None else first
            yield batch, _forward(model, batch, prec), True
        for _ in range(most - own):
            first = first if first is not None else to_device(batches.head(), device)
            _forward(model, first, prec)
    model.train(was_training)


def _forward(model: nn.Module, batch: Any, prec: Precision) -> Any:
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    with prec.autocast():
        return model(prec.prepare_input(x))


def evaluate(model: nn.Module, loss_fn: Callable, batches: Batches, acc: Accumulator, device: torch.device,
             prec: Precision, lockstep: bool = False) -> dict[str, float]:
    # The bare module, not DDP: ranks hold different numbers of eval batches, and DDP's forward
    # would start a collective (buffer broadcast) per batch and hang the ranks that ran out.
    acc.reset()
    for (_, y), out, _real in forward_all(model, batches, device, prec, lockstep):
        with prec.autocast():
            loss = loss_fn(out, y)
        acc.update(loss.float(), batch_size_of(y), out, y)
    return acc.compute("val")


class Loop:
    """The loop and its state for one fit() call."""

    def __init__(self, tr: "Trainer", net: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                 scheduler: Any, train: Batches, val: Optional[Batches], metrics: dict[str, Any], d: D.Dist,
                 strategy: str, prec: Precision) -> None:
        cfg = tr.cfg
        self.tr, self.t, self.net, self.loss_fn, self.opt, self.sched = tr, cfg.trainer, net, loss_fn, optimizer, scheduler
        self.train, self.val, self.d, self.strategy, self.prec = train, val, d, strategy, prec
        self.sharded = strategy == "fsdp"
        self.xla = None
        if self.t.accelerator == "xla":
            from .xla import XLA

            self.xla = XLA()
        self.k = self.t.accumulate_grad_batches
        # in-memory tensors already where the model is: no per-step device check (the fast path)
        self.data_on_device = train.tensors is not None and all(t.device == d.device for t in train.tensors)
        self.params = [p for p in tr.model.parameters() if p.requires_grad]  # type: ignore[union-attr]
        self.metric_protos = metrics
        self.train_acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
        self.val_acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
        self.state = TrainState()
        self.stop = tr.stop
        self.preempted = False
        self.skipped_steps = 0
        self.first_step_logged = False
        self.stopper = EarlyStopping(self.t.mode, self.t.patience, self.t.min_delta)
        self.ckpt = ckpt.Checkpointer(tr.run_dir / "checkpoints", enabled=cfg.checkpoint.enabled,
                                      every_n_epochs=cfg.checkpoint.every_n_epochs,
                                      every_n_steps=cfg.checkpoint.every_n_steps,
                                      save_top_k=cfg.checkpoint.save_top_k, mode=self.t.mode,
                                      keep_last=cfg.checkpoint.keep_last)
        self.saver = Saver(self.ckpt, d, sharded=self.sharded, background=cfg.checkpoint.async_save, xla=self.xla)
        self.speed = Speed.of(tr.model, samples_per_step=train.batch_size * self.k * d.world_size,  # type: ignore[arg-type]
                              world_size=d.world_size, device=d.device, peak_tflops=self.t.peak_tflops)
        lg = cfg.logger
        self.logger: Any = NullLogger()
        if d.is_main:
            self.ckpt.clean_temp()
            if lg.name != "none":
                self.logger = RunLogger(tr.run_dir, name=cfg.run.name or tr.run_dir.name, run_id=tr.run_id,
                                        config=C.to_dict(cfg), wandb=vars(lg) if lg.name == "wandb" else None,
                                        plots=lg.plots)
        tr._loop = self  # evaluate() after fit() reuses the loss and metrics

    # ---- checkpoints --------------------------------------------------------------------------------
    def save(self, score: Optional[float]) -> None:
        t0 = time.perf_counter()
        snapshot.save(self, score)
        log.info("checkpoint at step %d: training blocked %.3f s", self.state.step, time.perf_counter() - t0,
                 extra={"file_only": True})
        self._publish_best()

    def _publish_best(self) -> None:
        if self.ckpt.best:
            self.tr.best_score, self.tr.best_checkpoint = self.ckpt.best

    def validate(self) -> dict[str, float]:
        return evaluate(self.tr.model, self.loss_fn, self.val, self.val_acc, self.d.device,  # type: ignore[arg-type]
                        self.prec, lockstep=self.sharded)

    # ---- the loop ----------------------------------------------------------------------------------
    def done(self) -> bool:
        s, t = self.state, self.t
        return s.stopped_early or s.epoch >= t.max_epochs or (t.max_steps > 0 and s.step >= t.max_steps)

    def run(self) -> None:
        self.heartbeat = D.Heartbeat()
        try:
            self._run()
        except RuntimeError as e:
            if not D.is_timeout(e):
                raise
            late = self.heartbeat.missing(self.state.step)
            raise RuntimeError(f"a collective timed out after trainer.dist_timeout_s={self.t.dist_timeout_s:g} s "
                               f"at step {self.state.step} on rank {self.d.rank}: "
                               f"{late + ' did not arrive' if late else 'the other ranks did not arrive'}") from e

    def _run(self) -> None:
        s, t = self.state, self.t
        n_batches = len(self.train)
        steps_per_epoch = math.ceil(n_batches / self.k)
        progress = Progress(self.d.is_main and t.progress, t.progress_refresh_s, self.speed)
        while not self.done():
            done_steps = s.batch_in_epoch // self.k
            total = steps_per_epoch if t.max_steps < 0 else min(steps_per_epoch, done_steps + t.max_steps - s.step)
            progress.start(f"epoch {s.epoch + 1}/{t.max_epochs}", total, done_steps)
            self.speed.start_epoch(s.step)
            batches = self.train.epoch(s.epoch, start=s.batch_in_epoch)
            if self.xla is not None:
                batches = self.xla.loader(batches, self.d.device)  # host->device copies in the background
            for batch in batches:
                group_start = s.batch_in_epoch - s.batch_in_epoch % self.k
                group_end = min(group_start + self.k, n_batches)  # the epoch's last group may be short
                if not self.micro_step(batch, last=s.batch_in_epoch + 1 == group_end, group=group_end - group_start):
                    continue
                progress.update(self.train_acc.running_loss)
                self.heartbeat.beat(s.step)
                if self.after_step(last_of_epoch=s.batch_in_epoch >= n_batches):
                    break
            if self.preempted:  # mid-epoch: no epoch row; the requeued job finishes this epoch
                progress.close()
                if self.ckpt.last_saved_step != s.step:
                    self.save(None)
                self.saver.wait()
                D.barrier()  # every rank leaves only once rank 0's checkpoint is on disk
                log.info("stopped at step %d for a requeue (signal %s); checkpoint written", s.step,
                         self.stop.signame if self.stop else "?")
                self.logger.finish(self.tr.history)
                return
            progress.close(self.end_epoch())
        if self.ckpt.enabled and self.ckpt.last_saved_step != s.step:
            self.save(None)
        self.saver.wait()
        self._publish_best()
        weights = snapshot.final_weights(self)
        if weights is not None:
            torch.save(weights, self.tr.run_dir / "model.pt")
        self.logger.finish(self.tr.history)

    def after_step(self, last_of_epoch: bool) -> bool:
        """Step-boundary work: logging, step validation, checkpoint, stop checks. True = leave the epoch."""
        s, t = self.state, self.t
        if t.log_every_n_steps and s.step % t.log_every_n_steps == 0:
            self.logger.log_step(s.step, {"train_loss_step": self.train_acc.running_loss(),
                                          "lr": self.opt.param_groups[0]["lr"]})
        if t.val_every_n_steps and s.step % t.val_every_n_steps == 0 and not last_of_epoch and self.val is not None:
            with self.speed.paused():
                values = self.validate()
            self.logger.log_step(s.step, values)
            log.info("validation at step %d: %s", s.step, "  ".join(f"{k}={v:.4g}" for k, v in values.items()
                                                                    if isinstance(v, float)), extra={"file_only": True})
            self.monitor(values)
        if self.ckpt.due_step(s.step) and not last_of_epoch:
            with self.speed.paused():
                self.save(None)
        finishing = s.stopped_early or (t.max_steps > 0 and s.step >= t.max_steps) or \
            (last_of_epoch and s.epoch + 1 >= t.max_epochs)
        # a stop request at the run's last step is no reason to requeue (every rank agrees: the
        # terms are the same on all of them, and agreed() is called on all of them)
        if self.stop is not None and self.stop.agreed(s.step) and not finishing:
            self.preempted = True
            return True
        return s.stopped_early or (t.max_steps > 0 and s.step >= t.max_steps)

    def micro_step(self, batch: Any, last: bool, group: int) -> bool:
        """Forward and backward of one micro-batch; the optimizer step after the group's last."""
        x, y = batch if self.data_on_device else to_device(batch, self.d.device)
        x = self.prec.prepare_input(x)
        if self.t.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with S.no_sync(self.net, self.strategy, skip=not last):
            with self.prec.autocast():
                out = self.net(x)
                loss = self.loss_fn(out, y)
            # mean over the group's samples, as one batch of the whole group would give
            self.prec.backward(loss / group if group > 1 else loss)
        self.train_acc.update(loss.float(), y.shape[0] if isinstance(y, torch.Tensor) else batch_size_of(y),
                              out.detach(), y)
        self.state.batch_in_epoch += 1
        if last:
            self.optimizer_step(loss)
        return last

    def optimizer_step(self, loss: torch.Tensor) -> None:
        s, t = self.state, self.t
        if self.xla is not None:
            self.xla.reduce_gradients(self.opt)  # global gradients before clipping and the guard
        self.prec.unscale(self.opt)
        norm = S.grad_norm(self.params, t.gradient_clip_val) if t.gradient_clip_val > 0 else None
        # 16-mixed: the GradScaler skips inf/nan steps itself (and lowers its scale)
        if t.nonfinite != "off" and self.prec.scaler is None:
            finite = bool(torch.isfinite(norm)) if norm is not None else S.grads_finite(self.params, self.strategy)
            if not finite:
                self.nonfinite(loss, norm)  # raises unless trainer.nonfinite=skip
                self.opt.zero_grad(set_to_none=True)
                s.step += 1
                return
        self.prec.step(self.opt)
        if self.xla is not None:
            self.xla.mark_step()  # cut and run the step's lazy graph
        self.opt.zero_grad(set_to_none=True)
        s.step += 1
        if not self.first_step_logged:  # startup latency: bench/startup.py reads this line
            self.first_step_logged = True
            log.info("first optimizer step done at unix time %.3f", time.time(), extra={"file_only": True})
        if self.sched is not None and t.scheduler_interval == "step":
            self.sched.step()

    def nonfinite(self, loss: torch.Tensor, norm: Optional[torch.Tensor]) -> None:
        """Name the step and the rank(s) whose loss went bad (the norm is global: all ranks get here)."""
        losses = D.all_gather_object(float(loss.detach().float()))
        bad = [r for r, v in enumerate(losses) if not math.isfinite(v)]
        where = f"rank(s) {bad} (loss {[losses[r] for r in bad]})" if bad else \
            f"every rank's loss is finite, not every gradient{f' (norm {float(norm)})' if norm is not None else ''}"
        msg = f"non-finite loss or gradient norm at step {self.state.step + 1}: {where}"
        if self.t.nonfinite == "error":
            raise FloatingPointError(f"{msg}; the optimizer did not step (trainer.nonfinite=skip skips such steps)")
        self.skipped_steps += 1
        log.warning("%s; step skipped (%d so far)", msg, self.skipped_steps)

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
        speed = self.speed.end_epoch(s.step)
        row: dict[str, Any] = {"epoch": s.epoch + 1, "step": s.step, "lr": self.opt.param_groups[0]["lr"]}
        row.update(self.train_acc.compute("train"))
        last = s.stopped_early or s.epoch + 1 >= t.max_epochs or (t.max_steps > 0 and s.step >= t.max_steps)
        if self.val is not None and ((s.epoch + 1) % t.val_every_n_epochs == 0 or last):
            row.update(self.validate())
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
        self.logger.log_step(s.step, speed)  # throughput: logs and W&B, not the (deterministic) history
        if self.d.is_main:
            text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in {**row, **speed}.items() if k != "epoch")
            log.info("epoch %d: %s", row["epoch"], text, extra={"file_only": t.progress})
        s.epoch += 1
        s.batch_in_epoch = 0
        self.train_acc.reset()
        if self.ckpt.due_epoch(s.epoch) or self.ckpt.due_step(s.step):
            self.save(score if score is not None and not math.isnan(score) else None)
        return {**row, **speed}
