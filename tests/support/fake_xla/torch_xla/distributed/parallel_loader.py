"""Stand-in for torch_xla.distributed.parallel_loader (see torch_xla/__init__.py)."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from torch_xla import record


class MpDeviceLoader:
    def __init__(self, loader: Iterable[Any], device: torch.device) -> None:
        record("MpDeviceLoader")
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield [t.to(self.device) for t in batch] if isinstance(batch, (list, tuple)) else batch.to(self.device)
