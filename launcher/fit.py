"""Trainer: the one fit / evaluate / predict loop, for the CLI workers and the Python API alike.

    history = Trainer(max_epochs=10, monitor="val_loss", patience=5, run_dir="runs/a").fit(
        net, loss_fn, optimizer, train_data, val_data, metrics={"acc": torchmetrics.Accuracy(...)})

Per step: forward, backward, optimizer step, metric update, nothing that waits on the device
except the progress bar at its refresh rate. At step and epoch boundaries: validation,
checkpoints, early stopping, the history row. All state that a restart needs is in the checkpoint.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import checkpoint as ckpt
from . import config as C
from . import dist as D
from . import run as R
from .data import Batches, batch_size_of, to_device
from .loggers import NullLogger, RunLogger, setup_logging
from .progress import Progress
from .state import Accumulator, EarlyStopping, TrainState, rank_state, seed_everything, set_rng_state

log = logging.getLogger("launcher")


class History(list):
    """One dict per epoch (epoch, step, lr, train_*, val_*); `.df` is the same as a pandas DataFrame."""

    @property
    def df(self) -> Any:
        import pandas as pd

        return pd.DataFrame(list(self))


def _config_from_kwargs(kwargs: dict[str, Any]) -> C.Config:
    """Trainer(max_epochs=.., checkpoint_every_n_steps=.., logger="wandb", run_dir=..) -> Config."""
    cfg = C.Config()
    cfg.logger.name = "csv"
    aliases = {"run_dir": ("run", "dir"), "run_id": ("run", "id"), "run_name": ("run", "name"),
               "logger": ("logger", "name")}
    for section, cls in C.SECTIONS.items():
        for f in cls.__dataclass_fields__:
            aliases.setdefault(f if section == "trainer" else f"{section}_{f}", (section, f))
    for key, value in kwargs.items():
        if key == "resume":
            cfg.resume = str(value)
        elif key in aliases:
            section, name = aliases[key]
            setattr(getattr(cfg, section), name, value)
        else:
            raise TypeError(f"Trainer got an unknown argument {key!r}; valid: resume, {', '.join(sorted(aliases))}")
    if "run_dir" not in kwargs:
        cfg.run.dir = time.strftime("runs/%Y-%m-%d_%H-%M-%S")
    return cfg


class Trainer:
    def __init__(self, config: Optional[C.Config] = None, *, dist: Optional[D.Dist] = None, **kwargs: Any) -> None:
        self.cfg = config if config is not None else _config_from_kwargs(kwargs)
        C.check_trainer(self.cfg.trainer)
        C.check_checkpoint(self.cfg.checkpoint)
        C.check_logger(self.cfg.logger)
        C.check_resume(self.cfg.resume)
        self.dist = dist
        self.model: Optional[nn.Module] = None  # the bare module (never the DDP wrapper)
        self.history = History()
        self.best_checkpoint: Optional[Path] = None
        self.best_score: Optional[float] = None
        self.run_dir = Path(self.cfg.run.dir).expanduser().absolute()
        self.run_id = self.cfg.run.id
        self._loop: Optional[_Loop] = None

    # ---- set-up -----------------------------------------------------------------------------------
    def _dist(self) -> D.Dist:
        if self.dist is None:
            self.dist = D.init(int(self.cfg.trainer.gpus or 0), self.cfg.trainer.dist_timeout_s) \
                if D.env_rank() else D.current()
        return self.dist

    def _prepare_run(self, d: D.Dist) -> None:
        """Run dir and id agreed by all ranks (rank 0 decides: ranks may differ on clocks and disks)."""
        if d.is_main:
            self.run_id = R.prepare(self.run_dir, self.run_id, C.to_dict(self.cfg) if not self.run_id else None)
        self.run_dir, self.run_id = D.broadcast_object((self.run_dir, self.run_id))
        self.cfg.run.id, self.cfg.run.dir = self.run_id, str(self.run_dir)
        setup_logging(self.run_dir, d.rank)

    def _resume_point(self, d: D.Dist) -> Optional[Path]:
        resume = self.cfg.resume
        found: Optional[Path] = None
        if d.is_main and resume != "never":
            found = ckpt.latest(self.run_dir / "checkpoints") if resume == "auto" else ckpt.resolve(resume)
        return D.broadcast_object(found)

    # ---- the API -------------------------------------------------------------------------------------
    def fit(self, model: nn.Module, loss_fn: Callable, optimizer: Any, train_data: Any, val_data: Any = None,
            metrics: Optional[dict[str, Any]] = None, scheduler: Any = None,
            batch_size: Optional[int] = None) -> History:
        """Train; returns the history (also self.history). Resumes per `resume` (default: auto)."""
        t = self.cfg.trainer
        d = self._dist()
        metrics = dict(metrics or {})
        C.check_monitor(t.monitor, list(metrics), has_val=val_data is not None)
        self._prepare_run(d)
        bs = batch_size or t.batch_size
        train = Batches(train_data, d, train=True, batch_size=bs, seed=t.seed, num_workers=t.num_workers,
                        pin_memory=d.device.type == "cuda")
        val = Batches(val_data, d, train=False, batch_size=t.eval_batch_size or bs, num_workers=t.num_workers) \
            if val_data is not None else None

        self.model = model.to(d.device)
        net: nn.Module = self.model
        if d.distributed:
            net = nn.parallel.DistributedDataParallel(self.model, device_ids=[d.device] if d.device.type == "cuda" else None)
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(self.model.parameters())  # a partial from the recipe
        if scheduler is not None and not hasattr(scheduler, "step"):
            scheduler = scheduler(optimizer)

        self._loop = _Loop(self, net, loss_fn, optimizer, scheduler, train, val, metrics, d)
        point = self._resume_point(d)
        if point is not None:
            self._loop.restore(point)
        else:
            seed_everything(t.seed + d.rank)  # per-rank streams (dropout differs per rank, like torchrun)
        self._loop.run()
        return self.history

    def evaluate(self, data: Any, model: Optional[nn.Module] = None, loss_fn: Optional[Callable] = None,
                 metrics: Optional[dict[str, Any]] = None, batch_size: Optional[int] = None) -> dict[str, float]:
        """val_loss and val_<metric> over every sample of `data` exactly once (all ranks call it)."""
        d = self._dist()
        if (model is None or loss_fn is None) and self._loop is None:
            raise ValueError("evaluate() before fit() needs model= and loss_fn=")
        model = (model or self.model).to(d.device)  # type: ignore[union-attr]
        loss_fn = loss_fn or self._loop.loss_fn  # type: ignore[union-attr]
        if metrics is None:
            metrics = self._loop.metric_protos if self._loop is not None else {}
        acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
        batches = Batches(data, d, train=False, batch_size=batch_size or self.cfg.trainer.eval_batch_size
                          or self.cfg.trainer.batch_size)
        return _evaluate(model, loss_fn, batches, acc, d.device)

    def predict(self, data: Any, model: Optional[nn.Module] = None,
                batch_size: Optional[int] = None) -> Optional[torch.Tensor]:
        """Model outputs for every sample, in dataset order, on rank 0 (None on other ranks)."""
        d = self._dist()
        if model is None and self.model is None:
            raise ValueError("predict() before fit() needs model=")
        model = (model or self.model).to(d.device)  # type: ignore[union-attr]
        batches = Batches(data, d, train=False, batch_size=batch_size or self.cfg.trainer.eval_batch_size
                          or self.cfg.trainer.batch_size)
        outs = []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in batches.epoch(0):
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                outs.append(model(to_device(x, d.device)).cpu())
        model.train(was_training)
        mine = torch.cat(outs) if outs else None
        shards = D.all_gather_object(mine)
        if not d.is_main:
            return None
        # rank r holds samples r, r+W, ...: interleave back into dataset order
        full = [s for s in shards if s is not None]
        out = torch.empty((batches.n, *full[0].shape[1:]), dtype=full[0].dtype)
        for r, s in enumerate(shards):
            if s is not None:
                out[r::d.world_size] = s
        return out

    def load_best(self) -> nn.Module:
        """Load the best checkpoint's weights into the model and return it."""
        if self.best_checkpoint is None or self.model is None:
            raise RuntimeError("no best checkpoint: fit with checkpointing and a validated monitor first")
        self.model.load_state_dict(ckpt.load(self.best_checkpoint)["model"])
        return self.model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bare model's weights (no DDP 'module.' prefix)."""
        assert self.model is not None, "fit() first"
        return self.model.state_dict()


def _evaluate(model: nn.Module, loss_fn: Callable, batches: Batches, acc: Accumulator,
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


class _Loop:
    """The loop and its state for one fit() call."""

    def __init__(self, tr: Trainer, net: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                 scheduler: Any, train: Batches, val: Optional[Batches], metrics: dict[str, Any], d: D.Dist) -> None:
        cfg = tr.cfg
        self.tr, self.t, self.net, self.loss_fn, self.opt, self.sched = tr, cfg.trainer, net, loss_fn, optimizer, scheduler
        self.train, self.val, self.d = train, val, d
        self.metric_protos = metrics
        self.train_acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
        self.val_acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
        self.state = TrainState()
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
        log.info("resumed from %s (epoch %d, step %d, batch %d of the epoch)", folder, self.state.epoch,
                 self.state.step, self.state.batch_in_epoch)

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
                    values = _evaluate(self.tr.model, self.loss_fn, self.val, self.val_acc, self.d.device)  # type: ignore[arg-type]
                    self.logger.log_step(s.step, values)
                    self.monitor(values)
                if self.ckpt.due_step(s.step) and not last_of_epoch:
                    self.save(None)
                if s.stopped_early or (t.max_steps > 0 and s.step >= t.max_steps):
                    break
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
            row.update(_evaluate(self.tr.model, self.loss_fn, self.val, self.val_acc, self.d.device))  # type: ignore[arg-type]
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
