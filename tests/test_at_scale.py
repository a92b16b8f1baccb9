"""The largest runs this machine allows (issue 14): 16 ranks training together, on a real SLURM
cluster of 8 fake nodes x 2 tasks (preempted once, requeued, resumed bitwise) and as 16 local CPU
ranks through elastic (one rank SIGKILLed, the group restarted, resumed bitwise).

Marked `scale` and left out of the default run (pyproject's addopts: -m "not scale"): on 2 cores
they take minutes. Run them with

    python -m pytest -q -m scale tests/test_at_scale.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUIET, REPO, cli_env, run_cli
from conftest import rows as _rows
from conftest import same_weights as _same_weights
from conftest import wait_until as _wait

pytestmark = [pytest.mark.scale, pytest.mark.slow]  # (slow too: `-m "not slow"` replaces addopts' -m)

# linreg: 320 training samples; 16 ranks x 4 per batch = 5 steps an epoch
SMALL = ["recipe=linreg", "trainer.gpus=0", "trainer.batch_size=4", "trainer.max_epochs=4", "trainer.summary=false",
         "trainer.dist_timeout_s=120", *QUIET]


def test_16_local_ranks_one_killed_restart_and_resume_bitwise(tmp_path: Path) -> None:
    args = [*SMALL, "trainer.nproc=16", "checkpoint.every_n_steps=3", "launcher.max_restarts=1"]
    ref = tmp_path / "ref"
    p = run_cli([*args, f"run.dir={ref}"], cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 15 of 16" in (ref / "logs" / "rank-15.log").read_text()
    assert [int(r["step"]) for r in _rows(ref)] == [5, 10, 15, 20]

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *args, f"run.dir={cut}"], cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait((cut / "checkpoints" / "step-0000012" / "manifest.json").exists, proc, "checkpoint 12", timeout=600)
    log = (cut / "logs" / "rank-11.log").read_text().splitlines()
    os.kill(int([ln for ln in log if ", pid " in ln][-1].rsplit(", pid ", 1)[1]), signal.SIGKILL)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()[-3000:]  # type: ignore[union-attr]
    assert "resumed from" in (cut / "logs" / "rank-0.log").read_text()
    _same_weights(ref / "model.pt", cut / "model.pt")
    assert _rows(cut) == _rows(ref)


@pytest.fixture(scope="module")
def eight_nodes():  # type: ignore[no-untyped-def]
    """The CI cluster reconfigured to 8 fake nodes for this module, and put back to 2 after."""
    up = REPO / "slurm" / "ci" / "up.sh"
    done = subprocess.run(["bash", str(up)], env={**os.environ, "SLURM_CI_NODES": "8", "SLURM_CI_CPUS": "2"},
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"slurm/ci/up.sh with 8 nodes failed: {(done.stderr or done.stdout)[-800:]}")
    yield
    subprocess.run(["bash", str(up)], capture_output=True, text=True)


def test_16_slurm_ranks_on_8_nodes_preempted_requeued_and_resumed_bitwise(eight_nodes, tmp_path: Path) -> None:
    slurm = ["launcher=slurm", "launcher.poll_s=0.5", "launcher.time_min=20", "trainer.nodes=8", "trainer.nproc=2",
             "launcher.signal_check_every_n_steps=1", "checkpoint.every_n_steps=0"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = run_cli([*SMALL, *slurm, "launcher.wait=true", f"run.dir={ref}"], cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "8 node(s) x 2 CPU task(s)/node = 16 rank(s)" in p.stderr
    assert "on node n8" in (ref / "logs" / "rank-15.log").read_text()

    p = run_cli([*SMALL, *slurm, f"run.dir={cut}"], cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    job = next(ln for ln in p.stderr.splitlines() if "submitted job" in ln).split("submitted job ")[1].split(";")[0]
    deadline = time.monotonic() + 600
    while not (cut / "checkpoints" / "last").exists():  # epoch 1 saved: the signal lands inside epoch 2
        assert time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.05)
    t_signal = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", job], check=True)

    def states() -> list[str]:
        out = subprocess.run(["sacct", "-n", "-X", "-D", "-j", job, "-o", "State"], capture_output=True, text=True)
        return out.stdout.split()

    while "COMPLETED" not in states():
        assert time.monotonic() < deadline + 600, f"job {job} did not finish: {states()}"
        assert "FAILED" not in states(), (cut / "logs" / "rank-0.log").read_text()[-3000:]
        time.sleep(1)
    assert states()[0] == "REQUEUED"
    log = (cut / "logs" / "rank-0.log").read_text()
    assert "for a requeue (signal USR1)" in log and "resumed from" in log, log[-3000:]
    print(f"signal -> requeued job completed: {time.monotonic() - t_signal:.1f} s")
    _same_weights(ref / "model.pt", cut / "model.pt")
    assert _rows(cut) == _rows(ref)
