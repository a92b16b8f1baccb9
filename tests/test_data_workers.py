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
