"""The step (launcher/fit/steps.py): batches of any shape, the built-in steps and the user's own,
losses that average right over micro-batches and ranks, and one line for each way a step and its
data can disagree. In-process on 1 rank (fast tier); 2 ranks, FSDP and accumulation through the CLI."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torchmetrics
from torch import nn

from conftest import QUIET, SUPPORT, run_cli
from launcher import DictBatch, ModelLoss, StepOutput, Trainer
from launcher.config import UserError
import user_steps as U

CONF = ["--config-dir", str(SUPPORT / "steps_conf")]


def _trainer(tmp_path: Path, name: str, **kw) -> Trainer:
    return Trainer(**{"max_epochs": 2, "batch_size": 8, "run_dir": tmp_path / name, "progress": False,
                      "logger": "none", "precision": "32", "gpus": 0, **kw})


def _adam(lr: float = 0.05):
    return functools.partial(torch.optim.Adam, lr=lr)


def _acc(classes: int = 3) -> dict:
    return {"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=classes, average="micro")}


# ---- the built-in steps and the user's own, on 1 rank --------------------------------------------

@pytest.mark.parametrize("step", ["dict_batch", DictBatch(), "model_loss", ModelLoss()])
def test_dict_batches_train_with_the_built_in_steps(tmp_path: Path, step) -> None:
    train, val = U.pair_data()
    torch.manual_seed(0)
    tr = _trainer(tmp_path, "r", max_epochs=4)
    loss_fn = nn.CrossEntropyLoss() if "dict" in str(step).lower() or isinstance(step, DictBatch) else None
    history = tr.fit(U.TwoInput(), loss_fn, _adam(), train, val, metrics=_acc(), step=step)
    assert history[-1]["val_acc"] > 0.9 and history[-1]["val_loss"] < history[0]["val_loss"], list(history)
    test = tr.evaluate(val)  # the fit's step, loss and metrics
    assert test["test_loss"] == pytest.approx(history[-1]["val_loss"]) and "test_acc" in test
    # predict: the step's outputs (the logits), one row per sample, for data without labels too
    unlabelled = [{"x1": s["x1"], "x2": s["x2"]} for s in val]
    out = tr.predict(unlabelled)
    assert out is not None and out.shape == (len(val), 3)
    assert torch.equal(out, tr.predict(val)), "labels or not, the logits are the same"


def test_a_users_step_with_two_inputs_two_outputs_and_a_loss_of_the_batch(tmp_path: Path) -> None:
    """The contrastive case: the model takes (x1, x2) and returns two embeddings; the loss needs the
    whole batch (its targets are positions); the similarity rows feed a metric."""
    train, val = U.view_data()
    torch.manual_seed(0)
    tr = _trainer(tmp_path, "c", max_epochs=6)
    history = tr.fit(U.TwoTower(), None, _adam(), train, val, step=U.contrastive_step,
                     metrics={"top1": torchmetrics.classification.MulticlassAccuracy(num_classes=8, average="micro")})
    assert history[-1]["val_loss"] < history[0]["train_loss"] and history[-1]["val_top1"] > 0.5, list(history)
    # a partial with its own argument: another temperature, another loss on the same weights
    cooler = tr.evaluate(val, step=functools.partial(U.contrastive_step, temperature=0.1), metrics={})
    assert cooler["test_loss"] != pytest.approx(history[-1]["val_loss"])


def test_nested_batches_of_any_shape_reach_the_step_on_the_device(tmp_path: Path) -> None:
    """Tuples, lists, namedtuples, dataclasses inside dicts: moved, measured and handed over as they are."""
    import collections
    import dataclasses

    Pair = collections.namedtuple("Pair", "x1 x2")

    @dataclasses.dataclass
    class Target:
        y: torch.Tensor

    seen: list = []

    def step(model: nn.Module, batch: dict) -> StepOutput:
        seen.append(batch)
        out = model(batch["pair"].x1, batch["views"][1])
        return StepOutput(nn.functional.cross_entropy(out, batch["target"].y), out, batch["target"].y)

    train, _ = U.pair_data(n=32)
    nested = [{"pair": Pair(s["x1"], s["x2"]), "views": [s["x1"], s["x2"]], "target": Target(s["labels"])}
              for s in train]

    def collate(items: list) -> dict:
        return {"pair": Pair(torch.stack([i["pair"].x1 for i in items]), torch.stack([i["pair"].x2 for i in items])),
                "views": [torch.stack([i["views"][k] for i in items]) for k in range(2)],
                "target": Target(torch.stack([i["target"].y for i in items]))}

    loader = torch.utils.data.DataLoader(nested, batch_size=8, collate_fn=collate)
    tr = _trainer(tmp_path, "n", max_epochs=1)
    tr.fit(U.TwoInput(), None, _adam(), loader, step=step, metrics=_acc())
    first = seen[-1]
    assert isinstance(first["pair"], Pair) and isinstance(first["target"], Target)
    assert tr.history[-1]["train_acc"] >= 0  # the outputs and targets the step named were measured


def test_the_samples_of_a_batch_are_its_first_tensors_rows_or_the_key_the_step_names() -> None:
    """A batch led by a tensor that is not per sample (a shared position table) names its sample key:
    the mean loss is weighted by it and the compile rule compares it."""
    batch = {"positions": torch.arange(12), "x1": torch.zeros(8, 4), "labels": torch.zeros(8)}
    assert DictBatch().samples(batch) == 12, "the first tensor's first dimension by default"
    assert DictBatch(size_key="x1").samples(batch) == 8 and ModelLoss(size_key="labels").samples(batch) == 8


# ---- losses that average right --------------------------------------------------------------------

def _one_step(tmp_path: Path, name: str, step, batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    data, _ = U.token_data()
    torch.manual_seed(0)
    model = U.TokenModel()
    Trainer(max_steps=1, batch_size=batch_size, accumulate_grad_batches=accumulate, run_dir=tmp_path / name,
            progress=False, logger="none", precision="32", summary=False, checkpoint_async=False).fit(
        model, None, functools.partial(torch.optim.SGD, lr=0.5), data, step=step)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def token_runs(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("tokens")
    return {"sum 1x8": _one_step(tmp, "s1", U.token_sum_step, 8, 1),
            "sum 4x2": _one_step(tmp, "s4", U.token_sum_step, 2, 4),
            "mean 1x8": _one_step(tmp, "m1", U.token_mean_step, 8, 1),
            "mean 4x2": _one_step(tmp, "m4", U.token_mean_step, 2, 4)}


def test_a_loss_sum_gives_the_same_update_however_the_batch_is_split(token_runs) -> None:
    """8 padded sequences of 1 to 12 tokens, one step: as 1 micro-batch of 8 or 4 of 2, the token-sum
    step trains the same weights (float noise apart); the per-micro-batch mean does not, because
    a micro-batch of 2 short sequences then weighs as much as one of 2 long ones."""
    assert _max_diff(token_runs["sum 1x8"], token_runs["sum 4x2"]) < 1e-6
    assert _max_diff(token_runs["sum 1x8"], token_runs["mean 1x8"]) < 1e-6, "one micro-batch: sum/count is the mean"
    assert _max_diff(token_runs["mean 1x8"], token_runs["mean 4x2"]) > 1e-3, "the case the sum form exists for"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])  # FSDP's gradients are shards (DTensors), scaled the same
def test_a_loss_sum_gives_the_same_update_on_2_ranks_x_2_micro_batches(tmp_path: Path, token_runs, strategy: str) -> None:
    run = tmp_path / "r2"
    p = run_cli([*CONF, "recipe=tokens", "trainer.gpus=0", "trainer.nproc=2", "trainer.batch_size=2",
                 f"trainer.strategy={strategy}", "trainer.fsdp_wrap=[Linear]",
                 "trainer.accumulate_grad_batches=2", *QUIET, f"run.dir={run}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    weights = torch.load(run / "model.pt", weights_only=True)
    assert _max_diff(weights, token_runs["sum 1x8"]) < 1e-6
    logged = (run / "metrics.csv").read_text().splitlines()
    assert len(logged) == 2, logged  # one epoch row: the token-mean training loss over both ranks


# ---- 2 ranks, FSDP, accumulation, through the CLI ---------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("step", ["dict_batch", "model_loss", "contrastive"])
def test_each_step_trains_on_2_ranks_under_fsdp_with_accumulation(tmp_path: Path, step: str) -> None:
    args = ["step=dict_batch"] if step == "dict_batch" else ["step=model_loss", "~loss"] if step == "model_loss" else [
        "model._target_=user_steps.TwoTower", "data._target_=user_steps.view_data", "~loss", "~step", "+step._target_=user_steps.contrastive_step",
        "+step._partial_=true"]
    run = tmp_path / step
    p = run_cli([*CONF, "recipe=pairs", *args, "trainer.gpus=0", "trainer.nproc=2", "trainer.strategy=fsdp",
                 "trainer.accumulate_grad_batches=2", *QUIET, f"run.dir={run}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (run / "metrics.csv").read_text().splitlines()
    header, last = lines[0].split(","), dict(zip(lines[0].split(","), lines[-1].split(",")))
    first = dict(zip(header, lines[1].split(",")))
    assert float(last["val_loss"]) < float(first["train_loss"]), lines
    assert any(d.name.startswith("step-") for d in (run / "checkpoints").iterdir())


# ---- one line for each way a step and its data disagree ---------------------------------------------

def _fails(tmp_path: Path, *args, **kw) -> str:
    with pytest.raises(UserError) as e:
        _trainer(tmp_path, "e", max_epochs=1).fit(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_dict_batch_with_the_default_step_names_the_steps_that_read_it(tmp_path: Path) -> None:
    train, _ = U.pair_data(n=16)
    msg = _fails(tmp_path, U.TwoInput(), nn.CrossEntropyLoss(), _adam(), train)
    assert "a dict batch (keys x1, x2, labels)" in msg and "step=dict_batch" in msg and "step=model_loss" in msg
    # a 2-key dict used to unpack into its two key strings
    two = [{"x": s["x1"], "y": s["labels"]} for s in train]
    assert "a dict batch (keys x, y)" in _fails(tmp_path, nn.Linear(4, 3), nn.CrossEntropyLoss(), _adam(), two)


def test_each_step_error_is_one_line_naming_the_step_what_it_got_and_what_is_valid(tmp_path: Path) -> None:
    train, _ = U.pair_data(n=16)
    # a step that returns something else
    msg = _fails(tmp_path, U.TwoInput(), None, _adam(), train, step=lambda m, b: ("loss", 1))
    assert "returned a tuple" in msg and "StepOutput(loss, outputs, targets, count)" in msg
    msg = _fails(tmp_path, U.TwoInput(), None, _adam(), train, step=lambda m, b: m(b["x1"], b["x2"], b["labels"]))
    assert "returned a dict with keys loss, logits" in msg and "step=model_loss" in msg, msg  # an HF-style output
    # a batch the step cannot read: a missing key, named with the keys there are
    msg = _fails(tmp_path, U.TwoInput(), nn.CrossEntropyLoss(), _adam(), train, step=DictBatch(labels="target"))
    assert "'target'" in msg and "x1, x2, labels" in msg, msg
    # a model output without a loss for the model-loss step
    msg = _fails(tmp_path, U.TwoTower(), None, _adam(), train, step="model_loss")
    assert "step (launcher.ModelLoss)" in msg, msg
    # the default step without a loss; an unknown short name
    assert "needs a loss" in _fails(tmp_path, nn.Linear(4, 3), None, _adam(), [(torch.zeros(4), 0)] * 8)
    assert "valid: supervised, dict_batch, model_loss" in _fails(tmp_path, U.TwoInput(), None, _adam(), train,
                                                                 step="hf")


@pytest.mark.slow
def test_a_step_error_at_2_ranks_is_printed_once_exit_2(tmp_path: Path) -> None:
    run = tmp_path / "e"
    p = run_cli([*CONF, "recipe=pairs", "step=supervised", "trainer.gpus=0", "trainer.nproc=2", *QUIET,
                 f"run.dir={run}"], cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "a dict batch (keys x1, x2, labels)" in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
