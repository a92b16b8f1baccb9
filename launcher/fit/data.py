"""Sharded, resumable batch sources for training and evaluation.

Training: DistributedSampler order (seed + epoch, padded so every rank steps equally often), and a
start offset so a run resumed mid-epoch sees exactly the batches it had not yet seen.
Resumed mid-epoch with another layout (world size, batch size, drop_last, seed or shuffle; issue 10:
2 -> 1 ranks used to visit 12,800 samples of a 10,240-sample set), `continue_epoch` works out which
samples the saved world had trained on and spreads the rest of the epoch over the new ranks, each
unseen sample once. Data coverage is exact; the weights are not bitwise those of an uninterrupted
run (other batches, other reduction order, reseeded RNG streams). At the same layout nothing changes
and the resume stays bitwise (tests/test_resume.py).
Evaluation: a strided shard per rank with NO padding, so every sample counts exactly once (the
DistributedSampler would repeat samples to even out ranks and bias the metrics).
In-memory datasets (TensorDataset, or anything with a `.tensors` tuple) skip the per-sample
__getitem__ + collate path: a batch is one index_select per tensor, bitwise what default_collate gives.
Every other map-style dataset is read through seeding.SeededSamples (unless trainer.seed_per_sample=false):
random augmentation in __getitem__ is seeded per sample from (seed, epoch, index), the same with any
number of workers, ranks or resume point.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..device.dist import Dist
from .loader import Slice, loader_settings, tensors_of
from .seeding import EpochSamples, SeededSamples

log = logging.getLogger("launcher")


def _spread(order: torch.Tensor, world: int, batch: int, drop_last: bool) -> tuple[torch.Tensor, int]:
    """DistributedSampler's layout of `order` over `world` ranks, then Batches' whole-batch cut:
    (S, per_rank) where rank r trains on S[r::world][:per_rank], so after b batches per rank the world
    has trained on S[:b * batch * world]. Without drop_last, S repeats `order` from its start up to a
    multiple of `world` (world - 1 extra samples at most: every rank must step as often under DDP);
    with it, S drops the tail and each rank its last incomplete batch, as drop_last does in any epoch."""
    n = len(order)
    if drop_last:
        m = n // world
        return order[: m * world], (m // batch) * batch
    m = math.ceil(n / world)
    return (order.repeat(math.ceil(m * world / n))[: m * world] if n else order), m


def _first_unseen(rest: torch.Tensor, seen: torch.Tensor, n: int) -> torch.Tensor:
    """`rest` without the samples in `seen` and without second occurrences (padding), in order."""
    fresh = torch.ones(n, dtype=torch.bool)
    fresh[seen] = False
    rest = rest[fresh[rest]]
    pos = torch.arange(len(rest))
    first = torch.full((n,), len(rest), dtype=torch.long).scatter_reduce(0, rest, pos, "amin")
    return rest[first[rest] == pos]


class Batches:
    """One split's batches on this rank: `for batch in batches.epoch(e, start=b)`."""

    def __init__(self, data: Any, dist: Dist, *, train: bool, batch_size: Optional[int] = None,
                 seed: int = 0, num_workers: int = 0, pin_memory: bool = False, seed_per_sample: bool = True,
                 persistent_workers: bool = False, prefetch_factor: int = 0) -> None:
        dataset, self.batch_size, kw, shuffle = loader_settings(data, batch_size)
        self.dataset, self.dist, self.train, self.seed = dataset, dist, train, seed
        self.seed_per_sample = seed_per_sample
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = bool(kw.pop("drop_last", False)) and train
        custom = kw.pop("_custom")
        self.collate_fn: Callable = kw.pop("collate_fn", None) or torch.utils.data.default_collate
        # a DataLoader's own settings win over the trainer's keys (which are for Datasets)
        self.loader_kw = {**kw, "num_workers": kw.get("num_workers", num_workers),
                          "pin_memory": kw.get("pin_memory", pin_memory),
                          "persistent_workers": kw.get("persistent_workers", persistent_workers)}
        if not self.loader_kw["num_workers"]:
            self.loader_kw.pop("persistent_workers", None)
            self.loader_kw.pop("prefetch_factor", None)
        elif prefetch_factor and "prefetch_factor" not in kw:
            self.loader_kw["prefetch_factor"] = prefetch_factor
        # persistent workers: one loader for every epoch, made at the first (epoch(): its sampler's
        # indices and epoch change, its workers stay)
        self._loader: Optional[DataLoader] = None
        self._keys = Slice([], epoch=0)
        self.tensors = tensors_of(dataset, custom)
        self.n = len(dataset)  # type: ignore[arg-type]
        self._restored: Optional[dict[str, Any]] = None  # the checkpoint's layout, for continue_epoch
        # an epoch continued at another layout: {"epoch", "at", "offset", "from"} (saved with every
        # checkpoint, so a second interruption in the same epoch resumes the same plan) and this
        # rank's share of the samples that were left
        self._plan: Optional[dict[str, Any]] = None
        self._share: Optional[torch.Tensor] = None
        # (epoch, start, indices) of the last epoch(): batch b of it holds indices[b*bs:(b+1)*bs] (fit/ledger.py)
        self.served: Optional[tuple[int, int, list[int]]] = None
        # epoch -> samples left out of it (a loss spike's window, fit/spike.py): the rest of the epoch is
        # as if the dataset lacked them, in the same order
        self.excluded: dict[int, set[int]] = {}
        self._epoch_now = 0
        self._len_cache: tuple[Any, int] = (None, 0)

    # ---- Stateful: the position lives in TrainProgress; this is what decides the order ----------------
    def state_dict(self) -> dict[str, Any]:
        sd = {"seed": self.seed, "world_size": self.dist.world_size, "shuffle": self.shuffle,
              "batch_size": self.batch_size, "drop_last": self.drop_last}
        return {**sd, "resumed": self._plan} if self._plan is not None else sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Keep the saved layout: continue_epoch needs it to know what the saved world trained on.
        The order of later epochs is the config's; say when it differs from the saved run's."""
        self._restored = dict(sd)
        if (sd.get("seed"), sd.get("shuffle")) != (self.seed, self.shuffle):
            log.warning("data order differs from the checkpoint's (seed %s -> %s, shuffle %s -> %s): epochs "
                        "started from here on follow the new order", sd.get("seed"), self.seed,
                        sd.get("shuffle"), self.shuffle, extra={"file_only": not self.dist.is_main})

    def _layout(self, sd: dict[str, Any]) -> tuple[int, int, bool, int, bool]:
        """(world size, batch size, drop_last, seed, shuffle) of a saved state; checkpoints written
        before batch_size and drop_last were saved are taken to have the current ones."""
        return (int(sd.get("world_size", self.dist.world_size)), int(sd.get("batch_size", self.batch_size)),
                bool(sd.get("drop_last", self.drop_last)), int(sd.get("seed", self.seed)),
                bool(sd.get("shuffle", self.shuffle)))

    def _prior(self, sd: dict[str, Any], epoch: int) -> Optional[dict[str, Any]]:
        """The plan `sd` was following in `epoch`, if that epoch had been continued at its layout."""
        prior = sd.get("resumed")
        return prior if prior is not None and int(prior["epoch"]) == epoch else None

    def _order(self, sd: dict[str, Any], epoch: int) -> torch.Tensor:
        """The samples the layout `sd` visits in `epoch` from where it started, in global order."""
        prior = self._prior(sd, epoch)
        if prior is not None:
            return self._unseen(prior["from"], epoch, int(prior["at"]))
        _, _, _, seed, shuffle = self._layout(sd)
        # one replica, no padding: exactly the permutation every DistributedSampler of the epoch strides
        whole = DistributedSampler(self.dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
        whole.set_epoch(epoch)
        return torch.as_tensor(list(whole), dtype=torch.long)

    def _unseen(self, sd: dict[str, Any], epoch: int, done: int) -> torch.Tensor:
        """What the layout `sd` had still to visit in `epoch` when each of its ranks had trained
        `done` batches: every sample once, in global order."""
        world, batch, drop_last, _, _ = self._layout(sd)
        prior = self._prior(sd, epoch)
        seq, per_rank = _spread(self._order(sd, epoch), world, batch, drop_last)
        trained = min((done - (int(prior["offset"]) if prior is not None else 0)) * batch, per_rank) * world
        return _first_unseen(seq[trained: per_rank * world], seq[:trained], self.n)

    def _my_share(self, order: torch.Tensor) -> torch.Tensor:
        seq, per_rank = _spread(order, self.dist.world_size, self.batch_size, self.drop_last)
        return seq[self.dist.rank::self.dist.world_size][:per_rank]

    def continue_epoch(self, epoch: int, batch_in_epoch: int) -> int:
        """Right after a restore: the data position to continue `epoch` from at this layout.

        At the checkpoint's layout (or at an epoch boundary, or with nothing restored) that is
        `batch_in_epoch` itself and nothing changes. At another layout, the samples the saved world
        had not yet trained on (every one once, in the epoch's global order) are spread over this
        world as DistributedSampler would spread a dataset of just them: rank r takes every
        world_size-th of them from the r-th, each rank the same number of batches. So without
        drop_last the rest is padded with its own first samples up to a multiple of world_size (at
        most world_size - 1 extra samples, each trained once more), and with drop_last up to
        world_size * batch_size - 1 of the rest are dropped (drop_last's rule in any epoch; what the
        saved world's drop_last dropped stays dropped). epoch(epoch, ...) then yields this
        rank's share, and the position returned is len(self) minus its batches, so the epoch ends
        when they are trained. Later epochs are normal."""
        sd = self._restored
        if sd is None or not self.train or batch_in_epoch == 0:
            return batch_in_epoch
        prior = self._prior(sd, epoch)
        here = (self.dist.world_size, self.batch_size, self.drop_last, self.seed, self.shuffle)
        if self._layout(sd) == here:
            if prior is not None:  # a checkpoint of an epoch already continued at this layout: go on with it
                self._plan, self._share = dict(prior), self._my_share(self._order(sd, epoch))
            return batch_in_epoch
        rest = self._unseen(sd, epoch, batch_in_epoch)
        share = self._my_share(rest)
        left = len(share) // self.batch_size if self.drop_last else math.ceil(len(share) / self.batch_size)
        position = len(self) - left
        # `from` keeps the saved layout's own plan only for this epoch: the chain never outgrows one epoch
        base = {k: v for k, v in sd.items() if k != "resumed"}
        self._plan = {"epoch": epoch, "at": batch_in_epoch, "offset": position,
                      "from": {**base, "resumed": prior} if prior is not None else base}
        self._share = share
        old = self._layout(sd)
        names = ("world size", "batch size", "drop_last", "seed", "shuffle")
        change = ", ".join(f"{k} {a} -> {b}" for k, a, b in zip(names, old, here) if a != b)
        extra = len(share) * self.dist.world_size - len(rest)  # every rank's share is as long
        even = (f" ({extra} of them twice, to even out the ranks)" if extra > 0 else
                f" ({-extra} dropped by drop_last)" if extra < 0 else "")
        log.warning("%s at epoch %d batch %d: the rest of the epoch covers the %d samples not yet seen%s, "
                    "%d batches per rank; data coverage is exact, the weights are not bitwise those of an "
                    "uninterrupted run", change, epoch + 1, batch_in_epoch, len(rest), even, left,
                    extra={"file_only": not self.dist.is_main})  # once on the console, in every rank's log
        return position

    # ---- which indices this rank sees -----------------------------------------------------------
    def indices(self, epoch: int) -> list[int]:
        if not self.train:  # strided, unpadded: rank r sees r, r+W, r+2W, ... exactly once overall
            return list(range(self.dist.rank, self.n, self.dist.world_size))
        sampler = DistributedSampler(self.dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                     shuffle=self.shuffle, seed=self.seed, drop_last=self.drop_last)
        sampler.set_epoch(epoch)
        return list(sampler)

    def exclude(self, excluded: dict[int, Any]) -> None:
        self.excluded = {int(e): set(ids) for e, ids in excluded.items()}

    def samples_of(self, epoch: int, lo: int, hi: int) -> list[int]:
        """This rank's samples in batches lo..hi-1 of `epoch` (as it has them now)."""
        if self.served is not None and self.served[0] == epoch and lo >= self.served[1]:
            _, start, idx = self.served
            return idx[(lo - start) * self.batch_size: (hi - start) * self.batch_size]
        return self._kept(epoch, self.indices(epoch))[lo * self.batch_size: hi * self.batch_size]

    def _kept(self, epoch: int, idx: list[int]) -> list[int]:
        gone = self.excluded.get(epoch)
        return [i for i in idx if i not in gone] if gone else idx

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank when training)."""
        gone = self.excluded.get(self._epoch_now) if self.train else None
        if gone:  # a loss spike's samples left out (fit/spike.py); counted once, not at every done()
            key = (self._epoch_now, len(gone))
            if self._len_cache[0] != key:
                left = len(self._kept(self._epoch_now, self.indices(self._epoch_now)))
                self._len_cache = (key, left // self.batch_size if self.drop_last else math.ceil(left / self.batch_size))
            return self._len_cache[1]
        if self.train:
            per_rank = (self.n // self.dist.world_size if self.drop_last
                        else math.ceil(self.n / self.dist.world_size))
        else:
            per_rank = len(range(self.dist.rank, self.n, self.dist.world_size))
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """This rank's batches of `epoch`, skipping the first `start` (already trained) batches."""
        if self._plan is not None and int(self._plan["epoch"]) != epoch:
            self._plan = self._share = None  # the continued epoch is over: back to the normal order
        self._epoch_now = epoch
        if self._plan is not None and self._share is not None:
            skip = start - int(self._plan["offset"])
            if skip < 0:
                raise ValueError(f"epoch {epoch} was continued at batch {self._plan['offset']}; start={start} "
                                 "is before it")
            idx = self._kept(epoch, self._share.tolist())[skip * self.batch_size:]
        else:
            idx = self._kept(epoch, self.indices(epoch))[start * self.batch_size:]
        if self.drop_last:
            idx = idx[: len(idx) - len(idx) % self.batch_size]
        self.served = (epoch, start, idx)
        if self.tensors is not None:
            return self._sliced(idx)
        if self.loader_kw.get("persistent_workers"):
            return self._persistent(epoch, idx)
        # A DataLoader iterator draws its workers' base seed from the global RNG unless given a
        # generator: one of its own keeps the training RNG stream (dropout...) exactly resumable. The
        # samples' augmentation does not come from it (it depends on rank and start): SeededSamples.
        gen = torch.Generator().manual_seed(hash((self.seed, epoch, self.dist.rank, start)) % 2**63)
        loader = DataLoader(self._samples(epoch), batch_size=self.batch_size, sampler=Slice(idx), generator=gen,
                            collate_fn=self.collate_fn, drop_last=self.drop_last, **self.loader_kw)
        return iter(loader)

    def _persistent(self, epoch: int, idx: list[int]) -> Iterator[Any]:
        """The epoch from the one loader whose workers live across epochs: the sampler (in this process)
        takes the epoch's indices, each with the epoch, so SeededSamples' seeds are those a fresh loader's
        would be. Its workers' base seed is drawn once (seed, rank): nothing seeded per sample reads it."""
        self._keys.indices, self._keys.epoch = idx, epoch
        if self._loader is None:
            gen = torch.Generator().manual_seed(hash((self.seed, self.dist.rank)) % 2**63)
            samples = EpochSamples(self.dataset, self.seed, self.seed_per_sample)
            self._loader = DataLoader(samples, batch_size=self.batch_size, sampler=self._keys, generator=gen,
                                      collate_fn=self.collate_fn, drop_last=self.drop_last, **self.loader_kw)
        # a loader with persistent workers starts its next pass on the same workers; batches they had
        # prefetched for an unfinished pass are thrown away first (DataLoader's own _reset)
        return iter(self._loader)

    def close(self) -> None:
        """End the persistent workers (fit's end); a later epoch() starts new ones."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)  # torch's own shutdown: what its __del__ would call
        if it is not None:
            it._shutdown_workers()

    def head(self) -> Any:
        """A batch of the dataset's first samples (a stand-in forward for a rank with no eval data)."""
        idx = list(range(min(self.batch_size, self.n)))
        if self.tensors is not None:
            return next(self._sliced(idx))
        return next(iter(DataLoader(self._samples(0), batch_size=self.batch_size, sampler=Slice(idx),
                                    collate_fn=self.collate_fn)))

    # ---- the loop's questions (a stream answers them by agreement: fit/stream.py) ----------------------
    def done(self, batch_in_epoch: int) -> bool:
        return batch_in_epoch >= len(self)

    def group_end(self, batch_in_epoch: int, k: int) -> int:
        """The end of the accumulation group that `batch_in_epoch` is in (shorter at the epoch's end)."""
        return min(batch_in_epoch - batch_in_epoch % k + k, len(self))

    def steps_in_epoch(self, k: int) -> Optional[int]:
        return math.ceil(len(self) / k)

    def _samples(self, epoch: int) -> Dataset:
        return SeededSamples(self.dataset, self.seed, epoch) if self.seed_per_sample else self.dataset

    def _sliced(self, idx: list[int]) -> Iterator[tuple[torch.Tensor, ...]]:
        # the index lives with the tensors (index_select wants it there): data on a GPU stays on it
        order = torch.as_tensor(idx, dtype=torch.long, device=self.tensors[0].device)  # type: ignore[index]
        contiguous = not self.shuffle and idx == list(range(idx[0], idx[0] + len(idx))) if idx else False
        for lo in range(0, len(idx), self.batch_size):
            if contiguous:  # a view, no copy (single-rank evaluation)
                yield tuple(t[idx[lo]: idx[lo] + self.batch_size] for t in self.tensors)  # type: ignore[union-attr]
            else:
                sel = order[lo: lo + self.batch_size]
                yield tuple(t.index_select(0, sel) for t in self.tensors)  # type: ignore[union-attr]
