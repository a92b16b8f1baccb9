"""Atomic checkpoints: an interrupted save leaves the previous one loadable; damage is named and skipped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import QUIET, REPO, run_cli
from launcher.checkpoint import format as ckpt

KILLED_WRITER = """
import sys, torch
from pathlib import Path
from launcher.checkpoint import format as ckpt
# ~400 MB: big enough that the kill lands while the file is being written
ckpt.write(Path(sys.argv[1]), {"w": torch.ones(100_000_000)}, {"step": 2})
"""


def test_save_killed_half_way_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    ckpt.write(d / ckpt.step_name(1), {"w": torch.arange(5.0)}, {"step": 1})
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(d / ckpt.step_name(2))],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    partial = ckpt.staging(d / ckpt.step_name(2)) / ckpt.STATE
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 1_000_000):
        assert proc.poll() is None and time.monotonic() < deadline, "the writer finished before it could be killed"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (d / ckpt.step_name(2)).exists(), "an unfinished save must never carry a step-* name"
    found = ckpt.latest(d)
    assert found == d / ckpt.step_name(1)
    assert torch.equal(ckpt.load(found)["w"], torch.arange(5.0))
    ckpt.clean_temp(d)
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest"])
def test_damaged_newest_is_named_and_the_previous_is_used(tmp_path: Path, damage: str, caplog) -> None:
    d = tmp_path / "checkpoints"
    ckpt.write(d / ckpt.step_name(10), {"w": torch.zeros(1000)}, {"step": 10})
    newest = ckpt.write(d / ckpt.step_name(20), {"w": torch.ones(1000)}, {"step": 20})
    state = newest / ckpt.STATE
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:-100])
    elif damage == "flip":
        raw = bytearray(state.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        state.write_bytes(bytes(raw))
    else:
        (newest / ckpt.MANIFEST).unlink()
    with pytest.raises(ValueError, match="step-0000020"):
        ckpt.load(newest)
    with caplog.at_level("WARNING", logger="launcher"):
        assert ckpt.latest(d) == d / ckpt.step_name(10)
    assert "step-0000020" in caplog.text


def test_checkpoint_holds_the_whole_resumable_state(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    p = run_cli(["recipe=linreg", "trainer.max_epochs=3", "checkpoint.every_n_steps=5", *QUIET,
                 f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    names = sorted(x.name for x in (run_dir / "checkpoints").iterdir())
    # keep_last=2 newest + top-1 best (the last epoch's is also the newest), plus the links
    assert names == ["best", "last", "step-0000040", "step-0000042"], names
    sd = ckpt.load(run_dir / "checkpoints" / "last")
    assert set(sd) >= {"model", "optimizer", "scheduler", "loop", "early_stopping", "checkpointer", "ranks",
                       "data", "run_id", "config"}
    assert sd["loop"]["step"] == 42 and sd["loop"]["epoch"] == 3 and sd["loop"]["batch_in_epoch"] == 0
    assert {"python", "numpy", "torch"} <= set(sd["ranks"][0]["rng"])
    assert sd["optimizer"]["state"], "Adam moments are saved"
    assert len(sd["loop"]["history"]) == 3 and sd["config"]["trainer"]["max_epochs"] == 3
    assert (run_dir / "checkpoints" / "best").resolve().name == "step-0000042"
