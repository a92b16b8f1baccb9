"""Data of the wrong shape for the MNIST CNN (the preflight tests): CIFAR-sized colour images."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset


def color_images(**_: Any) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) of 3x32x32 images with 10 classes; takes (and ignores) the mnist data node's keys."""
    g = torch.Generator().manual_seed(0)
    make = lambda n: TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return make(256), make(64)
