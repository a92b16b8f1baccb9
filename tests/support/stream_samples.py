"""An iterable dataset of "shard files" of unequal sizes (tests/test_stream.py): the launcher's
streams read whole files (shard_stream), so ranks' streams have different lengths."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset


class ShardFiles(IterableDataset):
    """`files` files; file f holds `base + f * step` samples (x: [id, feature], y: a linear target).
    In memory, or with `root` the .npy files `write_shards` wrote there (the same samples), read in
    order through a memory map in the process that reads them."""

    def __init__(self, files: int = 8, base: int = 20, step: int = 3, root: Optional[str] = None) -> None:
        self.root = root
        self.paths = sorted(Path(root).glob("shard-*.npy")) if root else []
        if root and not self.paths:
            raise FileNotFoundError(f"no shard-*.npy files in {root}")
        self.sizes = [len(np.load(p, mmap_mode="r")) for p in self.paths] if root else \
            [base + f * step for f in range(files)]
        self.starts = [sum(self.sizes[:f]) for f in range(len(self.sizes))]

    def _file(self, f: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.root:
            for row in np.load(self.paths[f], mmap_mode="r"):
                x = torch.from_numpy(np.array(row))
                yield x, 3 * x[1:] - 1
            return
        yield from _generated(f, self.starts[f], self.sizes[f])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.chain.from_iterable(self._file(f) for f in range(len(self.sizes)))

    def shard_stream(self, index: int, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.chain.from_iterable(self._file(f) for f in range(index, len(self.sizes), count))


def _generated(f: int, start: int, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(f)
    for i in range(size):
        feature = torch.randn(1, generator=g)
        yield torch.cat([torch.tensor([float(start + i)]), feature]), 3 * feature - 1


def write_shards(root: Path, files: int = 8, base: int = 20, step: int = 3) -> None:
    """ShardFiles(files, base, step)'s samples as float32 .npy files of [id, feature] rows in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    data = ShardFiles(files, base, step)
    for f in range(files):
        np.save(root / f"shard-{f:03d}.npy", torch.stack([x for x, _ in data._file(f)]).numpy())


class Probe(torch.nn.Module):
    """Linear on the feature only (column 1; column 0 is the sample's id)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x[:, 1:])


class SampleCount:
    """A metric: how many samples it was given, summed over the ranks (a torchmetrics Metric, built at
    call time so that importing this module does not import torchmetrics)."""

    def __new__(cls):  # type: ignore[misc]
        import torchmetrics

        class _SampleCount(torchmetrics.Metric):
            full_state_update = False

            def __init__(self) -> None:
                super().__init__()
                self.add_state("n", default=torch.tensor(0.0), dist_reduce_fx="sum")

            def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
                self.n += target.shape[0]

            def compute(self) -> torch.Tensor:
                return self.n

        return _SampleCount()


def datasets(files: int = 8, base: int = 20, step: int = 3, root: Optional[str] = None,
             validate: bool = False) -> tuple[ShardFiles, Optional[ShardFiles]]:
    """The shard files, and with `validate` the same stream as the validation data."""
    train = ShardFiles(files, base, step, root)
    return train, (train if validate else None)


def across_layouts(data: Any, layouts: list[tuple[int, int]], epoch: int, take: int) -> list[Any]:
    """The batches of one epoch of `data` read at each (world, workers) layout in turn: every layout but
    the last takes `take` batches a rank and is resumed at the next from its state (a checkpoint's);
    the last drains the epoch."""
    from launcher.device.dist import Dist
    from launcher.fit.stream import Stream

    taken: list[Any] = []
    saved = None
    for i, (world, workers) in enumerate(layouts):
        ranks = [Stream(data, Dist(rank=r, world_size=world), batch_size=4, num_workers=workers) for r in range(world)]
        for stream in ranks:
            if saved is not None:
                stream.load_state_dict(saved)
            batches = stream.epoch(epoch)
            taken += list(batches) if i == len(layouts) - 1 else list(itertools.islice(batches, take))
        saved = world_state(ranks)
    return taken


def write_parquet(root: Path, files: int, rows: int) -> list[str]:
    """`files` parquet files of `rows` rows (id, x: [feature], labels: [3 * feature - 1]) in `root`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    paths, g = [], torch.Generator().manual_seed(0)
    for f in range(files):
        x = torch.randn(rows, generator=g).tolist()
        path = root / f"part-{f:03d}.parquet"
        pq.write_table(pa.table({"id": list(range(f * rows, (f + 1) * rows)), "x": [[v] for v in x],
                                 "labels": [[3 * v - 1] for v in x]}), path)
        paths.append(str(path))
    return paths


def hf_parquet(root: str) -> tuple[Any, None]:
    """The parquet files in `root` as a Hugging Face stream (a recipe's data: stream_conf's hf_stream)."""
    import datasets as hf

    files = sorted(str(p) for p in Path(root).glob("*.parquet"))
    return hf.load_dataset("parquet", data_files=files, split="train", streaming=True).with_format("torch"), None


class Columns(torch.nn.Module):
    """Linear on the `x` column (step=dict_batch passes the columns but labels by name; `id` unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor, id: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the dataset's column
        return self.lin(x)


def world_state(streams: list) -> dict[str, Any]:
    """What a checkpoint of these ranks' Streams (fit/stream.py) holds: in-process there is no process
    group to gather the positions with, so they are merged here."""
    from launcher.fit.shard import merge_positions

    sd = streams[0].state_dict()
    sd["position"] = merge_positions([s.state_dict()["position"] for s in streams])
    sd["last"] = {r: s.last for r, s in enumerate(streams)}
    return sd
