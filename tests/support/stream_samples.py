"""An iterable dataset of "shard files" of unequal sizes (tests/test_stream.py): the launcher's
streams read whole files (shard_stream), so ranks' streams have different lengths."""

from __future__ import annotations

import itertools
from typing import Iterator, Optional

import torch
from torch.utils.data import IterableDataset


class ShardFiles(IterableDataset):
    """`files` files; file f holds `base + f * step` samples (x: [id, feature], y: a linear target)."""

    def __init__(self, files: int = 8, base: int = 20, step: int = 3) -> None:
        self.sizes = [base + f * step for f in range(files)]
        self.starts = [sum(self.sizes[:f]) for f in range(files)]

    def _file(self, f: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(f)
        for i in range(self.sizes[f]):
            feature = torch.randn(1, generator=g)
            yield torch.cat([torch.tensor([float(self.starts[f] + i)]), feature]), 3 * feature - 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.chain.from_iterable(self._file(f) for f in range(len(self.sizes)))

    def shard_stream(self, index: int, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.chain.from_iterable(self._file(f) for f in range(index, len(self.sizes), count))


class Probe(torch.nn.Module):
    """Linear on the feature only (column 1; column 0 is the sample's id)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x[:, 1:])


def datasets(files: int = 8, base: int = 20, step: int = 3) -> tuple[ShardFiles, Optional[object]]:
    return ShardFiles(files, base, step), None
