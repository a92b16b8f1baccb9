"""A recipe whose model writes down which samples each training step really trained on.

Column 0 of every input is the sample's id; the model trains on column 1 only. Each training
forward (the summary's and evaluation's run in eval mode and are not recorded) appends one line to
`<out>/rank-<RANK>.txt`: "<pid> <call number in this process> <id> <id> ...", flushed at once so a
run that is stopped leaves every step it took on disk. Used by tests/test_world_size.py,
test_ledger.py and test_stream.py (`kept`: the trainings a run's checkpoints kept, one micro-batch a step).
"""

from __future__ import annotations

import os
import time
from collections import Counter
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
            # a test that kills the run at a step slows its steps so the kill lands there, not a few later
            time.sleep(float(os.environ.get("SEEN_SAMPLES_STEP_S", "0")))
        return self.lin(x[:, 1:])


def datasets(n: int = 64) -> tuple[TensorDataset, Optional[TensorDataset]]:
    """n samples (id, feature) -> 3 * feature + noise; no validation split."""
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(n, 1, generator=g)
    x = torch.cat([torch.arange(n, dtype=torch.float32).unsqueeze(1), feature], dim=1)
    return TensorDataset(x, 3 * feature + 0.1 * torch.randn(n, 1, generator=g)), None


def kept(out: Path, resumed: list[int], steps_per_epoch: int, epoch: int) -> Counter:
    """From the recorder's lines: the trainings of `epoch` the checkpoints kept. Each rank's processes
    are its attempts, in order; attempt i starts at step resumed[i - 1] (0 first) and what it trained
    after step resumed[i] (where the next attempt resumed) was lost with it."""
    starts, trained = [0, *resumed], Counter()
    for f in sorted(out.glob("rank-*.txt")):
        pids: list[str] = []
        for line in f.read_text().splitlines():
            pid, call, *ids = line.split()
            if pid not in pids:
                pids.append(pid)
            attempt = pids.index(pid)
            step = starts[attempt] + int(call)  # one micro-batch a step
            end = starts[attempt + 1] if attempt + 1 < len(starts) else float("inf")
            if step <= end and (epoch - 1) * steps_per_epoch < step <= epoch * steps_per_epoch:
                trained.update(int(i) for i in ids)
    return trained
