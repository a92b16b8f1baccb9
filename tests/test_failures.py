"""A rank that raises ends the whole run promptly, non-zero, with its traceback; Ctrl-C stops all ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import QUIET, cli_env, run_cli

FAULTY = ["recipe=linreg", "model._target_=faulty.FaultyLinear", "trainer.gpus=0", "trainer.nproc=2",
          "trainer.max_epochs=50", *QUIET]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_a_rank_raising_ends_the_run_within_seconds(tmp_path: Path) -> None:
    t0 = time.monotonic()
    p = run_cli([*FAULTY, f"run.dir={tmp_path / 'r'}"], cwd=tmp_path, timeout=120, FAULT_RANK="1", FAULT_STEP="30")
    elapsed = time.monotonic() - t0
    assert p.returncode == 1, p.stderr[-2000:]
    assert "launcher: rank 1 failed" in p.stderr
    assert "RuntimeError: injected failure on rank 1 at step 30" in p.stderr
    assert "faulty.py" in p.stderr, "the failing rank's traceback is shown"
    assert elapsed < 30, f"took {elapsed:.1f}s: the other rank must not hang in a collective"
    assert not (tmp_path / "r" / "model.pt").exists()
    # the run dir says why the attempt ended: the failed rank's log, with its traceback (its peer may
    # be stopped by the agent before it notices, so its log is not asked)
    failed = (tmp_path / "r" / "logs" / "rank-1.log").read_text()
    assert "run failed: RuntimeError: injected failure on rank 1 at step 30" in failed and "faulty.py" in failed


def test_a_single_rank_raising_exits_1_with_traceback(tmp_path: Path) -> None:
    p = run_cli(["recipe=linreg", "model._target_=faulty.FaultyLinear", *QUIET, f"run.dir={tmp_path / 'r'}"],
                cwd=tmp_path, timeout=120, FAULT_RANK="0", FAULT_STEP="3")
    assert p.returncode == 1
    assert "RuntimeError: injected failure on rank 0 at step 3" in p.stderr and "Traceback" in p.stderr


def test_ctrl_c_stops_every_rank(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *FAULTY, "trainer.max_epochs=100000",
                             f"run.dir={run_dir}"], cwd=tmp_path, env=cli_env(FAULT_RANK="-1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (run_dir / "logs" / "rank-1.log").exists() or len(_children(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:] if proc.poll() else ""
        time.sleep(0.05)
    time.sleep(1.0)  # training
    ranks = _children(proc.pid)
    # A terminal's Ctrl-C signals the foreground process group: the launcher (ranks have their own sessions).
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=30)
    err = proc.stderr.read()
    assert code == 130, err[-2000:]
    assert "interrupted" in err
    deadline = time.monotonic() + 10
    while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(r) for r in ranks), "ranks left running after Ctrl-C"
