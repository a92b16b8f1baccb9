"""The first batches through the model, the loss and each metric, on rank 0, before any step.

The commonest hurried mistake (3x32x32 images into a 28x28 CNN, MSELoss on class targets, a
metric whose class count is not the model's) would otherwise surface as a traceback from inside
the first DDP step, on every rank, after the run dir was written. Here it is one line naming the
stage (the forward of the model, the loss, metrics.<name>), the shapes involved and the exception;
its traceback goes to the rank log. The model runs in eval mode without gradients (no dropout mask
drawn, no running statistic moved), so a run that passes trains bitwise as without the check.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..config import UserError, one_line
from ..device.modes import inference
from ..device.precision import Precision
from .steps import Step, StepOutput, Supervised, name_of

log = logging.getLogger("launcher")


def shapes(x: Any) -> str:
    """A batch part as the user thinks of it: [64, 3, 32, 32] float32, or a tuple/dict of those."""
    if isinstance(x, torch.Tensor):
        return f"{list(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, (list, tuple)):
        return "(" + ", ".join(shapes(v) for v in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {shapes(v)}" for k, v in x.items()) + "}"
    return type(x).__name__


def _class_count(metric: Any, out: Any) -> Optional[str]:
    """A multiclass torchmetrics metric whose num_classes is not the width of the model's logits:
    found once here even with validate_args=False (which would otherwise train and report a wrong
    value without a word)."""
    n = getattr(metric, "num_classes", None)
    if not type(metric).__name__.startswith("Multiclass") or not isinstance(n, int):
        return None
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() < 2 or out.shape[-1] == n:
        return None
    return (f"num_classes={n}, but the model's output has {out.shape[-1]} classes (its last dimension, output "
            f"{shapes(out)}); valid: num_classes={out.shape[-1]}")


def check(model: nn.Module, step: Step, metrics: dict[str, Any], batches: list[tuple[str, Any]],
          prec: Precision, device: torch.device) -> str:
    """"" when every (split, batch) goes through the step (the model, the loss) and each metric; else
    the one line saying which stage failed on which batch, with the shapes."""
    # what the user's code warns about here it warns again at the first step, where it belongs: kept
    # out of stderr, where a failure must be one line (into the rank log instead)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        problem = _check(model, step, metrics, batches, prec, device)
    for w in said:
        log.info("preflight: warning: %s", w.message, extra={"file_only": True})
    return problem


def _check(model: nn.Module, step: Step, metrics: dict[str, Any], batches: list[tuple[str, Any]],
           prec: Precision, device: torch.device) -> str:
    for split, batch in batches:
        try:
            out, problem = (_supervised if isinstance(step, Supervised) else _custom)(model, step, split, batch, prec)
        except UserError as e:  # the step's own reading of the batch (a dict for the default step...)
            return str(e)
        problem = problem or _loss(step, out, split, batch)  # type: ignore[arg-type]
        if problem:
            return problem
        stage = ""
        try:
            for name, metric in metrics.items():
                stage = f"metrics.{name} ({name_of(metric)})"
                if out.outputs is None:  # type: ignore[union-attr]
                    return (f"preflight: {stage}: step ({step.name}) returns no outputs to measure; valid: a step "
                            "returning StepOutput(loss, outputs, targets), or no metrics")
                wrong = _class_count(metric, out.outputs)  # type: ignore[union-attr]
                if wrong:
                    return f"preflight: {stage}: {wrong}"
                with torch.no_grad():  # a copy: the run's own stays untouched
                    copy.deepcopy(metric).to(device).update(out.outputs, out.targets)  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001 - the user's metric on the user's data: named, traceback logged
            log.error("preflight: %s failed on the first %s batch", stage, split, exc_info=True,
                      extra={"file_only": True})
            got = f"outputs {shapes(out.outputs)}, targets {shapes(out.targets)}"  # type: ignore[union-attr]
            return (f"preflight: {stage} failed on the first {split} batch ({got}): {one_line(e)}; valid: metrics "
                    "that fit the step's outputs and targets")
    return ""


def _supervised(model: nn.Module, step: Supervised, split: str, batch: Any,
                prec: Precision) -> tuple[Optional[StepOutput], str]:
    """The default step in its two stages (the forward, then the loss), so a failure names which."""
    x, y = step.split(batch)
    stage, out = f"the forward of model ({name_of(model)})", None
    try:
        with inference(model), prec.autocast():
            out = model(step.prepare(x))
            stage = f"loss ({name_of(step.loss_fn)})"
            return StepOutput(step.loss_fn(out, y), out, y), ""  # type: ignore[misc]
    except Exception as e:  # noqa: BLE001 - the user's code on the user's data: named, traceback logged
        log.error("preflight: %s failed on the first %s batch", stage, split, exc_info=True, extra={"file_only": True})
        got = f"inputs {shapes(x)}" + (f", outputs {shapes(out)}" if out is not None else "") + \
              (f", targets {shapes(y)}" if y is not None else "")
        return None, (f"preflight: {stage} failed on the first {split} batch ({got}): {one_line(e)}; valid: a model, "
                      "loss and metrics that fit the data")


def _custom(model: nn.Module, step: Step, split: str, batch: Any, prec: Precision) -> tuple[Optional[StepOutput], str]:
    try:
        with inference(model), prec.autocast():
            return step(model, batch), ""
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's step, model or loss: named, traceback logged
        log.error("preflight: step %s failed on the first %s batch", step.name, split, exc_info=True,
                  extra={"file_only": True})
        return None, (f"preflight: step ({step.name}) failed on the first {split} batch (batch {shapes(batch)}): "
                      f"{one_line(e)}; valid: a step, model and loss that fit the data (docs/your-model.md)")


def _loss(step: Step, out: StepOutput, split: str, batch: Any) -> str:
    """What the step returned as its loss: one number per micro-batch (and a count with a sum)."""
    loss, name = out.loss, (f"loss ({name_of(step.loss_fn)})" if isinstance(step, Supervised) else f"step ({step.name})")
    labels = getattr(step, "labels", None)  # the built-in dict steps name their targets' key
    if loss is None and isinstance(labels, str) and isinstance(batch, dict) and labels not in batch:
        return (f"preflight: step ({step.name}) found no {labels!r} key in the first {split} batch (keys "
                f"{', '.join(map(str, batch))}); valid: labels=<the key of the targets>")
    if loss is None:
        return (f"preflight: {name} gave no loss on the first {split} batch (batch {shapes(batch)}); valid: a loss "
                "for every batch with targets")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = shapes(loss) if isinstance(loss, torch.Tensor) else type(loss).__name__
        return (f"preflight: {name} returned {what} on the first {split} batch; valid: one number per batch (a "
                "reduction of 'mean' or 'sum')")
    count = out.count
    one = isinstance(count, (int, float)) or (isinstance(count, torch.Tensor) and count.numel() == 1)
    if count is not None and not one:
        return (f"preflight: step ({step.name}) returned a count of {shapes(count)} on the first {split} batch; valid: "
                "one number (the tokens or samples the loss sum is over)")
    return ""
