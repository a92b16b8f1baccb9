"""A map-style recipe whose `__getitem__` draws random augmentation from python's `random`, numpy's
global RNG and torch's, and a model with dropout (the training process's own RNG stream): used by
tests/test_data_workers.py to show that augmentation is seeded per sample (issue 25)."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class Augmented(Dataset):
    """n samples of 4 features -> a linear target; each read adds noise from the three RNGs. The
    first feature is the sample's index (the model never sees it), so tests can key batches by it."""

    def __init__(self, n: int = 96) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.stack([torch.rand((), dtype=torch.float64),
                             torch.tensor(random.random(), dtype=torch.float64),
                             torch.tensor(np.random.rand(), dtype=torch.float64)])
        return torch.cat([torch.tensor([float(i)], dtype=torch.float64), self.x[i] + 0.1 * noise]).float(), \
            self.y[i].float()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x[:, 1:])


def datasets(n: int = 96) -> tuple[Augmented, Optional[Augmented]]:
    return Augmented(n), None
