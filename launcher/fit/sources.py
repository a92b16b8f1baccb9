"""Where a stream's samples come from: how an iterable dataset is split into `count` streams, and
stream `index`'s share of it for one epoch (fit/stream.py deals the streams out to ranks x workers,
tags, positions and resumes them; this module knows the kinds of dataset)."""

from __future__ import annotations

import itertools
from typing import Any, Iterable


def sharding(data: Any, count: int) -> str:
    """How a dataset is split into `count` streams: "own" (shard_stream), "hf" (datasets' shard) or
    "stride" (every count-th sample, each stream reading the whole dataset)."""
    if callable(getattr(data, "shard_stream", None)):
        return "own"
    if callable(getattr(data, "shard", None)) and isinstance(getattr(data, "n_shards", None), int) \
            and data.n_shards >= count:
        return "hf"
    return "stride"


def set_epoch(data: Any, epoch: int) -> None:
    """A seeded shuffle buffer reshuffles per epoch, the same on a resume."""
    if callable(getattr(data, "set_epoch", None)):
        data.set_epoch(epoch)


def open_shard(data: Any, index: int, count: int) -> Iterable[Any]:
    """Stream `index` of `count`: its samples in order (deterministic for a given epoch)."""
    how = sharding(data, count)
    if how == "own":
        return data.shard_stream(index, count)
    if how == "hf":
        return data.shard(num_shards=count, index=index)
    return itertools.islice(iter(data), index, None, count)
