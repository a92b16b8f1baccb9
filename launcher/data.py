"""Sharded, resumable batch sources for training and evaluation.

Training: DistributedSampler order (seed + epoch, padded so every rank steps equally often), and a
start offset so a run resumed mid-epoch sees exactly the batches it had not yet seen.
Evaluation: a strided shard per rank with NO padding, so every sample counts exactly once (the
DistributedSampler would repeat samples to even out ranks and bias the metrics).
In-memory datasets (TensorDataset, or anything with a `.tensors` tuple) skip the per-sample
__getitem__ + collate path: a batch is one index_select per tensor, bitwise what default_collate gives.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from .config import UserError
from .dist import Dist

log = logging.getLogger("launcher")


class _Slice(torch.utils.data.Sampler):
    """Indices from a list, starting at an offset (the resumed position inside an epoch)."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _loader_settings(data: Any, batch_size: Optional[int]) -> tuple[Dataset, int, dict, Optional[bool]]:
    """(dataset, batch size, DataLoader kwargs, shuffle-or-None) of a Dataset or a user DataLoader."""
    if isinstance(data, DataLoader):
        if data.batch_size is None:
            raise UserError("a DataLoader with a custom batch_sampler cannot be re-sharded across ranks; "
                             "pass the Dataset and batch_size= instead")
        if not isinstance(data.sampler, (RandomSampler, SequentialSampler, DistributedSampler)):
            raise UserError(f"a DataLoader with a custom sampler ({type(data.sampler).__name__}) cannot be "
                             "re-sharded across ranks; pass the Dataset instead")
        shuffle = isinstance(data.sampler, RandomSampler) or (
            isinstance(data.sampler, DistributedSampler) and data.sampler.shuffle)
        kw = dict(collate_fn=data.collate_fn, num_workers=data.num_workers, pin_memory=data.pin_memory,
                  drop_last=data.drop_last, persistent_workers=data.persistent_workers,
                  worker_init_fn=data.worker_init_fn)
        custom_collate = data.collate_fn is not torch.utils.data.default_collate
        return data.dataset, data.batch_size, {**kw, "_custom": custom_collate}, shuffle
    if batch_size is None:
        raise UserError("a Dataset needs batch_size= (or pass a DataLoader)")
    return data, batch_size, {"_custom": False}, None


def _tensors(dataset: Dataset, custom_collate: bool) -> Optional[tuple[torch.Tensor, ...]]:
    """The dataset's tensors when it is a plain in-memory tensor dataset we can slice directly."""
    tensors = getattr(dataset, "tensors", None)
    if custom_collate or not isinstance(tensors, tuple) or not tensors:
        return None
    if not all(isinstance(t, torch.Tensor) and len(t) == len(tensors[0]) for t in tensors):
        return None
    if type(dataset).__getitem__ is not torch.utils.data.TensorDataset.__getitem__:
        return None  # a subclass with its own __getitem__ (e.g. transforms) must go through it
    return tensors


class Batches:
    """One split's batches on this rank: `for batch in batches.epoch(e, start=b)`."""

    def __init__(self, data: Any, dist: Dist, *, train: bool, batch_size: Optional[int] = None,
                 seed: int = 0, num_workers: int = 0, pin_memory: bool = False) -> None:
        dataset, self.batch_size, kw, shuffle = _loader_settings(data, batch_size)
        self.dataset, self.dist, self.train, self.seed = dataset, dist, train, seed
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = bool(kw.pop("drop_last", False)) and train
        custom = kw.pop("_custom")
        self.collate_fn: Callable = kw.pop("collate_fn", None) or torch.utils.data.default_collate
        self.loader_kw = {**kw, "num_workers": kw.get("num_workers", num_workers),
                          "pin_memory": kw.get("pin_memory", pin_memory)}
        if not self.loader_kw["num_workers"]:
            self.loader_kw.pop("persistent_workers", None)
        self.tensors = _tensors(dataset, custom)
        self.n = len(dataset)  # type: ignore[arg-type]

    # ---- Stateful: the position lives in TrainProgress; this is what decides the order ----------------
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "world_size": self.dist.world_size, "shuffle": self.shuffle}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """The order is fixed by the config, not restored; say when it differs from the saved run's."""
        if (sd.get("seed"), sd.get("shuffle")) != (self.seed, self.shuffle):
            log.warning("data order differs from the checkpoint's (seed %s -> %s, shuffle %s -> %s): the "
                        "rest of this epoch may repeat or skip samples", sd.get("seed"), self.seed,
                        sd.get("shuffle"), self.shuffle)

    # ---- which indices this rank sees -----------------------------------------------------------
    def indices(self, epoch: int) -> list[int]:
        if not self.train:  # strided, unpadded: rank r sees r, r+W, r+2W, ... exactly once overall
            return list(range(self.dist.rank, self.n, self.dist.world_size))
        sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                     shuffle=self.shuffle, seed=self.seed, drop_last=self.drop_last)
        sampler.set_epoch(epoch)
        return list(sampler)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank when training)."""
        if self.train:
            per_rank = (self.n // self.dist.world_size if self.drop_last
                        else math.ceil(self.n / self.dist.world_size))
        else:
            per_rank = len(range(self.dist.rank, self.n, self.dist.world_size))
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """This rank's batches of `epoch`, skipping the first `start` (already trained) batches."""
        idx = self.indices(epoch)[start * self.batch_size:]
        if self.drop_last:
            idx = idx[: len(idx) - len(idx) % self.batch_size]
        if self.tensors is not None:
            return self._sliced(idx)
        # A DataLoader iterator draws its workers' base seed from the global RNG unless given a
        # generator: one of its own keeps the training RNG stream (dropout...) exactly resumable.
        gen = torch.Generator().manual_seed(hash((self.seed, epoch, self.dist.rank, start)) % 2**63)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=_Slice(idx), generator=gen,
                            collate_fn=self.collate_fn, drop_last=self.drop_last, **self.loader_kw)
        return iter(loader)

    def head(self) -> Any:
        """A batch of the dataset's first samples (a stand-in forward for a rank with no eval data)."""
        idx = list(range(min(self.batch_size, self.n)))
        if self.tensors is not None:
            return next(self._sliced(idx))
        return next(iter(DataLoader(self.dataset, batch_size=self.batch_size, sampler=_Slice(idx),
                                    collate_fn=self.collate_fn)))

    def _sliced(self, idx: list[int]) -> Iterator[tuple[torch.Tensor, ...]]:
        order = torch.as_tensor(idx, dtype=torch.long)
        contiguous = not self.shuffle and idx == list(range(idx[0], idx[0] + len(idx))) if idx else False
        for lo in range(0, len(idx), self.batch_size):
            if contiguous:  # a view, no copy (single-rank evaluation)
                yield tuple(t[idx[lo]: idx[lo] + self.batch_size] for t in self.tensors)  # type: ignore[union-attr]
            else:
                sel = order[lo: lo + self.batch_size]
                yield tuple(t.index_select(0, sel) for t in self.tensors)  # type: ignore[union-attr]


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a batch (tensor, or nested tuple/list/dict of tensors) to the device."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor."""
    while isinstance(batch, (list, tuple)):
        batch = batch[0]
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    return len(batch)
