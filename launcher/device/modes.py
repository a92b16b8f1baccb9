"""A model run for a look, not for training: evaluation, predictions, the summary's forward."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients, then every module back in its own mode (a frozen BatchNorm
    stays in eval, a training one in train): a look at the model that leaves no trace."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
