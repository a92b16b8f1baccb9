"""Linear data with a corrupt batch (tests/test_spike.py): samples 96..111 have labels 1e4. In
order (no shuffle), so a run without them sees every other batch in the same order."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

POISONED = range(96, 112)


def datasets(drop: bool = False, batch_size: int = 8) -> tuple[DataLoader, None]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 2, generator=g)
    y = x @ torch.tensor([[2.0], [-3.0]]) + 1
    y[POISONED.start:POISONED.stop] = 1e4
    keep = [i for i in range(160) if not (drop and i in POISONED)]
    return DataLoader(TensorDataset(x[keep], y[keep]), batch_size=batch_size, shuffle=False), None
