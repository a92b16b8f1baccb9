"""Shared test helpers: the real CLI in a subprocess, the shared MNIST copy, tiny run settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"
SUPPORT = Path(__file__).resolve().parent / "support"
# quiet runs (no progress bar) in float32: the suite's numeric comparisons (FSDP vs DDP, XLA vs DDP,
# accumulation vs one big batch...) are written for float32, and the default precision=auto would make
# them depend on the CPU a run gets (bf16-mixed on AMX). Tests of `auto` itself leave QUIET out.
QUIET = ["trainer.progress=false", "trainer.precision=32"]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WANDB_API_KEY", None)
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(REPO), env.get("PYTHONPATH", "")])
    env["WANDB_SILENT"] = "true"
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` as a user types it; returns the finished process (text output)."""
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    if not (MNIST / "train-images-idx3-ubyte.gz").exists():
        if os.environ.get("CI"):  # CI has ../shared beside the clone: a missing copy is a broken setup
            pytest.fail(f"real MNIST not found at {MNIST}")
        pytest.skip(f"real MNIST not found at {MNIST}")
    return MNIST


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until `path` exists (e.g. a checkpoint to kill a run after); fails if `proc` ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.005)


def kill_when(args: list[str], cwd: Path, ready: Callable[[], bool], what: str, timeout: float = 120,
              **env: str) -> None:
    """Run `python -m launcher ARGS` and SIGKILL it (launcher and ranks) once `ready()`; fails if the run
    ends first or `what` has not happened within `timeout` seconds."""
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=cwd, env=cli_env(**env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def last_checkpoint(run_dir: Path) -> int:
    """The step of the run dir's latest complete checkpoint."""
    return max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")
               if (p / "manifest.json").exists())


def killed_then_resumed(args: list[str], run_dir: Path, step: int, cwd: Path, **env: str) -> str:
    """Run `python -m launcher ARGS`, SIGKILL it (launcher and ranks) once checkpoint `step` is
    committed in `run_dir`, run the same command again; the resumed run's "resumed from" line."""
    manifest = run_dir / "checkpoints" / f"step-{step:07d}" / "manifest.json"
    kill_when(args, cwd, manifest.exists, f"{manifest} appeared", **env)
    assert not (run_dir / "model.pt").exists(), "the run must really have been cut short"
    again = run_cli(args, cwd=cwd, **env)  # the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [ln for ln in (run_dir / "logs" / "rank-0.log").read_text().splitlines() if "resumed from" in ln]
    assert resumed, "the second run did not resume"
    return resumed[-1]


def mnist_small(root: Path, train: int = 2560, val: int = 1000) -> list[str]:
    return ["recipe=mnist", f"data.root={root}", f"data.train_limit={train}", f"data.val_limit={val}"]


def rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv as rows of strings (exact: two runs' histories compare equal only if bitwise)."""
    import csv

    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


class StopAt:
    """A stop request (what a SLURM signal becomes) agreed at one step: the run stops for a requeue there."""

    signame = "TEST"

    def __init__(self, step: int) -> None:
        self.step = step

    def agreed(self, step: int) -> bool:
        return step == self.step


def same_weights(a: Path, b: Path) -> None:
    """Two model.pt files hold bitwise the same tensors under the same names."""
    import torch

    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def wait_until(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    """Poll `predicate` while `proc` runs; fail naming `what` if it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-3000:] if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 1 MiB tmpfs, mounted for the test (root only: skipped with the reason elsewhere)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip() or out.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill_disk(mnt: Path, blocks_left: int = 0) -> Path:
    """Take every block of the filesystem at `mnt` but `blocks_left` (4 KiB each); the filler file."""
    filler = mnt / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:  # ENOSPC: every block taken
            pass
    if blocks_left:
        os.truncate(filler, filler.stat().st_size - blocks_left * 4096)
    return filler
