"""Random augmentation in a map-style dataset's __getitem__ is seeded per sample from (seed, epoch,
index) (issue 25): the same batches with 0 or 2 loader workers, at 1 or 2 ranks and from a resume
point; reading samples in the training process leaves its RNG streams (dropout) alone; and a run with
workers on 2 ranks SIGKILLed mid-epoch resumes bitwise. tests/support/augment_samples.py is the data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from augment_samples import Augmented
from conftest import QUIET, SUPPORT, cli_env, run_cli, same_weights, wait_for_file
from launcher.device.dist import Dist
from launcher.fit.data import Batches
from launcher.fit.seeding import rng_state


def _by_index(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """sample index -> the augmented sample as read (its noise lives in features 1..3)."""
    return {int(row[0]): row for x, _ in batches for row in x}


def _read(ranks: int, workers: int, epoch: int, start: int = 0) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for r in range(ranks):
        b = Batches(Augmented(24), Dist(rank=r, world_size=ranks), train=True, batch_size=4, seed=3,
                    num_workers=workers)
        seen.update(_by_index(list(b.epoch(epoch, start=start))))
    return seen


def test_augmentation_is_the_same_with_0_or_2_workers_1_or_2_ranks_and_resumed() -> None:
    one = _read(1, 0, epoch=1)
    assert sorted(one) == list(range(24))
    for name, other in (("2 workers", _read(1, 2, epoch=1)), ("2 ranks", _read(2, 0, epoch=1)),
                        ("2 ranks x 2 workers", _read(2, 2, epoch=1))):
        assert other.keys() == one.keys(), name
        assert all(torch.equal(one[i], other[i]) for i in one), f"{name}: other augmentation"
    resumed = _read(1, 2, epoch=1, start=3)  # the last 3 of 6 batches, read by fresh workers
    assert len(resumed) == 12 and all(torch.equal(one[i], resumed[i]) for i in resumed)
    again = _read(1, 0, epoch=2)
    assert not any(torch.equal(one[i][1:], again[i][1:]) for i in one), "each epoch draws anew"


def test_reading_in_the_training_process_leaves_its_rng_streams_alone() -> None:
    torch.manual_seed(5)
    before = rng_state()
    list(Batches(Augmented(8), Dist(), train=True, batch_size=4, num_workers=0).epoch(0))
    after = rng_state()
    assert torch.equal(before["torch"], after["torch"])
    assert before["python"] == after["python"]
    assert all(np.array_equal(a, b) for a, b in zip(before["numpy"], after["numpy"]))
    list(Batches(Augmented(8), Dist(), train=True, batch_size=4, seed_per_sample=False).epoch(0))
    assert not torch.equal(after["torch"], torch.get_rng_state()), "seed_per_sample=false: the run's own streams"


@pytest.mark.slow
def test_two_ranks_with_workers_killed_mid_epoch_resume_bitwise(tmp_path: Path) -> None:
    def args(run_dir: Path) -> list[str]:
        return ["--config-dir", str(SUPPORT / "augment_conf"), "recipe=augment", "trainer.gpus=0",
                "trainer.nproc=2", "trainer.num_workers=2", "checkpoint.every_n_steps=3", *QUIET,
                f"run.dir={run_dir}"]

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = run_cli(args(ref), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *args(cut)], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_file(cut / "checkpoints" / "step-0000015" / "manifest.json", proc)  # 12 steps an epoch: inside epoch 2
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (cut / "model.pt").exists(), "the run must really have been cut short"
    again = run_cli(args(cut), cwd=tmp_path)  # the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [ln for ln in (cut / "logs" / "rank-0.log").read_text().splitlines() if "resumed from" in ln]
    assert resumed and "epoch 2 at batch" in resumed[-1] and "at batch 0" not in resumed[-1], resumed
    same_weights(ref / "model.pt", cut / "model.pt")


class _Pids(Augmented):
    """Augmented, with the pid of the process that read each sample as its last feature."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().__getitem__(i)
        return torch.cat([x.double(), torch.tensor([float(os.getpid())], dtype=torch.float64)]), y


def _epochs(b: Batches, plan: list[tuple[int, int]]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return [list(b.epoch(e, start=s)) for e, s in plan]


def test_persistent_workers_live_across_epochs_and_read_the_same_batches() -> None:
    plan = [(0, 0), (1, 0), (1, 2), (2, 0)]  # (1, 2): epoch 2 resumed at batch 2 by the same loader
    kw = dict(train=True, batch_size=4, seed=3)
    kept = Batches(_Pids(24), Dist(rank=1, world_size=2), num_workers=2, persistent_workers=True, **kw)
    got = _epochs(kept, plan)
    pids = [{int(x[-1]) for xb, _ in ep for x in xb} for ep in got]
    assert len(pids[0]) == 2 and os.getpid() not in pids[0], pids
    assert all(p and p <= pids[0] for p in pids), f"workers restarted between epochs: {pids}"
    for workers in (0, 2):  # a loader per epoch, in the rank or in fresh workers: the same batches
        fresh = _epochs(Batches(_Pids(24), Dist(rank=1, world_size=2), num_workers=workers, **kw), plan)
        assert [len(ep) for ep in fresh] == [len(ep) for ep in got] == [3, 3, 1, 3]
        for a, b in zip(got, fresh):
            assert all(torch.equal(xa[:, :-1], xb[:, :-1]) and torch.equal(ya, yb)
                       for (xa, ya), (xb, yb) in zip(a, b)), f"{workers} workers: other batches"
    assert kept.served == (2, 0, kept.indices(2)), "the ledger's record of the epoch"

    saved = Batches(_Pids(24), Dist(rank=0, world_size=3), num_workers=0, **kw).state_dict()
    resized = []  # 3 ranks -> 2 after 1 batch of epoch 2: the rest of it, then epoch 3, on one loader
    for persistent in (True, False):
        b = Batches(_Pids(24), Dist(rank=1, world_size=2), num_workers=2, persistent_workers=persistent, **kw)
        b.load_state_dict(saved)
        resized.append([x[:, :-1] for x, _ in b.epoch(1, start=b.continue_epoch(1, 1))] +
                       [x[:, :-1] for x, _ in b.epoch(2)])
    assert len(resized[0]) == 5 and all(torch.equal(a, b) for a, b in zip(*resized)), "resized: other batches"


def test_a_loaders_own_worker_settings_are_kept_and_the_trainer_keys_are_checked() -> None:
    from torch.utils.data import DataLoader

    from launcher.config import ConfigError, TrainerConfig, check_trainer

    b = Batches(DataLoader(Augmented(8), batch_size=4, num_workers=2, persistent_workers=True, prefetch_factor=5),
                Dist(), train=True, prefetch_factor=3)
    assert (b.loader_kw["persistent_workers"], b.loader_kw["prefetch_factor"]) == (True, 5)
    b = Batches(Augmented(8), Dist(), train=True, batch_size=4, num_workers=1, prefetch_factor=3)
    assert (b.loader_kw["persistent_workers"], b.loader_kw["prefetch_factor"]) == (False, 3)
    for key, value in (("persistent_workers", True), ("prefetch_factor", 4)):
        with pytest.raises(ConfigError, match=rf"trainer.{key}=.*num_workers"):
            check_trainer(TrainerConfig(**{key: value}))
    check_trainer(TrainerConfig(num_workers=2, persistent_workers=True, prefetch_factor=4))
