"""Two-rings recipe: separate points on an inner ring from points on an outer ring.

The classes are not linearly separable, so even this tiny ReLU network has to
learn a non-linear boundary; it is the smallest classification problem that
exercises the launcher end to end. The recipe scores it with torchmetrics'
BinaryAccuracy on sigmoid(logits), hence float (N, 1) targets for
BCEWithLogitsLoss.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["INNER_RADIUS", "OUTER_RADIUS", "LogitAccuracy", "Net", "datasets", "split"]

INNER_RADIUS = 5.0  # label 1
OUTER_RADIUS = 8.0  # label 0


class Net(nn.Module):
    """2 -> 4 -> 8 -> 1 MLP returning one logit per point."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, 4),
            nn.ReLU(),
            nn.Linear(4, 8),
            nn.ReLU(),
            nn.Linear(8, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _ring(n: int, radius: float, generator: torch.Generator) -> torch.Tensor:
    theta = torch.rand(n, generator=generator, dtype=torch.float32) * (2 * math.pi)
    # Noise is radial only, so each ring is a band of width ~2 around its radius.
    r = radius + torch.randn(n, generator=generator, dtype=torch.float32)
    return torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=1)


def split(
    x: torch.Tensor, y: torch.Tensor, val_fraction: float, generator: torch.Generator
) -> tuple[TensorDataset, TensorDataset]:
    """Shuffle rows with ``generator`` and cut off round(N * val_fraction) for validation."""
    n = x.shape[0]
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise ValueError(
            f"val_fraction={val_fraction!r} of {n} samples leaves an empty split ({n - n_val} train, {n_val} val)"
        )
    perm = torch.randperm(n, generator=generator)
    train_idx, val_idx = perm[: n - n_val], perm[n - n_val :]
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])


def datasets(
    n_per_class: int = 2000, val_fraction: float = 0.3, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Return (train, val): 2 * n_per_class points, x float32 (N, 2), y float32 (N, 1).

    Uses its own generator seeded with ``seed`` so the data is identical on
    every rank and the global RNG (which drives model init and dropout) is
    left untouched.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class!r}")
    g = torch.Generator().manual_seed(seed)
    x = torch.cat((_ring(n_per_class, INNER_RADIUS, g), _ring(n_per_class, OUTER_RADIUS, g)))
    y = torch.cat(
        (torch.ones(n_per_class, 1, dtype=torch.float32), torch.zeros(n_per_class, 1, dtype=torch.float32))
    )
    return split(x, y, val_fraction, g)


class LogitAccuracy:
    """BinaryAccuracy on logits: sigmoid first, targets as ints.

    torchmetrics guesses per batch whether predictions are logits (it applies sigmoid only when a
    value falls outside [0, 1]), so a batch of small logits would be thresholded raw; this does
    not guess. Built as a subclass at call time so importing the recipe does not import torchmetrics.
    """

    def __new__(cls, threshold: float = 0.5):  # type: ignore[misc]
        from torchmetrics.classification import BinaryAccuracy

        class _LogitAccuracy(BinaryAccuracy):
            def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
                super().update(preds.sigmoid(), target.long())

        return _LogitAccuracy(threshold=threshold)
