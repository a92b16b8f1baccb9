"""Everything the loop must carry across a restart, each piece with state_dict / load_state_dict.

TrainState is the loop position and history (global, rank 0 saves it); RankState is what differs
per rank (RNG streams, the running loss and metric states of the epoch in progress): rank 0
gathers every rank's into the checkpoint and each rank takes its own back on resume.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from . import dist


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches of epoch `epoch` already trained (the data position)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    stopped_early: bool = False

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "history": [dict(r) for r in self.history], "stopped_early": self.stopped_early}

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
        return self.patience > 0 and self.wait >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.best, self.wait = sd["best"], sd["wait"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This rank's RNG streams in weights_only-loadable types (tensors, lists, ints)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Accumulator:
    """One split's running loss and torchmetrics on this rank; compute() syncs over ranks."""

    def __init__(self, metrics: dict[str, Any], device: torch.device) -> None:
        self.metrics = {k: m.to(device) for k, m in metrics.items()}
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = 0
        for m in self.metrics.values():
            m.reset()

    def update(self, loss: torch.Tensor, n: int, outputs: torch.Tensor, targets: Any) -> None:
        self.loss_sum.add_(loss.detach(), alpha=n)  # stays on the device: no host sync per step
        self.count += n
        for m in self.metrics.values():
            m.update(outputs, targets)

    def running_loss(self) -> float:
        """This rank's mean loss so far (one host sync; for the progress bar)."""
        return (self.loss_sum / max(self.count, 1)).item()

    def compute(self, prefix: str) -> dict[str, float]:
        """Mean loss and metrics over every rank's samples (collective: all ranks must call)."""
        totals = torch.stack([self.loss_sum.double(), torch.tensor(float(self.count), dtype=torch.float64,
                                                                   device=self.device)])
        dist.all_reduce_sum(totals)
        out = {f"{prefix}_loss": (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")}
        for name, m in self.metrics.items():
            value = m.compute()  # torchmetrics all-gathers its states across ranks here
            out[f"{prefix}_{name}"] = value.item() if value.numel() == 1 else value.tolist()
        return out

    def state_dict(self) -> dict[str, Any]:
        metrics = {}
        for name, m in self.metrics.items():
            states = {k: ([t.cpu() for t in v] if isinstance(v, list) else v.cpu()) for k, v in m.metric_state.items()}
            metrics[name] = {"states": states, "update_count": m._update_count}
        return {"loss_sum": self.loss_sum.cpu(), "count": self.count, "metrics": metrics}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loss_sum = sd["loss_sum"].to(self.device)
        self.count = sd["count"]
        for name, m in self.metrics.items():
            saved = sd["metrics"][name]
            for k, v in saved["states"].items():
                setattr(m, k, [t.to(self.device) for t in v] if isinstance(v, list) else v.to(self.device))
            m._update_count = saved["update_count"]
            m._computed = None


def rank_state(train: Accumulator) -> dict[str, Any]:
    return {"rng": rng_state(), "train": train.state_dict()}
