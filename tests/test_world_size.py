"""Resuming mid-epoch at another world size (issue 10): the rest of the epoch trains on exactly the
samples the saved world had not yet trained on, each once (DistributedSampler-style padding aside).

Real runs through the CLI: 2 gloo CPU ranks stop after a mid-epoch step checkpoint, 1 rank resumes
from it and stops after another, 2 ranks resume from that and finish (so 2 -> 1 and 1 -> 2, the second
from an epoch already continued once); the model of tests/support/seen_samples.py writes down the ids
of every batch each rank trained on. In-process
checks then cover the corners a run would take too long for: padding, drop_last, another batch
size, a second resize inside the same epoch, and a checkpoint without the new fields.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import QUIET, SUPPORT, run_cli
from launcher.fit.data import Batches
from launcher.device.dist import Dist

N, BATCH = 64, 4  # the recipe's 64 samples in batches of 4


def _read(out: Path) -> dict[int, list[tuple[int, list[int]]]]:
    """rank -> [(training forward number in its process, sample ids)], in the order the rank trained."""
    seen = {}
    for f in sorted(out.glob("rank-*.txt")):
        rows = [line.split() for line in f.read_text().splitlines()]
        seen[int(f.stem.split("-")[1])] = [(int(r[1]), [int(i) for i in r[2:]]) for r in rows]
    return seen


def _run(tmp: Path, name: str, nproc: int, *extra: str) -> str:
    args = ["--config-dir", str(SUPPORT / "seen_conf"), "recipe=seen", f"model.out={tmp / ('seen-' + name)}",
            f"trainer.nproc={nproc}", "trainer.gpus=0", *QUIET, f"run.dir={tmp / name}", *extra]
    p = run_cli(args, cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr


def test_2_ranks_to_1_to_2_inside_one_epoch_trains_every_sample_once(tmp_path: Path) -> None:
    """One epoch cut twice: 2 ranks stop after the step-3 checkpoint, 1 rank resumes from it and stops
    after step 8, 2 ranks resume from that and finish; epoch 2 then runs normally at 2 ranks."""
    # max_steps ends each cut run one step after its checkpoint: that step is lost, as in a crash
    _run(tmp_path, "a", 2, "trainer.max_steps=4", "checkpoint.every_n_steps=3")
    err_b = _run(tmp_path, "b", 1, "trainer.max_steps=9", "checkpoint.every_n_steps=4",
                 f"resume={tmp_path / 'a' / 'checkpoints' / 'step-0000003'}")
    err_c = _run(tmp_path, "c", 2, f"resume={tmp_path / 'b' / 'checkpoints' / 'step-0000008'}")

    a, b, c = (_read(tmp_path / f"seen-{x}") for x in "abc")
    assert (sorted(a), sorted(b), sorted(c)) == ([0, 1], [0], [0, 1])
    # what each checkpoint holds: a's first 3 steps on both ranks, then b's first 5 (steps 4..8)
    trained_a = [i for rows in a.values() for call, ids in rows if call <= 3 for i in ids]
    trained_b = [i for rows in b.values() for call, ids in rows if call <= 5 for i in ids]
    assert (len(trained_a), len(trained_b)) == (2 * 3 * BATCH, 5 * BATCH)
    # c: the rest of epoch 1, then epoch 2 (N / 2 samples a rank, every batch full)
    epoch2_batches = N // 2 // BATCH
    rest_c = [i for rows in c.values() for _, ids in rows[:-epoch2_batches] for i in ids]
    epoch2 = [i for rows in c.values() for _, ids in rows[-epoch2_batches:] for i in ids]
    assert Counter(trained_a + trained_b + rest_c) == Counter(range(N)), "epoch 1: every sample exactly once"
    assert Counter(epoch2) == Counter(range(N)), "epoch 2 at 2 ranks: every sample once"

    left_b, left_c = N - len(trained_a), N - len(trained_a) - len(trained_b)
    assert (f"world size 2 -> 1 at epoch 1 batch 3: the rest of the epoch covers the {left_b} samples not yet "
            "seen") in err_b, err_b[-2000:]
    assert (f"world size 1 -> 2 at epoch 1 batch 11: the rest of the epoch covers the {left_c} samples not yet "
            "seen") in err_c, err_c[-2000:]  # b continued at batch 16 - 40/4 = 6, and trained 5 more
    steps = [line.split(",")[1] for line in (tmp_path / "c" / "metrics.csv").read_text().splitlines()[1:]]
    rest_steps = math.ceil(left_c / 2 / BATCH)
    assert steps == [str(8 + rest_steps), str(8 + rest_steps + epoch2_batches)]


# ---- in process: the same Batches every rank builds, one per rank of each world ---------------------


def _world(n: int, world: int, batch: int, drop_last: bool = False, seed: int = 5) -> list[Batches]:
    ds = TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))
    loader = DataLoader(ds, batch_size=batch, shuffle=True, drop_last=drop_last)
    return [Batches(loader, Dist(rank=r, world_size=world), train=True, seed=seed) for r in range(world)]


def _ids(b: Batches, epoch: int, start: int, batches: Optional[int] = None) -> list[list[int]]:
    """The batches (as sample ids) rank `b` trains in `epoch` from `start`, at most `batches` of them."""
    out = []
    for batch in b.epoch(epoch, start=start):
        if batches is not None and len(out) == batches:
            break
        out.append([int(v) for v in batch[1]])
    return out


def _resize(ranks: list[Batches], sd: dict, epoch: int, at: int) -> tuple[int, list[list[list[int]]]]:
    """Restore `sd` on every rank of a world, continue `epoch` from `at`: (position, each rank's batches)."""
    positions = []
    for b in ranks:
        b.load_state_dict(sd)
        positions.append(b.continue_epoch(epoch, at))
    assert len(set(positions)) == 1, f"every rank must agree on the position: {positions}"
    shares = [_ids(b, epoch, positions[0]) for b in ranks]
    assert all(len(s) == len(ranks[0]) - positions[0] for s in shares), "the epoch ends with the share"
    return positions[0], shares


def _flat(shares: list[list[list[int]]], upto: Optional[int] = None) -> list[int]:
    return [i for s in shares for batch in s[:upto] for i in batch]


# (samples, old world, old batch, new world, new batch, drop_last, batches per old rank trained)
CASES = [
    (10240, 2, 32, 1, 32, False, 37),  # the shape: 2 -> 1 used to train 12,800 samples
    (64, 1, 4, 2, 4, False, 3),
    (37, 3, 2, 2, 3, False, 4),  # padded before (37 over 3) and after (an odd rest over 2)
    (9, 4, 1, 3, 1, False, 2),  # one sample left for 3 ranks: trained 3 times, as DistributedSampler pads
    (20, 2, 3, 2, 2, False, 2),  # same world size, another batch size
    (37, 2, 3, 4, 2, True, 2),  # drop_last: the old world's dropped tail stays dropped
    (50, 2, 5, 3, 4, False, 5),  # resumed at the old epoch's very end: nothing left
]


@pytest.mark.parametrize("n,w0,b0,w1,b1,drop_last,at", CASES)
def test_the_rest_of_the_epoch_is_every_unseen_sample_once(n: int, w0: int, b0: int, w1: int, b1: int,
                                                             drop_last: bool, at: int) -> None:
    old, new, epoch = _world(n, w0, b0, drop_last), _world(n, w1, b1, drop_last), 3
    trained = [i for b in old for batch in _ids(b, epoch, 0, at) for i in batch]
    whole = {i for b in old for batch in _ids(b, epoch, 0) for i in batch}  # the old epoch's coverage
    _, shares = _resize(new, old[0].state_dict(), epoch, at)
    rest = _flat(shares)
    assert not set(rest) & set(trained), "nothing trained twice across the resume"
    repeats = len(rest) - len(set(rest))
    if drop_last:  # whole batches on every rank: fewer than one batch a rank of the rest is dropped
        assert repeats == 0 and set(rest) <= whole - set(trained)
        assert len(whole - set(trained) - set(rest)) < w1 * b1
    else:  # DistributedSampler's padding: the fewest repeats that give every rank as many samples
        assert set(trained) | set(rest) == whole == set(range(n))
        unseen = n - len(set(trained))
        assert repeats == -unseen % w1 if unseen else repeats == 0
    for b, fresh in zip(new, _world(n, w1, b1, drop_last)):  # the next epoch is the normal one
        assert _ids(b, epoch + 1, 0) == _ids(fresh, epoch + 1, 0)


def test_resized_twice_in_one_epoch_and_resumed_at_the_same_size_in_between() -> None:
    n, epoch = 101, 0
    a = _world(n, 2, 3)
    trained = [i for b in a for batch in _ids(b, epoch, 0, 5) for i in batch]
    b3 = _world(n, 3, 4)
    pos, shares = _resize(b3, a[0].state_dict(), epoch, 5)
    trained += _flat(shares, 2)  # world b trains 2 batches a rank, then a checkpoint
    sd = b3[0].state_dict()
    assert sd["resumed"]["from"]["world_size"] == 2 and all(b.state_dict() == sd for b in b3)

    again = _world(n, 3, 4)  # the same layout resumes the same plan: bitwise the batches it had left
    pos2, shares2 = _resize(again, sd, epoch, pos + 2)
    assert pos2 == pos + 2 and shares2 == [s[2:] for s in shares]
    trained += _flat(shares2, 1)
    sd = again[0].state_dict()

    last = _world(n, 1, 8)  # and then 3 -> 1 inside the same epoch
    _, shares3 = _resize(last, sd, epoch, pos2 + 1)
    assert Counter(trained + _flat(shares3)) == Counter(range(n))
    assert _ids(last[0], epoch + 1, 0) == _ids(_world(n, 1, 8)[0], epoch + 1, 0)


def test_same_layout_and_old_checkpoints() -> None:
    n, epoch = 40, 1
    old = _world(n, 2, 4)
    sd = old[0].state_dict()
    assert (sd["batch_size"], sd["drop_last"]) == (4, False) and "resumed" not in sd
    same = _world(n, 2, 4)
    for b in same:  # the same layout: the position and batches are today's, untouched
        b.load_state_dict(sd)
        assert b.continue_epoch(epoch, 3) == 3
    assert [_ids(b, epoch, 3) for b in same] == [_ids(b, epoch, 3) for b in old]
    assert [b.continue_epoch(epoch + 1, 0) for b in _world(n, 1, 4)] == [0], "an epoch boundary: nothing to do"
    assert _world(n, 1, 4)[0].continue_epoch(epoch, 3) == 3, "nothing restored: nothing to do"

    # a checkpoint written before batch_size and drop_last were saved: taken to have the current ones
    legacy = {k: sd[k] for k in ("seed", "world_size", "shuffle")}
    trained = [i for b in old for batch in _ids(b, epoch, 0, 3) for i in batch]
    _, shares = _resize(_world(n, 1, 4), legacy, epoch, 3)
    assert Counter(trained + _flat(shares)) == Counter(range(n))


def test_the_resize_is_said_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    old = _world(64, 2, 4)
    new = _world(64, 1, 4)[0]
    new.load_state_dict(old[0].state_dict())
    with caplog.at_level("WARNING", logger="launcher"):
        assert new.continue_epoch(0, 3) == len(new) - 10
    assert caplog.messages == ["world size 2 -> 1 at epoch 1 batch 3: the rest of the epoch covers the 40 samples "
                               "not yet seen, 10 batches per rank; data coverage is exact, the weights are not "
                               "bitwise those of an uninterrupted run"]
