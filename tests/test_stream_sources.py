"""Streaming datasets of other libraries (launcher/fit/sources.py): Hugging Face `datasets` streaming
from local parquet files and torchdata's StatefulDataLoader, sharded over ranks x loader workers, each
sample once per epoch, resumed exactly (the `stream` extra; skipped where it is not installed)."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import pytest
import torch

from launcher import Trainer
from launcher.config import UserError
from launcher.device.dist import Dist
from launcher.fit.stream import Stream

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

ROWS = 12  # per parquet file


def parquet(tmp_path: Path, files: int):
    """`files` parquet files of ROWS rows (id, x: [feature], labels: [3 * feature - 1]), streamed."""
    paths = []
    g = torch.Generator().manual_seed(0)
    for f in range(files):
        ids = list(range(f * ROWS, (f + 1) * ROWS))
        x = torch.randn(ROWS, generator=g).tolist()
        path = tmp_path / f"part-{f:03d}.parquet"
        pq.write_table(pa.table({"id": ids, "x": [[v] for v in x], "labels": [[3 * v - 1] for v in x]}), path)
        paths.append(str(path))
    return datasets.load_dataset("parquet", data_files=paths, split="train", streaming=True).with_format("torch")


def _epoch_ids(data, world: int, workers: int, epoch: int = 0) -> list[list[int]]:
    """Each rank's ids in the order its loop takes them."""
    return [[int(i) for b in Stream(data, Dist(rank=r, world_size=world), batch_size=4,
                                    num_workers=workers).epoch(epoch) for i in b["id"]] for r in range(world)]


@pytest.mark.parametrize("files", [8, 3], ids=["hf-shards", "stride"])  # >= and < 2 ranks x 2 workers
@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2)])
def test_hf_parquet_every_sample_once_per_epoch(tmp_path: Path, files: int, world: int, workers: int) -> None:
    """A datasets.IterableDataset splits itself by loader worker: the launcher splits it by rank only
    (before, at 2 x 2 a worker kept half of its shard's files: half the samples were never read)."""
    data = parquet(tmp_path, files)
    for epoch in (0, 1):
        ranks = _epoch_ids(data, world, workers, epoch)
        assert sorted(i for r in ranks for i in r) == list(range(files * ROWS)), f"epoch {epoch}"
    if world > 1:
        assert len(ranks[0]) == len(ranks[1]), "ranks even (the stride keeps every world-th sample)"


def test_hf_shuffle_buffer_reshuffles_per_epoch_and_resumes_in_the_same_order(tmp_path: Path, monkeypatch) -> None:
    # datasets waits 5 s at the end of each read of a shuffle over several parquet files (pyarrow's
    # threads): a pause, not a part of the order; left out here, in this process (no workers)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    data = parquet(tmp_path, 4).shuffle(seed=3, buffer_size=16)
    d = Dist(rank=1, world_size=2)
    whole = [_epoch_ids(data, 2, 0, e)[1] for e in (0, 1)]
    assert whole[0] != whole[1] and sorted(whole[0]) == sorted(whole[1]), "set_epoch reaches the shard read"
    first = Stream(data, d, batch_size=4)
    taken = [int(i) for b in itertools.islice(first.epoch(1), 3) for i in b["id"]]
    again = Stream(data, d, batch_size=4)
    again.load_state_dict(first.state_dict())
    rest = [int(i) for b in again.epoch(1) for i in b["id"]]
    assert taken + rest == whole[1]


def test_hf_already_split_by_node_is_one_line(tmp_path: Path) -> None:
    from datasets.distributed import split_dataset_by_node

    data = split_dataset_by_node(parquet(tmp_path, 4), rank=0, world_size=2)
    with pytest.raises(UserError, match="already split by split_dataset_by_node; valid: the dataset before"):
        Stream(data, Dist(rank=0, world_size=2), batch_size=4)


class Probe(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor, id: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the dataset's column
        return self.lin(x)


def _fit(run: Path, data, **kw) -> tuple[dict, list]:
    torch.manual_seed(0)
    tr = Trainer(max_epochs=2, batch_size=8, num_workers=2, run_dir=run, progress=False, logger="none",
                 precision="32", gpus=0, checkpoint_every_n_steps=2, **kw)
    history = tr.fit(Probe(), torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.1), data, step="dict_batch")
    return torch.load(run / "model.pt", weights_only=True), history


def test_hf_parquet_trains_through_the_api_and_continues_mid_epoch_bitwise(tmp_path: Path) -> None:
    """8 files x 12 rows, batch 8, 2 loader workers: 12 steps an epoch. A run stopped inside epoch 1
    (max_steps=6) and continued in the same process gives the weights of one that never stopped (and
    the first run's loader workers are gone: they held the run dir's lock). At a stop that is not a
    multiple of the worker count the samples are exact but their order is not yet: the resumed loader
    starts at worker 0 (stream.py, the lead's rewrite)."""
    data = parquet(tmp_path, 8)
    ref, hist = _fit(tmp_path / "ref", data)
    assert [h["step"] for h in hist] == [12, 24] and hist[1]["train_loss"] < hist[0]["train_loss"]
    _fit(tmp_path / "cut", data, max_steps=6)
    cut, _ = _fit(tmp_path / "cut", data)
    assert all(torch.equal(ref[k], cut[k]) for k in ref)

