"""A model that fails on purpose, for the failure tests (imported by ranks via PYTHONPATH).

FAULT_RANK / FAULT_STEP pick the rank and the forward call that raises (FAULT_MODE=raise),
or that sleeps forever (FAULT_MODE=hang), or whose output is NaN (FAULT_MODE=nan).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class FaultyLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            rank = int(os.environ.get("RANK", "0"))
            if rank == int(os.environ.get("FAULT_RANK", "1")) and self.calls == int(os.environ.get("FAULT_STEP", "5")):
                mode = os.environ.get("FAULT_MODE", "raise")
                if mode == "hang":
                    time.sleep(3600)
                if mode == "nan":
                    return self.lin(x) * float("nan")
                raise RuntimeError(f"injected failure on rank {rank} at step {self.calls}")
        return self.lin(x)


class RaisingNet(nn.Module):
    """A model whose constructor rejects its arguments, as a user's model might."""

    def __init__(self, hidden: int = -1) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden={hidden}: must be >= 1")
        self.lin = nn.Linear(2, hidden)


class RaisingCallback:
    """A recipe's callback whose hook fails on every rank at step 2, as a user's callback might (duck-typed:
    any object with a hook is a callback)."""

    def on_step_end(self, run) -> None:  # noqa: ANN001 - launcher.fit.callbacks.RunView
        if run.step == 2:
            raise KeyError("no_such_metric")
