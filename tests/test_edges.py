"""Faults at the edges (issue 22), through the real CLI with real faults: a rank held before it joins
the process group (trainer.join_timeout_s), a full disk and a read-only run dir at 1 and 2 ranks
(real tmpfs mounts), and a malformed torchrun / srun environment named as itself."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import QUIET, REPO, SUPPORT, fill_disk, run_cli

LINREG = ["recipe=linreg", *QUIET, "logger.csv.plots=false"]  # 280 samples, batch 20: 7 steps per epoch on 2 ranks


def _errors(stderr: str) -> list[str]:
    """The lines of stderr that are not the run's own progress (`[launcher] ...`, the summary table,
    the closing `launcher: done: RUN_DIR (...)`)."""
    return [ln for ln in stderr.splitlines()
            if ln.strip() and not ln.startswith(("[launcher]", "  ", "launcher: done: "))]


# ---- A. a rank that does not join --------------------------------------------------------------------

# A real hold on one rank, before it joins: its main thread sleeps at the moment the worker hides the
# GPUs from it (trainer.gpus=0), just before dist.init. An audit hook set in the launcher's process
# (this sitecustomize, found on PYTHONPATH) is inherited by the ranks elastic forks from it; no code of
# the launcher's knows about it. It notes when the hold began, to time the run's end against.
HOLD = '''
import os, sys, time

def _hold(event, args):
    if event != "os.putenv" or args[0] not in (b"CUDA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        return
    rank = os.environ.get("RANK")
    if rank is not None and os.environ["EDGE_HOLD"] in (rank, "all"):
        with open(os.path.join(os.environ["EDGE_NOTES"], f"held-{rank}"), "w") as f:
            f.write(repr(time.time()))
        time.sleep(3600)

sys.addaudithook(_hold)
'''


def _held_run(tmp_path: Path, hold: str, join_timeout_s: float) -> tuple[subprocess.CompletedProcess, float, Path]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HOLD)
    notes = tmp_path / "notes"
    notes.mkdir()
    run_dir = tmp_path / "r"
    p = run_cli([*LINREG, "trainer.gpus=0", "trainer.nproc=2", "trainer.max_epochs=1",
                 f"trainer.join_timeout_s={join_timeout_s}", f"run.dir={run_dir}"], cwd=tmp_path, timeout=300,
                PYTHONPATH=os.pathsep.join([str(site), str(SUPPORT), str(REPO)]), EDGE_HOLD=hold, EDGE_NOTES=str(notes))
    ended = time.time()
    held = [float(f.read_text()) for f in notes.iterdir()]
    assert held, f"no rank was held: {p.stderr[-3000:]}"
    return p, ended - min(held), run_dir


def test_a_rank_held_before_joining_is_named_with_its_stack_and_the_run_ends_near_the_bound(tmp_path: Path) -> None:
    """Rank 1 sleeps before it joins; rank 0 joined. Without the start-up bound, rank 0 would wait
    trainer.dist_timeout_s (600 s) inside init_process_group."""
    p, after_hold, run_dir = _held_run(tmp_path, "1", 4)
    assert p.returncode == 1, p.stderr[-3000:]
    lines = _errors(p.stderr)
    log = run_dir / "logs" / "rank-1.log"
    assert lines == [f"launcher: rank 1 did not join the process group within trainer.join_timeout_s=4 s (the other 1 "
                     f"joined and waited); its stack: {log}"], p.stderr[-3000:]
    assert 4 <= after_hold < 4 + 8, f"the run ended {after_hold:.1f} s after rank 1 was held"
    stack = log.read_text()
    assert "in _hold" in stack and "sitecustomize.py" in stack, stack  # where it is stuck,
    assert "in _join" in stack and "worker.py" in stack, stack  # and how it got there
    assert "did not join the process group" in (run_dir / "logs" / "rank-0.log").read_text()


@pytest.mark.slow
def test_every_rank_held_ends_the_run_by_their_own_watchdogs(tmp_path: Path) -> None:
    """Nobody joined, so nobody can name the others: each rank's watchdog reports itself, shortly
    after the bound (JoinWatch.GRACE_S), and the run ends."""
    p, after_hold, run_dir = _held_run(tmp_path, "all", 3)
    assert p.returncode == 1, p.stderr[-3000:]
    lines = _errors(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("launcher: rank "), p.stderr[-3000:]
    assert "had not joined the process group 5 s after it started (trainer.join_timeout_s=3)" in lines[0], lines[0]
    assert 5 <= after_hold < 5 + 8, f"the run ended {after_hold:.1f} s after the ranks were held"
    rank = lines[0].split()[2]
    assert "in _hold" in (run_dir / "logs" / f"rank-{rank}.log").read_text()


def test_join_timeout_must_be_positive(tmp_path: Path) -> None:
    p = run_cli(["recipe=linreg", "trainer.join_timeout_s=0", f"run.dir={tmp_path / 'r'}"], cwd=tmp_path, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["launcher: error: trainer.join_timeout_s=0.0: must be > 0 seconds"]


# ---- B. a full disk, a read-only run dir, at any rank count ----------------------------------------

def _leftovers(tmp: Path) -> list[str]:
    """What the ranks' error files (elastic's, torch.multiprocessing's) left in the temp dir."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(("launcher-elastic-", "pytorch-errorfile-")))


# blocks left: 3 fails while the run starts (closing the first log file on a full disk), 6 at the
# first checkpoint; at 2 ranks both used to end in a JSONDecodeError traceback from the elastic agent
# (rank 0's report was an empty file in RUN_DIR/logs/elastic) or in a traceback per rank, exit 1
@pytest.mark.slow
@pytest.mark.parametrize("ranks,blocks_left", [(1, 3), (2, 3), (1, 6), (2, 6)])
def test_a_full_disk_is_one_line_at_any_rank_count(tmp_path: Path, small_fs: Path, ranks: int,
                                                    blocks_left: int) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    fill_disk(small_fs, blocks_left)
    run_dir = small_fs / "r"
    p = run_cli([*LINREG, "trainer.gpus=0", f"trainer.nproc={ranks}", "trainer.max_epochs=2", f"run.dir={run_dir}"],
                cwd=tmp_path, TMPDIR=str(tmp))
    assert p.returncode == 2, p.stderr[-3000:]
    lines = _errors(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("launcher: error: "), p.stderr[-3000:]
    assert "No space left on device (ENOSPC); valid: free some space" in lines[0], lines[0]
    assert not list(run_dir.rglob(".tmp-*")), "nothing half-written stays"
    assert not (run_dir / "logs" / "elastic").exists()
    assert _leftovers(tmp) == []


@pytest.mark.parametrize("blocks_left,expected", [
    (5, "No space left on device (ENOSPC); valid: free some space"),  # the report fits the room taken at start
    (3, "stopped on a user error (exit code 2) but could not write its one-line report"),  # no room at all
])
@pytest.mark.slow
def test_a_full_disk_that_also_holds_the_temp_dir_is_one_line_at_2_ranks(tmp_path: Path, small_fs: Path,
                                                                          blocks_left: int, expected: str) -> None:
    """TMPDIR on the disk the run fills (one disk for everything): the ranks' reports live there too."""
    tmp = small_fs / "tmp"
    tmp.mkdir()
    fill_disk(small_fs, blocks_left)
    p = run_cli([*LINREG, "trainer.gpus=0", "trainer.nproc=2", "trainer.max_epochs=2", f"run.dir={small_fs / 'r'}"],
                cwd=tmp_path, TMPDIR=str(tmp))
    assert p.returncode == 2, p.stderr[-3000:]
    lines = _errors(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("launcher: error: ") and expected in lines[0], p.stderr[-3000:]
    assert _leftovers(tmp) == []


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_read_only_run_dir_at_any_rank_count(tmp_path: Path, small_fs: Path, ranks: int) -> None:
    """Finished: `run complete`, exit 0, nothing written (at 2 ranks elastic used to create its log
    folder in the run dir first: a traceback, exit 1). Training left: one line, exit 2."""
    run_dir = small_fs / "r"
    base = [*LINREG, "trainer.gpus=0", f"trainer.nproc={ranks}", "trainer.max_epochs=1", f"run.dir={run_dir}"]
    assert run_cli(base, cwd=tmp_path).returncode == 0
    files = sorted(str(q.relative_to(run_dir)) for q in run_dir.rglob("*"))
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_fs)]).returncode == 0
    p = run_cli(base, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "run complete at epoch 1" in p.stderr and _errors(p.stderr) == [], p.stderr[-3000:]
    assert sorted(str(q.relative_to(run_dir)) for q in run_dir.rglob("*")) == files
    p = run_cli([*base, "trainer.max_epochs=2"], cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = _errors(p.stderr)
    assert len(lines) == 1 and "Read-only file system (EROFS); valid: a path on a writable filesystem" in lines[0], \
        p.stderr[-3000:]


# ---- C. a malformed torchrun / srun environment, named as itself -------------------------------------

SRUN = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0"}  # a task of an srun step

# (environment, extra overrides, the one line after "launcher: error: ")
ENVS: list[tuple[dict[str, str], list[str], str]] = [
    # torchmetrics reads LOCAL_RANK with int() at import: it used to be blamed on metrics.mae._target_
    ({"LOCAL_RANK": "abc"}, [], "env LOCAL_RANK='abc': not an integer; valid: an integer >= 0"),
    ({"RANK": "abc"}, [], "env RANK='abc': not an integer; valid: an integer >= 0"),
    ({"LOCAL_WORLD_SIZE": "abc"}, [], "env LOCAL_WORLD_SIZE='abc': not an integer; valid: an integer >= 0"),
    ({"LOCAL_RANK": "0"}, [], "env LOCAL_RANK='0': set without RANK and WORLD_SIZE (a partial torchrun environment); "
                              "valid: RANK and WORLD_SIZE with it, or none of them"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"}, [],
     "env MASTER_PORT='abc': not a TCP port; valid: 1..65535"),
    # srun's own variables, read with int() (submitit, export_env) before the torch ones exist
    ({**SRUN, "SLURM_PROCID": "abc"}, ["launcher=slurm"],
     "env SLURM_PROCID='abc': not an integer; valid: an integer >= 0 (as srun sets it)"),
    ({**SRUN, "SLURM_NTASKS": "two"}, ["launcher=slurm"],
     "env SLURM_NTASKS='two': not an integer; valid: an integer >= 0 (as srun sets it)"),
    ({**SRUN, "SLURM_LOCALID": "-1"}, ["launcher=slurm"],
     "env SLURM_LOCALID='-1': negative; valid: an integer >= 0 (as srun sets it)"),
]


@pytest.mark.parametrize("env,overrides,expected", ENVS, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _, _ in ENVS])
def test_a_malformed_rank_environment_is_named(tmp_path: Path, env: dict[str, str], overrides: list[str],
                                               expected: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    p = run_cli(["recipe=linreg", *overrides, f"run.dir={work / 'run'}"], cwd=work, timeout=120, **env)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines() == [f"launcher: error: {expected}"], p.stderr[-3000:]
    assert list(work.iterdir()) == [], "nothing may be written"
