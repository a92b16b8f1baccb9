"""Start-up: what a run imports before its first step (issue 12, goal 3: nothing the run does not use)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUIET, cli_env


def test_torchmetrics_imports_without_pyplot_and_a_metric_still_plots() -> None:
    pytest.importorskip("matplotlib")
    code = """
import sys
from launcher import recipe
Accuracy = recipe.locate("torchmetrics.classification.MulticlassAccuracy")
assert "matplotlib.pyplot" not in sys.modules, "torchmetrics' import loaded pyplot"
assert not any(type(f).__name__ == "_Finder" for f in sys.meta_path), "the finder outlived the import"
import torch
from torchmetrics.utilities import imports
assert bool(imports._MATPLOTLIB_AVAILABLE), "matplotlib is installed: torchmetrics must still say so"
m = Accuracy(num_classes=3)
m.update(torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 1, 1]))
fig, ax = m.plot()
assert type(fig).__name__ == "Figure" and "matplotlib.pyplot" in sys.modules
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


def test_a_cli_run_with_plots_never_imports_pyplot(tmp_path: Path) -> None:
    # the recipe's metrics are torchmetrics and metrics.csv's plots are drawn with matplotlib: the run
    # uses matplotlib (plots.png), but never pyplot (~0.5 s of start-up, and a GUI backend's probing)
    pytest.importorskip("matplotlib")
    args = ["recipe=circles", "trainer.gpus=0", "trainer.max_epochs=1", "trainer.summary=false", *QUIET,
            f"run.dir={tmp_path / 'run'}"]
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher", *args], cwd=tmp_path, env=cli_env(),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in p.stderr.splitlines() if ln.startswith("import time:")}
    assert "torchmetrics" in imported and "matplotlib.figure" in imported
    assert "matplotlib.pyplot" not in imported
    assert (tmp_path / "run" / "plots.png").stat().st_size > 0
