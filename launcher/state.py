"""The loop's own resumable parts, each Stateful (state_dict / load_state_dict).

TrainProgress is the loop position and history (the same on every rank, rank 0 saves it);
PerRank is what differs per rank (RNG streams, the running metric sums of the epoch in progress).
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from .config import TrainerConfig
from .dist import Dist, all_gather_object

log = logging.getLogger("launcher")


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

    def complete(self, t: TrainerConfig, stopper: "EarlyStopping") -> str:
        """Why a run with nothing left to train is complete, and which limit would continue it."""
        if self.stopped_early:
            why, limit = f"early stopping: no better {t.monitor} in {stopper.wait} validations", "patience"
        elif 0 < t.max_steps <= self.step:
            why, limit = f"trainer.max_steps={t.max_steps}", "max_steps"
        else:
            why, limit = f"trainer.max_epochs={t.max_epochs}", "max_epochs"
        return (f"run complete at epoch {self.epoch}, step {self.step} ({why}); raise trainer.{limit} to "
                "continue it, or start over in a new run.dir")

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


def make_deterministic(on: bool) -> None:
    """trainer.deterministic: deterministic kernels everywhere, before this process's first CUDA
    work (cuBLAS reads its workspace setting when its first handle is made). What makes a GPU run
    resume bitwise by contract: otherwise only by luck (atomics in some backward kernels, cuDNN's
    algorithm search). An op with no deterministic kernel then raises, naming itself."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This rank's RNG streams in weights_only-loadable types (tensors, lists, ints)."""
    np_state = np.random.get_state()
    # numpy's key is uint32; held as int64 because torch.save cannot write a uint32 tensor before
    # torch 2.6 ("dtype torch.uint32 is not recognized"); every uint32 value fits in int64 exactly
    state: dict[str, Any] = {
        "python": list(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    # int64 from rng_state, uint32 in checkpoints written before it (those load on torch >= 2.6 only)
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PerRank:
    """What differs from rank to rank: each rank's RNG streams and `parts` (the running train
    metrics). state_dict() gathers every rank's (a collective: every rank calls it), so rank 0's
    checkpoint holds them all; load_state_dict() gives each rank its own back. At another world
    size there is no "own": the streams are reseeded by `reseed` and the parts start afresh."""

    def __init__(self, parts: dict[str, Any], dist: Dist, reseed: Callable[[], None]) -> None:
        self.parts, self.d, self.reseed = parts, dist, reseed

    def state_dict(self) -> list[dict[str, Any]]:
        return all_gather_object({"rng": rng_state(), **{k: p.state_dict() for k, p in self.parts.items()}})

    def load_state_dict(self, ranks: list[dict[str, Any]]) -> None:
        if len(ranks) != self.d.world_size:
            log.warning("checkpoint from world size %d resumed at %d: the ranks' RNG streams are reseeded and "
                        "the epoch's running train metrics start afresh", len(ranks), self.d.world_size,
                        extra={"file_only": not self.d.is_main})
            self.reseed()
            return
        mine = ranks[self.d.rank]
        set_rng_state(mine["rng"])
        for k, p in self.parts.items():
            p.load_state_dict(mine[k])


class Maybe:
    """A part a run may not have (no scheduler): None in the checkpoint, and loads only into one."""

    def __init__(self, part: Any) -> None:
        self.part = part

    def state_dict(self) -> Any:
        return self.part.state_dict() if self.part is not None else None

    def load_state_dict(self, sd: Any) -> None:
        if self.part is not None and sd is not None:
            self.part.load_state_dict(sd)


class Hyperparameters:
    """The optimizer's constructor hyperparameters (lr, weight_decay, betas...) as this segment of
    the run built it. Restoring the optimizer puts the saved segment's values back into its param
    groups; this part, restored after the optimizer and the scheduler, re-applies those changed
    since (optimizer.lr=... on resume), keeping the optimizer's state. A changed lr scales each
    group's current lr (and a scheduler's base lrs) by new/old: a schedule goes on, at the new scale."""

    absent_ok = True  # checkpoints from before it: nothing to compare with, nothing changes

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.opt, self.scheduler = optimizer, scheduler
        self.built = {k: _tuple(v) for k, v in optimizer.defaults.items() if _plain(v)}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.built)

    def load_state_dict(self, sd: Optional[dict[str, Any]]) -> None:
        for key, new in self.built.items():
            old = _tuple((sd or {}).get(key, new))
            if old == new:
                continue
            for group in self.opt.param_groups:
                if key == "lr" and group["lr"] != old and old:  # a scheduled lr: same shape, new scale
                    group["lr"] *= new / old
                elif _tuple(group.get(key)) == old:  # groups given their own value keep it
                    group[key] = new
                if key == "lr" and "initial_lr" in group:
                    group["initial_lr"] *= new / old if old else 1.0
            if key == "lr" and old and hasattr(self.scheduler, "base_lrs"):
                self.scheduler.base_lrs = [lr * new / old for lr in self.scheduler.base_lrs]
            log.info("optimizer %s %r -> %r: applied, the optimizer's state kept", key, old, new)


def _plain(v: Any) -> bool:
    """A hyperparameter worth comparing: a number, a flag, or a tuple of numbers (betas)."""
    if isinstance(v, (list, tuple)):
        return all(isinstance(x, (int, float)) for x in v)
    return isinstance(v, (int, float, bool))


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v  # betas: a list from YAML, a tuple from torch
