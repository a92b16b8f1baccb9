"""Linear-regression recipe: recover y = 2*x1 - 3*x2 + 10 from noisy samples.

A single nn.Linear fitted with MSE has a known optimum (the true weights, up
to noise), which makes this the sanity check for optimiser and DDP gradient
averaging: a correct run lands near TRUE_WEIGHT / TRUE_BIAS.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .circles import split

__all__ = ["NOISE_STD", "TRUE_BIAS", "TRUE_WEIGHT", "Net", "datasets"]

TRUE_WEIGHT: tuple[float, float] = (2.0, -3.0)
TRUE_BIAS = 10.0
NOISE_STD = 2.0


def Net() -> nn.Module:  # noqa: N802 - named like a class so configs read "_target_: recipes.linreg.Net"
    """Build the model: one linear layer, 2 inputs -> 1 output."""
    return nn.Linear(2, 1)


def datasets(
    n: int = 400, val_fraction: float = 0.3, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Return (train, val): x float32 (N, 2) uniform on [-5, 5), y float32 (N, 1).

    Uses its own generator seeded with ``seed``; the global RNG is untouched.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 to have both a train and a val split, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    x = 10.0 * (torch.rand(n, 2, generator=g, dtype=torch.float32) - 0.5)
    w = torch.tensor(TRUE_WEIGHT, dtype=torch.float32)
    noise = NOISE_STD * torch.randn(n, 1, generator=g, dtype=torch.float32)
    y = (x @ w).unsqueeze(1) + TRUE_BIAS + noise
    return split(x, y, val_fraction, g)
