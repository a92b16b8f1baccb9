"""The larger-than-memory recipe (launcher/recipes/tokenshards.py, issue 25 item 5): text -> uint16
byte-token shards, windows read lazily through memory maps (a 128 MB shard set read window by window
leaves the reader's resident memory far below the set), and training on them with persistent loader
workers resumes exactly: the weights and coverage ledger of one straight run, and of a run without
persistent workers."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from launcher import Trainer
from launcher.recipes import charlm, tokenshards
from launcher.recipes.tokenshards import TokenWindows


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_prepare_writes_byte_tokens_and_windows_read_them(tmp_path: Path) -> None:
    text = b"".join(f"line {i}: the quick brown fox\n".encode() for i in range(400))
    (tmp_path / "a.txt").write_bytes(text[:5000])
    (tmp_path / "b.txt").write_bytes(text[5000:])
    train, val = tokenshards.prepare(tmp_path / "shards", [tmp_path / "a.txt", tmp_path / "b.txt"], val_fraction=0.25,
                                     shard_tokens=3000, chunk=1000)
    assert [f.name for f in train] == [f"train-{i:05d}.bin" for i in range(len(train))] and len(train) > 2
    stored = np.concatenate([np.fromfile(f, dtype="<u2") for f in train + val])
    assert bytes(stored.astype(np.uint8)) == text, "every byte once, in order, train then val"
    assert sum(f.stat().st_size for f in val) == 2 * round(len(text) * 0.25)
    ds, val_ds = tokenshards.datasets(str(tmp_path / "shards"), block_size=16)
    assert val_ds is not None and len(ds) == sum((3000 - 1) // 16 for _ in train[:-1]) + \
        (train[-1].stat().st_size // 2 - 1) // 16
    x, y = ds[len(ds) - 1]  # the last window of the last shard: ends inside it
    assert x.dtype == torch.int64 and x.shape == y.shape == (16,) and torch.equal(x[1:], y[:-1])
    first = torch.as_tensor(np.frombuffer(text[:17], dtype=np.uint8).astype(np.int64))
    assert torch.equal(ds[0][0], first[:-1]) and torch.equal(ds[0][1], first[1:])
    assert len(pickle.dumps(ds)) < 2000, "a worker gets the file names, never the data"
    with pytest.raises(ValueError, match="holds no train-"):
        tokenshards.datasets(str(tmp_path / "nothing"))


def test_a_128_mb_shard_set_is_read_window_by_window(tmp_path: Path) -> None:
    """What a read leaves resident is the kernel's choice of mapping: whole large folios of a freshly
    written file (2 MB each on this project's 6.18 kernel), so 16 windows, not hundreds. Loading the
    set, or touching all of it, would add all 128 MB."""
    for s in range(4):  # 4 shards of 32 MB, written 8 MB at a time
        with open(tmp_path / f"train-{s:05d}.bin", "wb") as f:
            for c in range(4):
                f.write((np.arange(c * 4 << 20, (c + 1) * 4 << 20) % 251).astype("<u2").tobytes())
    before = _resident_bytes()
    ds = TokenWindows(sorted(tmp_path.glob("train-*.bin")), block_size=128)
    size = 4 * 32 << 20
    assert len(ds) == 4 * (((16 << 20) - 1) // 128)
    picks = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:16].tolist()
    for i in picks:
        x, y = ds[i]
        lo = (i - ds.starts[i // ((16 << 20) // 128 - 1)]) * 128  # 131071 windows a shard
        assert int(x[0]) == lo % 251 and int(y[-1]) == (lo + 128) % 251
    grown = _resident_bytes() - before
    assert grown < size // 3, f"reading 16 windows made {grown >> 20} MB resident, of a {size >> 20} MB set"


def _fit(tmp: Path, name: str, data: tuple, steps: int, **loader: object) -> tuple[dict, list]:
    torch.manual_seed(0)
    model = charlm.GPT(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16)
    tr = Trainer(max_epochs=5, max_steps=steps, batch_size=8, run_dir=tmp / name, progress=False, logger="none",
                 precision="32", summary=False, **loader)
    tr.fit(model, charlm.SeqCrossEntropy(), lambda p: torch.optim.AdamW(p, lr=3e-3), data[0], data[1])
    ledger = [json.loads(ln) for ln in (tmp / name / "ledger.jsonl").read_text().splitlines()]
    return {k: v.clone() for k, v in tr.model.state_dict().items()}, ledger


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine: 200 ms a backward instead of 2
    yield
    torch.set_num_threads(threads)


def test_persistent_workers_train_and_resume_exactly(tmp_path: Path, one_thread: None) -> None:
    (tmp_path / "t.txt").write_text(charlm.corpus(2000, 1))
    tokenshards.prepare(tmp_path / "d", [tmp_path / "t.txt"], shard_tokens=700)
    data = tokenshards.datasets(str(tmp_path / "d"), block_size=16)  # 3 shards, 110 windows: 14 steps an epoch
    assert len(data[0]) == 110
    kw = dict(num_workers=2, persistent_workers=True, prefetch_factor=3)
    straight, ledger = _fit(tmp_path, "straight", data, 20, **kw)  # into epoch 2 on the same workers
    _fit(tmp_path, "cut", data, 9, **kw)  # stops inside epoch 1, its checkpoint there
    resumed, resumed_ledger = _fit(tmp_path, "cut", data, 20, **kw)
    fresh, fresh_ledger = _fit(tmp_path, "fresh", data, 20, num_workers=0)
    for name, other in (("resumed", resumed), ("without persistent workers", fresh)):
        assert all(torch.equal(straight[k], other[k]) for k in straight), f"{name}: other weights"
    assert ledger == resumed_ledger == fresh_ledger and ledger[0]["epoch"] == 1


def test_the_recipe_runs_through_the_cli_on_shards_that_prepare_wrote(tmp_path: Path) -> None:
    """`python -m launcher.recipes.tokenshards prepare DIR FILE` then `python -m launcher recipe=tokenshards
    data.path=DIR` as docs/recipes.md shows them (the recipe was trained only through the API in tests):
    8 KB of text, windows of 16 (~15 steps an epoch), 1 rank with its 2 persistent workers, stopped at step 3: the
    ledger's partial line has each of the 96 windows trained once and the rest not yet."""
    import subprocess
    import sys

    from conftest import QUIET, cli_env, run_cli

    (tmp_path / "text.txt").write_text(charlm.corpus(8_000, 0))
    prep = subprocess.run([sys.executable, "-m", "launcher.recipes.tokenshards", "prepare", str(tmp_path / "shards"),
                           str(tmp_path / "text.txt")], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert prep.returncode == 0 and "train and" in prep.stdout, prep.stderr[-3000:]
    windows = len(tokenshards.datasets(str(tmp_path / "shards"), block_size=16)[0])
    p = run_cli(["recipe=tokenshards", f"data.path={tmp_path / 'shards'}", "data.block_size=16", "trainer.gpus=0",
                 "trainer.max_steps=3", "trainer.summary=false", f"run.dir={tmp_path / 'run'}",
                 *QUIET], cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = json.loads((tmp_path / "run" / "ledger.jsonl").read_text())
    assert (line["n"], line["times"], line["partial"]) == (windows, {"0": windows - 96, "1": 96, "2+": 0}, True)
    assert (tmp_path / "run" / "model.pt").exists()
