"""Failures the user causes at run time (the recipe's code, its data, its optimizer arguments, the
run dir): ONE line naming the key, the value or file and the problem, exit code 2, printed once
however many ranks, the traceback in the rank log the line names, and nothing else left behind
(a new run that fails before its first checkpoint keeps only logs/)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Callable, Optional

import pytest

from conftest import QUIET, mnist_small, run_cli

TWO = ["trainer.gpus=0", "trainer.nproc=2"]


def _mnist_copy(damage: str) -> Callable[[Path, Path], list[str]]:
    """A copy of the real MNIST with one file damaged, as the data.root of the run."""
    def make(tmp: Path, mnist: Path) -> list[str]:
        root = tmp / "mnist"
        shutil.copytree(mnist, root)
        victim = root / "t10k-images-idx3-ubyte.gz"
        raw = victim.read_bytes()
        if damage == "truncated":
            victim.write_bytes(raw[: len(raw) // 2])
        else:  # a valid gzip stream whose IDX payload is short
            victim.write_bytes(gzip.compress(gzip.decompress(raw)[:1000]))
        return ["recipe=mnist", f"data.root={root}"]
    return make


# (what, overrides or a maker of them, ranks, text the one line must contain, traceback expected)
CASES: list[tuple[str, object, int, str, bool]] = [
    ("data: no files and download=false", ["recipe=mnist", "data.root={tmp}/none", "data.download=false"], 1,
     "data (launcher.recipes.mnist.datasets): FileNotFoundError: MNIST not found under data.root=", True),
    ("data: no files, 2 ranks (printed once)", ["recipe=mnist", "data.root={tmp}/none", "data.download=false"], 2,
     "data (launcher.recipes.mnist.datasets): FileNotFoundError: MNIST not found under data.root=", True),
    ("data: a truncated gz file", _mnist_copy("truncated"), 1,
     "t10k-images-idx3-ubyte.gz: corrupt or truncated gzip data", True),
    ("data: a short IDX payload", _mnist_copy("short"), 1, "t10k-images-idx3-ubyte.gz", True),
    ("model: its constructor raises", ["recipe=linreg", "model._target_=faulty.RaisingNet"], 1,
     "model (faulty.RaisingNet): ValueError: hidden=-1: must be >= 1", True),
    ("model: the target builds no nn.Module", ["recipe=linreg", "model._target_=launcher.recipes.linreg.datasets"], 1,
     "model: tuple is not a torch.nn.Module", True),
    ("optimizer: negative lr", ["recipe=linreg", "optimizer.lr=-1"], 1,
     "optimizer (Adam): ValueError: Invalid learning rate: -1", True),
    ("optimizer: lr not a number, 2 ranks", ["recipe=linreg", "optimizer.lr=abc", *TWO], 2,
     "optimizer (Adam): TypeError:", True),
    ("scheduler: an argument its class does not take", ["recipe=linreg", "+scheduler._partial_=true",
                                                         "+scheduler._target_=torch.optim.lr_scheduler.StepLR",
                                                         "+scheduler.step_size=1", "+scheduler.gama=0.5"], 1,
     "scheduler (StepLR): TypeError: StepLR.__init__() got an unexpected keyword argument 'gama'", True),
    # the preflight: the first batches through the model, the loss and each metric before any step
    ("preflight: 3x32x32 images into the MNIST CNN, 2 ranks",
     lambda tmp, mnist: ["recipe=mnist", "data._target_=wrong_shapes.color_images", *TWO], 2,
     "preflight: the forward of model (launcher.recipes.mnist.Net) failed on the first training batch (inputs "
     "[128, 3, 32, 32] float32", True),
    ("preflight: MSELoss on class targets",
     lambda tmp, mnist: [*mnist_small(mnist), "loss._target_=torch.nn.MSELoss"], 1,
     "preflight: loss (torch.nn.modules.loss.MSELoss) failed on the first training batch (inputs [128, 1, 28, 28] "
     "float32, outputs [128, 10] float32, targets [128] int64)", True),
    ("preflight: MeanSquaredError on logits",
     lambda tmp, mnist: [*mnist_small(mnist), "~metrics.acc", "+metrics.mse._target_=torchmetrics.MeanSquaredError",
                         "trainer.monitor=val_loss", "trainer.mode=min"], 1,
     "preflight: metrics.mse (torchmetrics.regression.mse.MeanSquaredError) failed on the first training batch", True),
    ("preflight: a class count the model's output does not have, validate_args off",
     lambda tmp, mnist: [*mnist_small(mnist), "metrics.acc.num_classes=3"], 1,
     "preflight: metrics.acc (torchmetrics.classification.accuracy.MulticlassAccuracy): num_classes=3, but the "
     "model's output has 10 classes (its last dimension, output [128, 10] float32); valid: num_classes=10", True),
    # a recipe's callback whose hook raises on every rank: named with its hook and step, once
    ("callbacks: a hook raises, 2 ranks", ["recipe=linreg", "callbacks=[{_target_:faulty.RaisingCallback}]", *TWO], 2,
     "callbacks[0] (RaisingCallback).on_step_end raised at step 2: KeyError: 'no_such_metric'", True),
    ("run dir: cannot be created", ["recipe=linreg", "run.dir=/proc/launcher-test/run"], 1,
     "run.dir='/proc/launcher-test/run': cannot be written", False),
]


@pytest.mark.slow
@pytest.mark.parametrize("what,overrides,ranks,expected,traceback", CASES, ids=[c[0] for c in CASES])
def test_runtime_user_error(tmp_path: Path, mnist_root: Path, what: str, overrides: object, ranks: int,
                            expected: str, traceback: bool) -> None:
    args = overrides(tmp_path, mnist_root) if callable(overrides) else \
        [o.replace("{tmp}", str(tmp_path)) for o in overrides]  # type: ignore[union-attr]
    run_dir = tmp_path / "run"
    if not any(a.startswith("run.dir=") for a in args):
        args.append(f"run.dir={run_dir}")
    if ranks == 2 and "trainer.nproc=2" not in args:
        args += TWO
    p = run_cli([*args, *QUIET, "trainer.max_epochs=1"], cwd=tmp_path, timeout=180)
    # (an error after training began follows the run's own `[launcher] ...` lines and the summary's table)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith(("[launcher] ", "  "))]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("launcher: error: "), p.stderr[-3000:]
    assert p.stderr.rstrip().splitlines()[-1] == lines[0], "the error is the last word"
    assert expected in lines[0], lines[0]
    log: Optional[Path] = None
    if traceback:
        assert "(traceback: " in lines[0], lines[0]
        log = Path(lines[0].rsplit("(traceback: ", 1)[1].rstrip(")"))
        assert "Traceback (most recent call last)" in log.read_text()
        assert log.parent.parent == run_dir
    left = sorted(str(x.relative_to(tmp_path)) for x in tmp_path.rglob("*") if not x.is_relative_to(tmp_path / "mnist"))
    assert all(x.startswith("run/logs") or x == "run" for x in left), f"only the logs may remain: {left}"
    if not traceback:
        assert not run_dir.exists()


@pytest.mark.slow
def test_the_same_command_after_the_fix_runs_in_that_run_dir(tmp_path: Path) -> None:
    """What a failed start leaves (logs/) is no obstacle: fixing the value and re-running trains."""
    args = ["recipe=linreg", *QUIET, "trainer.max_epochs=1", f"run.dir={tmp_path / 'run'}"]
    assert run_cli([*args, "optimizer.lr=-1"], cwd=tmp_path).returncode == 2
    p = run_cli(args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "run" / "model.pt").exists() and "resumed from" not in p.stderr


def test_export_of_a_path_that_is_no_checkpoint_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import cli_env

    p = subprocess.run([sys.executable, "-m", "launcher.export", str(tmp_path / "nope"), str(tmp_path / "o.pt")],
                       env=cli_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"launcher.export: error: CHECKPOINT={tmp_path / 'nope'}: no such file or directory"]
    assert not (tmp_path / "o.pt").exists()


def test_a_failed_start_in_a_directory_that_holds_other_things_removes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "busy"
    (run_dir / "old_run" / "checkpoints").mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    p = run_cli(["recipe=linreg", "optimizer.lr=-1", *QUIET, f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "old_run" / "checkpoints").is_dir()
