"""trainer.accelerator=xla without a TPU: the missing-package error, and the whole code path run
against a CPU stand-in for torch_xla (tests/support/fake_xla), used only when torch_xla is absent."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import QUIET, SUPPORT, run_cli
from launcher.device import xla

pytestmark = pytest.mark.skipif(xla.available(), reason="the real torch_xla is installed: no stand-in")


def test_without_torch_xla_the_error_is_one_line_exit_2(tmp_path: Path) -> None:
    p = run_cli(["recipe=linreg", "trainer.accelerator=xla", f"run.dir={tmp_path / 'r'}"], cwd=tmp_path, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer.accelerator='xla': torch-xla is not installed: pip install" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_xla_path_against_the_stand_in_matches_ddp(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    d = tmp_path / "xla"
    p = run_cli(["recipe=linreg", "trainer.accelerator=xla", "trainer.max_epochs=2", *QUIET, f"run.dir={d}"],
                cwd=tmp_path, PYTHONPATH=f"{SUPPORT / 'fake_xla'}:{SUPPORT}:{Path(__file__).parents[1]}",
                FAKE_XLA_DEVICES="2", FAKE_XLA_LOG=str(log))
    assert p.returncode == 0, p.stderr[-3000:]
    calls = Counter(line.strip() for line in log.read_text().splitlines())
    for rank in ("0", "1"):  # one process per device; every step through the XLA calls
        assert calls[f"{rank} launch"] == 1 and calls[f"{rank} xla_device"] == 1
        assert calls[f"{rank} reduce_gradients"] == 14 and calls[f"{rank} mark_step"] == 14
        assert calls[f"{rank} MpDeviceLoader"] == 2 and calls[f"{rank} save"] == 2  # one per epoch checkpoint
    ddp = tmp_path / "ddp"
    p = run_cli(["recipe=linreg", "trainer.gpus=0", "trainer.nproc=2", "trainer.max_epochs=2", *QUIET,
                 f"run.dir={ddp}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(d / "metrics.csv") as f1, open(ddp / "metrics.csv") as f2:
        a, b = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert [r["step"] for r in a] == ["7", "14"]
    for ra, rb in zip(a, b):
        assert float(ra["val_loss"]) == pytest.approx(float(rb["val_loss"]), rel=1e-5)
    wa, wb = (torch.load(x / "model.pt", weights_only=True) for x in (d, ddp))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5)
