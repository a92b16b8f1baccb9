"""What a map-style dataset or DataLoader the user gave means to fit/data.Batches: the DataLoader's
settings kept (and its sampler understood: fit/sources.shuffles), the sampler over the indices
Batches chose, and the tensors of in-memory data (sliced in whole batches, no per-sample collate)."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import UserError
from .sources import check_readable, shuffles


class Slice(torch.utils.data.Sampler):
    """Indices from a list, starting at an offset (the resumed position inside an epoch). With an
    `epoch`, (epoch, index) keys for seeding.EpochSamples: a persistent loader keeps this sampler and
    its workers, and the epoch the samples are seeded with reaches the workers along with each index."""

    def __init__(self, indices: Sequence[int], epoch: Optional[int] = None) -> None:
        self.indices, self.epoch = indices, epoch

    def __iter__(self) -> Iterator[Any]:
        if self.epoch is None:
            return iter(self.indices)
        epoch = self.epoch
        return ((epoch, i) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loader_settings(data: Any, batch_size: Optional[int]) -> tuple[Dataset, int, dict, Optional[bool]]:
    """(dataset, batch size, DataLoader kwargs, shuffle-or-None) of a Dataset or a user DataLoader."""
    if isinstance(data, DataLoader):
        check_readable(data.dataset)
        if data.batch_size is None:
            raise UserError("a DataLoader with a custom batch_sampler cannot be re-sharded across ranks; "
                             "pass the Dataset and batch_size= instead")
        shuffle = shuffles(data.sampler)
        if shuffle is None:
            raise UserError(f"a DataLoader with a custom sampler ({type(data.sampler).__name__}) cannot be "
                             "re-sharded across ranks; pass the Dataset instead")
        kw = dict(collate_fn=data.collate_fn, num_workers=data.num_workers, pin_memory=data.pin_memory,
                  drop_last=data.drop_last, persistent_workers=data.persistent_workers,
                  worker_init_fn=data.worker_init_fn)
        if data.num_workers:  # torch refuses a prefetch_factor without workers (it is None then)
            kw["prefetch_factor"] = data.prefetch_factor
        custom_collate = data.collate_fn is not torch.utils.data.default_collate
        return data.dataset, data.batch_size, {**kw, "_custom": custom_collate}, shuffle
    check_readable(data)
    if batch_size is None:
        raise UserError("a Dataset needs batch_size= (or pass a DataLoader)")
    return data, batch_size, {"_custom": False}, None


def tensors_of(dataset: Dataset, custom_collate: bool) -> Optional[tuple[torch.Tensor, ...]]:
    """The dataset's tensors when it is a plain in-memory tensor dataset we can slice directly."""
    tensors = getattr(dataset, "tensors", None)
    if custom_collate or not isinstance(tensors, tuple) or not tensors:
        return None
    if not all(isinstance(t, torch.Tensor) and len(t) == len(tensors[0]) for t in tensors):
        return None
    if type(dataset).__getitem__ is not torch.utils.data.TensorDataset.__getitem__:
        return None  # a subclass with its own __getitem__ (e.g. transforms) must go through it
    return tensors
