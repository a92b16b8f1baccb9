"""The coverage ledger (issue 25, item 4): RUN_DIR/ledger.jsonl says, per epoch, how often each
sample id was trained on all ranks, and is exact across kills, resumes at another world size and
DDP padding.

The CLI runs use the recipe of tests/support/seen_samples.py, whose model writes down the ids of every
batch each rank trained on (an independent record, made in the forward): the ledger's counts
(trainer.ledger_counts=true) must equal the counts of the trainings that the checkpoints kept.
In process: a resume that lost steps after its checkpoint, and a checkpoint without counts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import seen_samples
from conftest import QUIET, SUPPORT, cli_env, run_cli, wait_for_file
from launcher import Trainer
from launcher.checkpoint import format as F
from launcher.fit.ledger import digest


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]


def _counts(run_dir: Path, epoch: int) -> np.ndarray:
    return np.load(run_dir / "ledger" / f"epoch-{epoch:05d}.npy")


def _as_counter(counts: np.ndarray) -> Counter:
    return Counter({i: int(c) for i, c in enumerate(counts) if c})


def _args(tmp: Path, run_dir: Path, n: int, nproc: int, *extra: str) -> list[str]:
    return ["--config-dir", str(SUPPORT / "seen_conf"), "recipe=seen", f"model.out={tmp / 'seen'}", f"data.n={n}",
            f"trainer.nproc={nproc}", "trainer.gpus=0", "trainer.ledger_counts=true", *QUIET, f"run.dir={run_dir}",
            *extra]


@pytest.mark.slow
def test_two_sigkills_in_one_epoch_and_padding_are_counted_exactly(tmp_path: Path) -> None:
    """2 CPU ranks, 1001 samples (1002 slots: DDP pads one sample), a step checkpoint every 10 steps;
    the whole launcher SIGKILLed twice inside epoch 1, each time once a checkpoint after the resume
    point is on disk (the kill lands a few steps later: those steps are lost). Epoch 1's ledger is
    every sample once and the padded one twice, equal to the recorder's kept trainings; epoch 2 too."""
    n, run_dir, steps_per_epoch = 1001, tmp_path / "run", 126  # ceil(1001 / 2) = 501 a rank, batches of 4
    args = _args(tmp_path, run_dir, n, 2, "trainer.max_epochs=2", "checkpoint.every_n_steps=10")
    for kill_after in (20, 70):  # the second one inside the resumed attempt, same epoch
        proc = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=tmp_path, env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        wait_for_file(run_dir / "checkpoints" / f"step-{kill_after:07d}" / "manifest.json", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (run_dir / "ledger.jsonl").exists(), "killed after epoch 1 ended: the kills must be inside it"
    p = run_cli(args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]

    log = (run_dir / "logs" / "rank-0.log").read_text()
    resumed = [int(s) for s in re.findall(r"resumed from \S+: step (\d+), epoch 1 at batch", log)]
    assert len(resumed) == 2 and 20 <= resumed[0] < resumed[1] < steps_per_epoch, resumed
    first, second = _lines(run_dir)
    assert (first["epoch"], first["n"], first["step"], first["world_size"]) == (1, n, steps_per_epoch, 2)
    assert first["times"] == {"0": 0, "1": n - 1, "2+": 1} and first["max"] == 2 and first["trained"] == n + 1
    assert (first["partial"], first["complete"]) == (False, True)
    counts = _counts(run_dir, 1)
    assert digest(counts) == first["sha256"]
    assert _as_counter(counts) == seen_samples.kept(tmp_path / "seen", resumed, steps_per_epoch, 1), \
        "the ledger differs from the trainings the checkpoints kept"
    # epoch 2 starts from nothing: what epoch 1 carried through its checkpoints is not counted again
    assert second["times"] == first["times"] and second["step"] == 2 * steps_per_epoch
    assert _as_counter(_counts(run_dir, 2)) == seen_samples.kept(tmp_path / "seen", resumed, steps_per_epoch, 2)


@pytest.mark.slow
def test_a_resume_at_another_world_size_keeps_the_ledger_exact(tmp_path: Path) -> None:
    """2 ranks stop inside epoch 1 (max_steps: a partial line), the same run continues at 1 rank:
    the partial line is replaced by the whole epoch's, every sample once; epoch 2 at 1 rank too."""
    n, run_dir = 64, tmp_path / "run"
    p = run_cli(_args(tmp_path, run_dir, n, 2, "trainer.max_steps=3"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (partial,) = _lines(run_dir)
    assert (partial["epoch"], partial["partial"], partial["times"]) == (1, True, {"0": 40, "1": 24, "2+": 0})
    p = run_cli(_args(tmp_path, run_dir, n, 1), cwd=tmp_path)  # max_epochs=2, the recipe's
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world size 2 -> 1 at epoch 1 batch 3" in p.stderr, p.stderr[-2000:]

    first, second = _lines(run_dir)
    assert (first["epoch"], first["partial"], first["complete"], first["world_size"]) == (1, False, True, 1)
    assert first["times"] == second["times"] == {"0": 0, "1": n, "2+": 0}
    steps_per_epoch = {1: 3 + 10, 2: 16}  # 40 samples left, one rank, batches of 4; then 64 / 4
    seen: Counter = Counter()
    for f in sorted((tmp_path / "seen").glob("rank-*.txt")):
        for line in f.read_text().splitlines():
            pid, call, *ids = line.split()
            seen.update(int(i) for i in ids)  # nothing lost: each attempt ended at its own checkpoint
    both = _as_counter(_counts(run_dir, 1) + _counts(run_dir, 2).astype(np.int64))
    assert both == seen and sum(seen.values()) == 2 * n
    assert second["step"] == sum(steps_per_epoch.values())


# ---- in process -----------------------------------------------------------------------------------


def _fit(run_dir: Path, n: int = 50, **kw) -> Trainer:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(n, 3), torch.randn(n, 1))
    net = torch.nn.Linear(3, 1)
    t = Trainer(batch_size=4, run_dir=str(run_dir), progress=False, summary=False, precision="32",
                monitor="train_loss", **{"max_epochs": 1, **kw})
    t.fit(net, torch.nn.MSELoss(), torch.optim.SGD(net.parameters(), lr=0.01), data)
    return t


def test_steps_lost_after_a_checkpoint_are_not_counted_and_the_carried_ones_are(tmp_path: Path) -> None:
    """A run that trained 5 of an epoch's 13 steps, whose newest checkpoint is lost (as in a crash after
    step 3): resumed, epoch 1 is every sample exactly once. A ledger that dropped the checkpoint's counts
    would leave 12 samples at 0; one that kept the lost steps would count 8 twice."""
    run_dir = tmp_path / "run"
    _fit(run_dir, max_steps=5, checkpoint_every_n_steps=3, ledger_counts=True)
    (partial,) = _lines(run_dir)
    assert partial["times"] == {"0": 30, "1": 20, "2+": 0} and partial["partial"]
    assert digest(_counts(run_dir, 1)) == partial["sha256"]
    sd = F.load(run_dir / "checkpoints" / "step-0000003")["ledger"]
    assert (sd["epoch"], sd["n"], int(sd["counts"].sum()), sd["counts"].dtype) == (0, 50, 12, torch.uint8)
    F.remove_tree(run_dir / "checkpoints" / "step-0000005")
    _fit(run_dir)  # without ledger_counts: the partial line's counts go with it
    (line,) = _lines(run_dir)
    assert line["times"] == {"0": 0, "1": 50, "2+": 0} and not line["partial"] and line["complete"]
    assert line["sha256"] == digest(np.ones(50, np.uint8)) and not (run_dir / "ledger" / "epoch-00001.npy").exists()


def test_an_epoch_resumed_without_counts_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Stopped inside an epoch with the ledger off, continued with it on: the epoch's line counts only
    what came after the resume, and says it is not complete; later epochs are whole again."""
    run_dir = tmp_path / "run"
    _fit(run_dir, max_steps=5, ledger=False)
    assert not (run_dir / "ledger.jsonl").exists()
    assert F.load(run_dir / "checkpoints" / "step-0000005")["ledger"] is None
    with caplog.at_level("WARNING", logger="launcher"):
        _fit(run_dir, max_epochs=2)
    first, second = _lines(run_dir)
    assert (first["complete"], first["times"]) == (False, {"0": 20, "1": 30, "2+": 0})
    assert (second["complete"], second["times"]) == (True, {"0": 0, "1": 50, "2+": 0})
    assert any("epoch 1 was resumed from a checkpoint without its counts" in m for m in caplog.messages)
