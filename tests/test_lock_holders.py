"""The run dir's lock follows the living (issue 22): CPU ranks forked by the launcher share its
open `.lock` and so its flock; when the launcher is killed while they live on, they keep the lock,
and a second start's refusal names them (pids, running or stopped) and how to end them, not the
dead launcher's pid of the record. Real processes: 2 CPU ranks, real SIGSTOP / SIGKILL."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from conftest import QUIET, cli_env, run_cli

# 280 samples, 2 ranks x 20 a step: 7 steps an epoch; a checkpoint every 35 steps
ARGS = ["recipe=linreg", *QUIET, "trainer.gpus=0", "trainer.nproc=2", "trainer.max_epochs=100000",
        "checkpoint.every_n_epochs=5"]


def _stat(pid: int) -> Optional[list[str]]:
    """/proc/PID/stat's fields after the command name (state first), None once the process is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _rank_pid(run_dir: Path, rank: int) -> int:
    lines = [ln for ln in (run_dir / "logs" / f"rank-{rank}.log").read_text().splitlines() if ", pid " in ln]
    return int(lines[-1].rsplit(", pid ", 1)[1])


def _wait(what: str, done: "object", timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _lock_free(run_dir: Path) -> bool:
    """Neither the launcher's lock nor the ranks' (rundir/lock.py RANKS_FILE) is held by anyone."""
    for name in (".lock", ".lock.ranks"):
        fd = os.open(run_dir / name, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # (the flock, if taken, goes with it)
    return True


def _refusal(run_dir: Path, cwd: Path) -> str:
    p = run_cli([*ARGS, f"run.dir={run_dir}"], cwd=cwd, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("launcher: error: "), p.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_refusal_names_the_processes_that_hold_the_lock_and_how_to_end_them(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([sys.executable, "-m", "launcher", *ARGS, f"run.dir={run_dir}"], cwd=tmp_path,
                                 env=cli_env(), stdout=subprocess.DEVNULL, stderr=err)
    started: dict[int, str] = {}  # pid -> its start time: teardown kills these processes, never a reused pid
    try:
        _wait("the first checkpoint", lambda: (run_dir / "checkpoints" / "last").exists() or first.poll() is not None)
        assert first.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
        ranks = sorted(_rank_pid(run_dir, r) for r in (0, 1))
        started = {pid: (_stat(pid) or [""] * 20)[19] for pid in (first.pid, *ranks)}
        a, b = ranks

        # Ctrl-Z: the launcher stopped, its ranks (own sessions) train on; the launcher holds the lock, the ranks
        # theirs (.lock.ranks)
        os.kill(first.pid, signal.SIGSTOP)
        _wait("the launcher to stop", lambda: (_stat(first.pid) or ["?"])[0] == "T")
        line = _refusal(run_dir, tmp_path)
        assert f"in use by another run (pid {first.pid} on host" in line, line
        held = sorted([(first.pid, "stopped"), (a, "running"), (b, "running")])
        assert "its lock is held by " + ", ".join(f"pid {p} ({s})" for p, s in held) in line, line
        assert f"(kill -CONT {first.pid} continues it; kill -KILL {' '.join(str(p) for p, _ in held)} ends it)" \
            in line, line

        # the ranks frozen, the launcher killed: the ranks keep theirs, and the record names a dead pid
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        first.kill()
        first.wait(timeout=30)
        line = _refusal(run_dir, tmp_path)
        assert f"in use by the processes of another run (its launcher, pid {first.pid} on host" in line, line
        assert f"is gone): its lock is held by pid {a} (stopped), pid {b} (stopped); valid: " in line, line
        assert f"they are stopped and never end by themselves: end them with kill -KILL {a} {b}; the same " \
               "command then resumes from the last checkpoint" in line, line
        assert not _lock_free(run_dir), "nothing taken over while they live"

        # what the line says to do, as a user would: then the run dir is free and the run resumes
        command = re.search(r"(kill -KILL [\d ]+);", line).group(1)  # type: ignore[union-attr]
        assert subprocess.run(command, shell=True).returncode == 0
        _wait("the lock to be released", lambda: _lock_free(run_dir), timeout=30)
        last = int(os.readlink(run_dir / "checkpoints" / "last").split("-")[1])
        p = run_cli([*ARGS, f"trainer.max_steps={last + 7}", f"run.dir={run_dir}"], cwd=tmp_path, timeout=180)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"its previous owner (pid {first.pid} on host" in p.stderr and "resumed from" in p.stderr, p.stderr
    finally:
        for pid, since in started.items():  # ranks left stopped if the test failed half-way
            if (_stat(pid) or [""] * 20)[19] == since:
                os.kill(pid, signal.SIGKILL)
        if first.poll() is None:
            first.kill()
            first.wait()


def test_a_released_lock_is_free_though_a_child_forked_while_it_was_held_lives_on(tmp_path: Path) -> None:
    """Loader workers are forked from a rank holding the run dir's lock and share its open file: a
    release that only closed its descriptor left the flock with them (fit() in the Python API with
    workers still alive, then a second fit() on the same run dir, was refused)."""
    from launcher.rundir.lock import RunLock

    lock = RunLock.acquire(tmp_path)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # a worker: holds the inherited descriptor until told to go
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        lock.release()
        RunLock.acquire(tmp_path).release()  # refused ("in use by the processes of another run") before
    finally:
        os.close(w)
        os.waitpid(child, 0)
