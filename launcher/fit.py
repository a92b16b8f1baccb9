"""Trainer: the one fit / evaluate / predict loop, for the CLI workers and the Python API alike.

    history = Trainer(max_epochs=10, monitor="val_loss", patience=5, run_dir="runs/a").fit(
        net, loss_fn, optimizer, train_data, val_data, metrics={"acc": torchmetrics.Accuracy(...)})

This module is the public face (arguments, run identity, resume point, evaluate, predict);
loop.py is the loop itself.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import checkpoint as ckpt
from . import config as C
from . import dist as D
from . import run as R
from . import snapshot
from . import strategy as S
from .data import Batches
from .loggers import setup_logging
from .loop import Loop, evaluate, forward_all
from .precision import Precision
from .state import Accumulator, seed_everything

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
    def __init__(self, config: Optional[C.Config] = None, *, dist: Optional[D.Dist] = None,
                 stop: Optional[Any] = None, **kwargs: Any) -> None:
        self.cfg = config if config is not None else _config_from_kwargs(kwargs)
        from . import xla

        xla.check(self.cfg.trainer.accelerator)
        C.check_trainer(self.cfg.trainer)
        C.check_checkpoint(self.cfg.checkpoint)
        C.check_logger(self.cfg.logger)
        C.check_resume(self.cfg.resume)
        self.dist = dist
        self.stop = stop  # a preempt.StopRequest: stop at an agreed step and checkpoint (SLURM requeue)
        self.preempted = False  # fit() returned early because of a stop request
        self.model: Optional[nn.Module] = None  # the bare module (never the DDP wrapper)
        self.history = History()
        self.best_checkpoint: Optional[Path] = None
        self.best_score: Optional[float] = None
        self.run_dir = Path(self.cfg.run.dir).expanduser().absolute()
        self.run_id = self.cfg.run.id
        self._loop: Optional[Loop] = None

    # ---- set-up -----------------------------------------------------------------------------------
    def _dist(self) -> D.Dist:
        if self.dist is None and self.cfg.trainer.accelerator == "xla":
            from . import xla

            self.dist, _ = xla.init(self.cfg.trainer.dist_timeout_s)
        if self.dist is None:
            # the same device rules as the CLI (gpus unset: one GPU if CUDA is there), in or out of torchrun
            gpus = C.resolve_gpus(self.cfg.trainer, local=True)
            self.dist = D.init(gpus, self.cfg.trainer.dist_timeout_s) if D.env_rank() or gpus else D.current()
        return self.dist

    def _prepare_run(self, d: D.Dist) -> None:
        """Run dir and id agreed by all ranks (rank 0 decides: ranks may differ on clocks and disks)."""
        if d.is_main:
            self.run_id = R.prepare(self.run_dir, self.run_id, C.to_dict(self.cfg) if not self.run_id else None)
        self.run_dir, self.run_id = D.broadcast_object((self.run_dir, self.run_id))
        self.cfg.run.id, self.cfg.run.dir = self.run_id, str(self.run_dir)
        setup_logging(self.run_dir, d.rank)
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        log.info("run %s: rank %d of %d (local rank %d) on node %s, device %s, pid %d", self.run_id, d.rank,
                 d.world_size, d.local_rank, node, d.device, os.getpid(), extra={"file_only": True})

    def _resume_point(self, d: D.Dist) -> Optional[Path]:
        """Rank 0 decides (and every rank learns) where training continues from.

        A restart of this run (elastic restart, SLURM requeue: their restart counters are set)
        always continues from the run's own newest checkpoint: re-applying resume=PATH or never
        there would throw away what the run trained since it started.
        """
        found: Optional[Path] = None
        error = ""
        if d.is_main:
            try:
                found = self._choose_resume_point()
            except (ValueError, C.ConfigError) as e:
                error = str(e)  # raised on every rank below, not just here (the others would wait)
        found, error = D.broadcast_object((found, error))
        if error:
            raise ValueError(error)
        return found

    def _choose_resume_point(self) -> Optional[Path]:
        own = ckpt.latest(self.run_dir / "checkpoints")
        restarted = any(int(os.environ.get(k, "0") or 0) > 0
                        for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
        resume = self.cfg.resume
        if resume == "auto" or (restarted and own is not None):
            return own
        if resume == "never":
            if own is not None:
                raise C.ConfigError("resume", "never", f"{self.run_dir} already holds checkpoints of another start",
                                    "auto (continue it), or a new run.dir")
            return None
        return ckpt.resolve(resume)

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

        prec = Precision(str(t.precision), d.device)
        # XLA: gradients are all-reduced by xm.reduce_gradients, not by DDP
        strategy = "none" if t.accelerator == "xla" else S.resolve(t.strategy, d)
        if strategy == "none" and d.distributed and t.accelerator != "xla":
            raise ValueError(f"trainer.strategy=none with {d.world_size} ranks would train unsynchronised copies; "
                             "valid: auto, ddp, fsdp")
        self.model = prec.prepare_model(model.to(d.device))
        # the optimizer must see the parameters as they will be trained: after FSDP sharding
        net = S.wrap(self.model, strategy, d, t.fsdp_wrap, t.compile, t.channels_last)
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(self.model.parameters())  # a partial from the recipe
        elif strategy == "fsdp":
            raise ValueError("trainer.strategy=fsdp needs the optimizer as a callable taking the parameters "
                             "(e.g. functools.partial(torch.optim.AdamW, lr=1e-3)): FSDP replaces them")
        if scheduler is not None and not hasattr(scheduler, "step"):
            scheduler = scheduler(optimizer)
        if t.scheduler_interval == "step" and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError("trainer.scheduler_interval=step with ReduceLROnPlateau: it needs the monitored "
                             "metric, which exists per epoch; valid: epoch")

        self._loop = Loop(self, net, loss_fn, optimizer, scheduler, train, val, metrics, d, strategy, prec)
        point = self._resume_point(d)
        if point is not None:
            snapshot.restore(self._loop, point)
        else:
            seed_everything(t.seed + d.rank)  # per-rank streams (dropout differs per rank, like torchrun)
        if d.is_main:
            self._loop.ckpt.retire_after(self._loop.state.step)
        self._loop.run()
        self.preempted = self._loop.preempted
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
        return evaluate(model, loss_fn, batches, acc, d.device, *self._eval_mode(d))

    def _eval_mode(self, d: D.Dist) -> tuple[Precision, bool]:
        """The fit's precision, and lockstep forwards when the model is FSDP-sharded."""
        if self._loop is not None:
            return self._loop.prec, self._loop.sharded
        return Precision(str(self.cfg.trainer.precision), d.device), False

    def predict(self, data: Any, model: Optional[nn.Module] = None,
                batch_size: Optional[int] = None) -> Optional[torch.Tensor]:
        """Model outputs for every sample, in dataset order, on rank 0 (None on other ranks)."""
        d = self._dist()
        if model is None and self.model is None:
            raise ValueError("predict() before fit() needs model=")
        model = (model or self.model).to(d.device)  # type: ignore[union-attr]
        batches = Batches(data, d, train=False, batch_size=batch_size or self.cfg.trainer.eval_batch_size
                          or self.cfg.trainer.batch_size)
        outs = [out.float().cpu() for _, out, _ in forward_all(model, batches, d.device, *self._eval_mode(d))]
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
        if ckpt.is_sharded(self.best_checkpoint):
            raise RuntimeError(f"{self.best_checkpoint} is sharded (FSDP): load it with "
                               "launcher.checkpoint.export_model(path, out) or resume=PATH")
        self.model.load_state_dict(ckpt.load(self.best_checkpoint)["model"])
        return self.model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bare model's weights (no DDP 'module.' prefix)."""
        assert self.model is not None, "fit() first"
        return self.model.state_dict()
