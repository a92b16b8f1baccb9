"""The Python API (Keras/Lightning style) in one process: fit / evaluate / predict, DataLoaders or
Datasets, early stopping, best checkpoint, history as dicts and DataFrame, the bare weights."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import StopAt
from launcher import Trainer
from launcher import config as C
from launcher.recipes import circles


def _acc():
    return circles.LogitAccuracy()


@pytest.mark.slow
def test_fit_on_circles_reaches_val_accuracy_0_9(tmp_path: Path) -> None:
    train, val = circles.datasets()
    torch.manual_seed(0)
    net = circles.Net()
    trainer = Trainer(max_epochs=20, monitor="val_acc", mode="max", patience=5, run_dir=tmp_path / "a", progress=False)
    history = trainer.fit(net, nn.BCEWithLogitsLoss(), torch.optim.Adam(net.parameters(), lr=0.01),
                          DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256),
                          metrics={"acc": _acc()})
    assert isinstance(history, list) and history[0]["epoch"] == 1
    assert set(history[0]) >= {"epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc"}
    assert max(r["val_acc"] for r in history) >= 0.9
    assert trainer.best_score == max(r["val_acc"] for r in history)
    assert trainer.best_checkpoint is not None and trainer.best_checkpoint.is_dir()
    df = history.df
    assert list(df["epoch"]) == list(range(1, len(history) + 1))
    ev = trainer.evaluate(val)  # named after what it evaluated: test_* (fit's own validation is val_*)
    assert set(ev) == {"test_loss", "test_acc"} and ev["test_acc"] == pytest.approx(history[-1]["val_acc"])
    preds = trainer.predict(val)
    assert preds.shape == (len(val), 1)
    assert ((preds > 0).float() == val.tensors[1]).float().mean().item() == pytest.approx(ev["test_acc"])
    sd = trainer.state_dict()
    assert set(sd) == set(net.state_dict()) and not any(k.startswith("module.") for k in sd)
    best = trainer.load_best()
    assert trainer.evaluate(val, model=best, prefix="holdout")["holdout_acc"] == pytest.approx(trainer.best_score)
    assert (tmp_path / "a" / "metrics.csv").exists() and (tmp_path / "a" / "plots.png").exists()


def test_early_stopping_stops_and_a_new_trainer_resumes_the_run(tmp_path: Path) -> None:
    train, val = circles.datasets(n_per_class=200)
    net = circles.Net()
    # lr=0: nothing improves, so patience 2 stops after epoch 3 (best at 1, then 2 bad validations)
    tr = Trainer(max_epochs=50, monitor="val_loss", patience=2, batch_size=64, run_dir=tmp_path / "b",
                 progress=False, logger="none")
    h = tr.fit(net, nn.BCEWithLogitsLoss(), torch.optim.SGD(net.parameters(), lr=0.0), train, val)
    assert [r["epoch"] for r in h] == [1, 2, 3]
    again = Trainer(max_epochs=50, monitor="val_loss", patience=2, batch_size=64, run_dir=tmp_path / "b",
                    progress=False, logger="none")
    h2 = again.fit(circles.Net(), nn.BCEWithLogitsLoss(), lambda p: torch.optim.SGD(p, lr=0.0), train, val)
    assert [r["epoch"] for r in h2] == [1, 2, 3], "a finished (early-stopped) run stays finished on resume"


def test_step_scheduler_and_max_steps(tmp_path: Path) -> None:
    train, val = circles.datasets(n_per_class=200)
    net = circles.Net()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    tr = Trainer(max_epochs=10, max_steps=7, batch_size=100, scheduler_interval="step", run_dir=tmp_path / "c",
                 progress=False, logger="none", checkpoint_enabled=False)
    h = tr.fit(net, nn.BCEWithLogitsLoss(), opt, train, val,
               scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    assert [r["step"] for r in h] == [3, 6, 7]  # 280 samples / 100 = 3 steps per epoch; stops mid-epoch 3
    assert h[-1]["lr"] == pytest.approx(0.5 ** 7)
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_checkpoint_keywords_reach_the_run(tmp_path: Path) -> None:
    """checkpoint_<key> (docs/python-api.md) for every checkpoint key, async included (`async` is a keyword)."""
    train, val = circles.datasets(n_per_class=200)
    net = circles.Net()
    tr = Trainer(max_epochs=2, batch_size=40, run_dir=tmp_path / "d", progress=False, logger="none",
                 checkpoint_async=True, checkpoint_every_n_steps=2, checkpoint_keep_last=3, checkpoint_save_top_k=0)
    tr.fit(net, nn.BCEWithLogitsLoss(), torch.optim.Adam(net.parameters(), lr=0.01), train, val)
    assert tr.cfg.checkpoint.async_save is True and tr.ckpt is not None and tr.ckpt.async_save
    ckpts = tmp_path / "d" / "checkpoints"
    # 7 steps per epoch: saves at 2, 4, 6, 7 (epoch end), 8, 10, 12, 14; the newest 3 are kept
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-0000010", "step-0000012", "step-0000014"]
    log = (tmp_path / "d" / "logs" / "rank-0.log").read_text()
    assert log.count("committed") == 8, "every save was committed"
    assert tr.best_checkpoint is None  # save_top_k=0: none kept for being best


def test_an_early_stopped_run_says_so_and_continues_when_patience_is_raised(tmp_path: Path, capsys) -> None:
    train, val = circles.datasets(n_per_class=200)

    def fit(run_dir: Path, patience: int) -> list:
        torch.manual_seed(0)
        # min_delta=10: no validation after the first counts as an improvement
        tr = Trainer(max_epochs=10, monitor="val_loss", patience=patience, min_delta=10.0, batch_size=64,
                     run_dir=run_dir, progress=False, logger="none", precision="32")
        return tr.fit(circles.Net(), nn.BCEWithLogitsLoss(), lambda p: torch.optim.Adam(p, lr=0.01), train, val)

    assert [r["epoch"] for r in fit(tmp_path / "a", 2)] == [1, 2, 3]
    capsys.readouterr()
    assert [r["epoch"] for r in fit(tmp_path / "a", 2)] == [1, 2, 3]
    said = [ln for ln in capsys.readouterr().err.splitlines() if "run complete" in ln]
    assert said == ["[launcher] run complete at epoch 3, step 15 (early stopping: no better val_loss in 2 "
                    "validations); raise trainer.patience to continue it, or start over in a new run.dir; "
                    f"results: {tmp_path / 'a'} (model.pt)"], said
    continued = fit(tmp_path / "a", 4)
    straight = fit(tmp_path / "b", 4)  # patience 4 from the start
    assert [r["epoch"] for r in continued] == [1, 2, 3, 4, 5] and continued == straight
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a), "bitwise as if the patience had been there from the start"


def test_a_run_stopped_at_an_epoch_end_resumes_without_an_extra_step(tmp_path: Path) -> None:
    """Preempted on the last step of a non-final epoch: the continuation takes no empty step."""
    train, val = circles.datasets(n_per_class=200)  # 280 samples, batch 100: 3 steps per epoch

    def fit(run_dir: Path, stop=None) -> tuple:
        torch.manual_seed(0)
        tr = Trainer(max_epochs=3, batch_size=100, scheduler_interval="step", run_dir=run_dir, progress=False,
                     logger="none", precision="32", stop=stop)
        h = tr.fit(circles.Net(), nn.BCEWithLogitsLoss(), lambda p: torch.optim.SGD(p, lr=1.0), train, val,
                   scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
        return tr, h

    tr, h = fit(tmp_path / "cut", stop=StopAt(3))
    assert tr.preempted and h == [], "stopped at the end of epoch 1's batches, before its row"
    _, resumed = fit(tmp_path / "cut")
    _, straight = fit(tmp_path / "straight")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == [3, 6, 9]
    assert resumed[-1]["lr"] == straight[-1]["lr"] == pytest.approx(0.5 ** 9)
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("cut", "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)


class _ViewNet(nn.Module):
    """A CNN that flattens with .view(), which a channels_last conv output cannot take; a frozen BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(2 * 6 * 6, 1)
        self.bn.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


def test_channels_last_auto_leaves_a_model_that_cannot_take_it_alone(tmp_path: Path, capsys) -> None:
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 2, (64, 1), generator=g).float())
    net = _ViewNet()
    h = Trainer(max_epochs=1, batch_size=16, monitor="train_loss", run_dir=tmp_path / "v", progress=False,
                logger="none").fit(
        net, nn.BCEWithLogitsLoss(), torch.optim.SGD(net.parameters(), lr=0.1), data)
    assert len(h) == 1
    err = capsys.readouterr().err
    assert "channels_last off (auto: the model fails on a channels_last input" in err, err
    assert "model summary: _ViewNet" in err
    assert not net.bn.training and net.training, "the summary and the check leave each module's mode as it was"


def test_the_preflight_names_a_shape_mistake_in_one_line_and_leaves_only_logs(tmp_path: Path) -> None:
    """The Python API gets the CLI's preflight: colour images into the MNIST CNN are a UserError naming
    the forward and the shapes before any step, and the new run dir keeps nothing but logs/."""
    from wrong_shapes import color_images

    from launcher.config import UserError
    from launcher.recipes.mnist import Net

    train, val = color_images()
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"preflight: the forward of model \(launcher.recipes.mnist.Net\) failed on "
                                        r"the first training batch \(inputs \[16, 3, 32, 32\] float32"):
        Trainer(max_epochs=1, batch_size=16, run_dir=str(run), progress=False).fit(
            Net(), torch.nn.CrossEntropyLoss(), functools.partial(torch.optim.SGD, lr=0.1), train, val)
    assert sorted(x.name for x in run.iterdir()) == ["logs"]


# ---- the first hour (issue 23): what a new user of the Python API meets -------------------------------


def test_fit_without_validation_data_monitors_the_training_loss_and_says_so(tmp_path: Path, capsys) -> None:
    """The default monitor follows the data: no validation data, so train_loss (was: val_loss, refused)."""
    train, _ = circles.datasets(n_per_class=100)
    net = circles.Net()
    tr = Trainer(max_epochs=2, batch_size=50, run_dir=tmp_path / "r", progress=False, logger="none")
    h = tr.fit(net, nn.BCEWithLogitsLoss(), torch.optim.Adam(net.parameters(), lr=0.01), train)
    assert [r["epoch"] for r in h] == [1, 2] and not any(k.startswith("val_") for k in h[-1])
    assert tr.cfg.trainer.monitor == "train_loss"
    assert tr.best_score == min(r["train_loss"] for r in h), "the best checkpoint is ranked by train_loss"
    assert "no validation data: trainer.monitor=train_loss" in capsys.readouterr().err
    tr.cfg.run.dir = str(tmp_path / "v")  # the same Trainer fits again, now with validation data: val_loss
    h = tr.fit(circles.Net(), nn.BCEWithLogitsLoss(), lambda p: torch.optim.Adam(p, lr=0.01), train, train)
    assert tr.cfg.trainer.monitor == "val_loss" and "val_loss" in h[-1], "resolved anew, not the first fit's"
    with pytest.raises(C.ConfigError, match="trainer.monitor='val_loss': not a metric this run produces"):
        Trainer(monitor="val_loss", run_dir=tmp_path / "s", progress=False, logger="none").fit(
            circles.Net(), nn.BCEWithLogitsLoss(), lambda p: torch.optim.Adam(p), train)  # asked for: still refused


def test_evaluate_names_its_results_after_what_it_evaluated(tmp_path: Path) -> None:
    train, val = circles.datasets(n_per_class=100)
    net = circles.Net()
    tr = Trainer(max_epochs=1, batch_size=50, run_dir=tmp_path / "r", progress=False, logger="none")
    h = tr.fit(net, nn.BCEWithLogitsLoss(), torch.optim.Adam(net.parameters(), lr=0.01), train, val,
               metrics={"acc": _acc()})
    assert {"val_loss", "val_acc"} <= set(h[-1]), "fit's own validation stays val_*"
    test = tr.evaluate(val)
    assert set(test) == {"test_loss", "test_acc"} and test["test_loss"] == pytest.approx(h[-1]["val_loss"])
    assert set(tr.evaluate(train, prefix="holdout")) == {"holdout_loss", "holdout_acc"}


def test_seed_everything_before_the_model_gives_the_same_weights(tmp_path: Path) -> None:
    """launcher.seed_everything, exported lazily: `import launcher` stays torch-free (the CLI's start)."""
    import random
    import subprocess
    import sys

    import numpy as np

    import launcher
    from conftest import cli_env

    def first_weights(seed: int) -> tuple:
        launcher.seed_everything(seed)
        return nn.Linear(4, 4).weight.detach().clone(), random.random(), float(np.random.rand())

    a, b, c = first_weights(3), first_weights(3), first_weights(4)
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:], "one seed: one set of initial weights"
    assert not torch.equal(a[0], c[0]) and a[1] != c[1] and a[2] != c[2]
    check = ("import sys, launcher; assert 'torch' not in sys.modules, 'torch imported'; launcher.seed_everything(1); "
             "from launcher import seed_everything")
    p = subprocess.run([sys.executable, "-c", check], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "seed_everything" in launcher.__all__


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("setting", ["auto", True])
def test_channels_last_is_reported_and_applied_only_for_4d_inputs(tmp_path: Path, capsys, setting: object) -> None:
    from torch.utils.data import TensorDataset

    train, _ = circles.datasets(n_per_class=50)
    tr = Trainer(max_epochs=1, batch_size=50, channels_last=setting, run_dir=tmp_path / "mlp", progress=False,
                 logger="none")
    tr.fit(circles.Net(), nn.BCEWithLogitsLoss(), lambda p: torch.optim.SGD(p, lr=0.1), train)
    said = "auto" if setting == "auto" else "set, but not applied"
    assert f"channels_last off ({said}: the model's inputs are 2-D, not 4-D images)" in capsys.readouterr().err
    assert tr.parts is not None and not tr.parts.channels_last, "an MLP's inputs are left as they are"
    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(32, 1, 6, 6, generator=g), torch.rand(32, 1, generator=g))
    conv = Trainer(max_epochs=1, batch_size=16, channels_last=setting, run_dir=tmp_path / "conv", progress=False,
                   logger="none", gpus=0)
    conv.fit(_Conv(), nn.MSELoss(), lambda p: torch.optim.SGD(p, lr=0.1), images)
    assert "channels_last on (" in capsys.readouterr().err
    assert conv.parts is not None and conv.parts.channels_last


def test_a_run_says_what_ended_it_and_where_its_results_are(tmp_path: Path, capsys) -> None:
    """The bar of a run max_steps ends stops at 'epoch 3/10': the last line says why."""
    train, val = circles.datasets(n_per_class=200)  # 280 samples, batch 100: 3 steps per epoch
    run = tmp_path / "steps"
    Trainer(max_epochs=10, max_steps=7, batch_size=100, run_dir=run, progress=False, logger="csv").fit(
        circles.Net(), nn.BCEWithLogitsLoss(), lambda p: torch.optim.SGD(p, lr=0.1), train, val)
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (f"[launcher] run complete at step 7, in epoch 3 of 10 (trainer.max_steps=7); results: {run} "
                    "(model.pt, metrics.csv, plots.png)"), last
    Trainer(max_epochs=2, batch_size=100, run_dir=tmp_path / "epochs", progress=False, logger="none").fit(
        circles.Net(), nn.BCEWithLogitsLoss(), lambda p: torch.optim.SGD(p, lr=0.1), train, val)
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("[launcher] run complete at epoch 2, step 6 (trainer.max_epochs=2); results: "), last


def test_a_plain_optimizer_on_a_cpu_logs_no_fused_optimizer_advice(tmp_path: Path, capsys) -> None:
    """The guard's per-step flag read costs nothing where the device is the host: nothing to say there."""
    train, _ = circles.datasets(n_per_class=50)
    net = circles.Net()
    Trainer(max_epochs=1, batch_size=50, gpus=0, run_dir=tmp_path / "r", progress=False, logger="none").fit(
        net, nn.BCEWithLogitsLoss(), torch.optim.SGD(net.parameters(), lr=0.1), train)
    err = capsys.readouterr().err
    assert "run complete" in err and "fused" not in err, err
