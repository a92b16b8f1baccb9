"""What a Trainer gives after (or without) fit: evaluate, predict, the history, the best checkpoint
and the bare model's weights. A mixin of trainer.Trainer, which owns the state these read."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import dist as D
from .checkpoint import format as F
from .data import Batches
from .evaluation import evaluate, predict
from .hardware import resolve_precision
from .metrics import Accumulator
from .precision import Precision
from .state import History


class Outputs:
    """Trainer's results; the attributes it reads are set by Trainer._init and fit()."""

    cfg: Any
    parts: Any
    model: Optional[nn.Module]
    progress: Any
    ckpt: Any

    def _dist(self) -> D.Dist:
        raise NotImplementedError  # Trainer's

    # ---- what fit() leaves behind --------------------------------------------------------------------
    @property
    def history(self) -> "History":
        return History(self.progress.history)

    @property
    def best_checkpoint(self) -> Optional[Path]:
        return self.ckpt.best[1] if self.ckpt is not None and self.ckpt.best else None

    @property
    def best_score(self) -> Optional[float]:
        return self.ckpt.best[0] if self.ckpt is not None and self.ckpt.best else None

    def evaluate(self, data: Any, model: Optional[nn.Module] = None, loss_fn: Optional[Callable] = None,
                 metrics: Optional[dict[str, Any]] = None, batch_size: Optional[int] = None) -> dict[str, float]:
        """val_loss and val_<metric> over every sample of `data` exactly once (all ranks call it)."""
        d = self._dist()
        if (model is None or loss_fn is None) and self.parts is None:
            raise ValueError("evaluate() before fit() needs model= and loss_fn=")
        model = (model or self.model).to(d.device)  # type: ignore[union-attr]
        loss_fn = loss_fn or self.parts.loss_fn  # type: ignore[union-attr]
        metrics = (self.parts.metrics if self.parts is not None else {}) if metrics is None else metrics
        acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
        return evaluate(model, loss_fn, self._batches(data, d, batch_size), acc, d.device, *self._eval_mode(d))

    def predict(self, data: Any, model: Optional[nn.Module] = None,
                batch_size: Optional[int] = None) -> Optional[torch.Tensor]:
        """Model outputs for every sample, in dataset order, on rank 0 (None on other ranks)."""
        d = self._dist()
        if model is None and self.model is None:
            raise ValueError("predict() before fit() needs model=")
        model = (model or self.model).to(d.device)  # type: ignore[union-attr]
        return predict(model, self._batches(data, d, batch_size), d, *self._eval_mode(d))

    def _batches(self, data: Any, d: D.Dist, batch_size: Optional[int]) -> Batches:
        t = self.cfg.trainer
        return Batches(data, d, train=False, batch_size=batch_size or t.eval_batch_size or t.batch_size)

    def _eval_mode(self, d: D.Dist) -> tuple[Precision, bool]:
        """The fit's precision, and lockstep forwards when the model is FSDP-sharded."""
        if self.parts is not None:
            return self.parts.prec, self.parts.sharded
        return Precision(resolve_precision(self.cfg.trainer.precision, d.device)[0], d.device), False

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
