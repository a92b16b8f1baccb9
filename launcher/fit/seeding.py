"""Seeds and RNG streams: seeding before the model is built, deterministic kernels, a rank's
RNG streams as checkpointable values (the per-rank part of a checkpoint, the throwaway forward at
a DDP resume), and a Dataset's `__getitem__` seeded per sample (`SeededSamples`; a stream's draws:
`SampleSeeds`, used by fit/shard.py)."""

from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info


def make_deterministic(on: bool) -> None:
    """trainer.deterministic: deterministic kernels everywhere, before this process's first CUDA
    work (cuBLAS reads its workspace setting when its first handle is made). What makes a GPU run
    resume bitwise by contract: otherwise only by luck (atomics in some backward kernels, cuDNN's
    algorithm search). An op with no deterministic kernel then raises, naming itself."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (every CUDA device's too). `launcher.seed_everything`:
    call it before building the model, so two runs of one script start from the same weights;
    Trainer(seed=...) seeds each rank only when fit() starts, after the model's weights were drawn."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This rank's RNG streams in weights_only-loadable types (tensors, lists, ints)."""
    np_state = np.random.get_state()
    # numpy's key is uint32; held as int64 because torch.save cannot write a uint32 tensor before
    # torch 2.6 ("dtype torch.uint32 is not recognized"); every uint32 value fits in int64 exactly
    state: dict[str, Any] = {
        "python": list(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    # int64 from rng_state, uint32 in checkpoints written before it (those load on torch >= 2.6 only)
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_MASK = 2**64 - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: neighbouring inputs (sample i and i + 1) give unrelated 64-bit outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _seed_streams(s: int) -> None:
    random.seed(s)
    np.random.seed(s >> 32)  # numpy's legacy seed takes 32 bits
    torch.default_generator.manual_seed(_mix(s))


Streams = tuple[Any, Any, torch.Tensor]  # python's, numpy's and torch's CPU generator's states


def save_streams() -> Streams:
    """The three streams a sample's seeding overwrites, to put back in the training process."""
    return random.getstate(), np.random.get_state(), torch.default_generator.get_state()


def restore_streams(saved: Streams) -> None:
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.default_generator.set_state(saved[2])


class SampleSeeds:
    """The seeds of one epoch's samples: `seed(*key)` seeds python's `random`, numpy's global RNG and
    torch's CPU generator from (seed, epoch, key), the key being a sample's id (an index; a stream's
    origin stream and offset). Why three seeds and not torch.manual_seed: `SeededSamples`."""

    def __init__(self, seed: int, epoch: int) -> None:
        self.base = _mix(_mix(seed & _MASK) ^ (epoch & _MASK))

    def seed(self, *key: int) -> None:
        s = self.base
        for part in key:  # (one part: _mix(base ^ index), the seeds map-style data always had)
            s = _mix(s ^ (part & _MASK))
        _seed_streams(s)


class SeededSamples(Dataset):
    """`dataset[i]` with python's `random`, numpy's global RNG and torch's CPU generator seeded from
    (seed, epoch, i): a sample's random augmentation is the same whichever worker, rank or resumed
    loader reads it (trainer.seed_per_sample; issue 25).

    Three seeds, not one: numpy's legacy RandomState and torch's CPU generator are both MT19937 seeded
    the same way, so one seed would make their draws the same numbers. Only torch's CPU generator is
    seeded: torch.manual_seed would reseed every CUDA device too (the training process's dropout stream
    when num_workers=0), and costs 150 us. In the training process itself (num_workers=0, and `head`)
    the three streams are put back afterwards, so its RNG (dropout...) goes on as if nothing had been
    read. That is done once per batch (`__getitems__`, which the DataLoader calls with a batch's
    indices), not per sample: saving numpy's state costs ~80 us, seeding the three ~11 us
    (docs/your-data.md). A worker's streams feed nothing else: they are reseeded, never put back."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int) -> None:
        self.dataset = dataset
        self.seeds = SampleSeeds(seed, epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _read(self, index: int) -> Any:
        self.seeds.seed(index)
        return self.dataset[index]

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        if get_worker_info() is not None:  # a loader worker
            return [self._read(i) for i in indices]
        saved = save_streams()
        try:
            return [self._read(i) for i in indices]
        finally:
            restore_streams(saved)


class EpochSamples(Dataset):
    """A dataset read by (epoch, index) keys (fit/data.py's persistent loader): its workers outlive the
    epoch, so the epoch that seeds each sample (SeededSamples) comes with the index from the sampler
    in the training process. One batch is one epoch's samples."""

    def __init__(self, dataset: Dataset, seed: int, seeded: bool) -> None:
        self.dataset, self.seed, self.seeded = dataset, seed, seeded
        self._epoch: Optional[int] = None
        self._samples: Dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _of(self, epoch: int) -> Dataset:
        if self.seeded and epoch != self._epoch:
            self._epoch, self._samples = epoch, SeededSamples(self.dataset, self.seed, epoch)
        return self._samples

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        samples = self._of(keys[0][0])
        indices = [i for _, i in keys]
        many = getattr(samples, "__getitems__", None)  # what the DataLoader itself would call
        return many(indices) if callable(many) else [samples[i] for i in indices]
