"""A recipe whose model writes down which samples each training step really trained on.

Column 0 of every input is the sample's id; the model trains on column 1 only. Each training
forward (the summary's and evaluation's run in eval mode and are not recorded) appends one line to
`<out>/rank-<RANK>.txt`: "<pid> <call number in this process> <id> <id> ...", flushed at once so a
run that is stopped leaves every step it took on disk. Used by tests/test_world_size.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import TensorDataset


class Recorder(nn.Module):
    def __init__(self, out: str = "seen") -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            ids = " ".join(str(int(i)) for i in x[:, 0].tolist())
            with open(self.out / f"rank-{os.environ.get('RANK', '0')}.txt", "a") as f:
                f.write(f"{os.getpid()} {self.calls} {ids}\n")
        return self.lin(x[:, 1:])


def datasets(n: int = 64) -> tuple[TensorDataset, Optional[TensorDataset]]:
    """n samples (id, feature) -> 3 * feature + noise; no validation split."""
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(n, 1, generator=g)
    x = torch.cat([torch.arange(n, dtype=torch.float32).unsqueeze(1), feature], dim=1)
    return TensorDataset(x, 3 * feature + 0.1 * torch.randn(n, 1, generator=g)), None

