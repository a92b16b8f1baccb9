"""The step: what one micro-batch makes (a loss, and what the metrics need), in one place.

A step is a callable `step(model, batch)` given the (wrapped) model and one micro-batch already on
the device; it returns the loss, a StepOutput, or a dict with StepOutput's keys. Training (with
backward), evaluation and predict() all go through it, so the batch contract lives here and only
here. Everything around it is the launcher's: no_sync, autocast, the accumulation group's scaling,
backward, unscale / clip / guard / the optimizer step, metrics (launcher/fit/step.py).

Built in: Supervised (the default: (inputs, targets) batches and loss(model(inputs), targets)),
DictBatch (a dict batch whose `labels` key is the target and the rest keyword inputs) and ModelLoss
(a model that computes its own loss, Hugging Face style). A recipe names one by its short name
(`step: model_loss`) or a `_target_` node; the Python API takes the object or the name.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..config import UserError
from .batch import batch_size_of, map_tensors


@dataclass
class StepOutput:
    """What a step returns. `loss`: a one-element tensor, the mean over the micro-batch's samples; or,
    with `count` (a number or a tensor: tokens, samples), the SUM over `count` units, which the
    launcher normalises over the whole accumulation group and every rank (a padded batch then trains
    the same however it is split). `outputs` and `targets` feed the metrics; `outputs` is also what
    predict() returns. `loss` may be None only in predict()."""

    loss: Optional[torch.Tensor]
    outputs: Any = None
    targets: Any = None
    count: Any = None


def name_of(fn: Any) -> str:
    """A step (or any callable) as the user wrote it: module.qualname (a partial names its function)."""
    target = getattr(fn, "func", fn)
    if not hasattr(target, "__qualname__"):  # an instance of a callable class: its class
        target = type(target)
    return f"{getattr(target, '__module__', '?')}.{target.__qualname__}"


def _identity(x: Any) -> Any:
    return x


class Step:
    """The built-in steps' base: a loss function (the recipe's `loss`, fit's loss_fn) and the
    launcher's input preparation (precision cast, channels_last) are bound to a copy by bind()."""

    needs_loss = False
    loss_fn: Optional[Callable] = None
    prepare: Callable[[Any], Any] = staticmethod(_identity)
    size_key: Optional[str] = None  # the dict key whose first dimension counts the samples (else the first tensor's)

    def samples(self, batch: Any) -> int:
        """The micro-batch's samples: what its mean loss is weighted by, and what tells the compile rule a
        shorter batch (strategy.eager_if_odd)."""
        if self.size_key is not None and isinstance(batch, dict):
            return batch_size_of(batch[self.size_key])
        return batch_size_of(batch)

    @property
    def name(self) -> str:
        return f"launcher.{type(self).__name__}"

    def bind(self, loss_fn: Optional[Callable], prepare: Callable[[Any], Any]) -> "Step":
        bound = copy.copy(self)  # the user's object is never written to
        if self.loss_fn is None:
            bound.loss_fn = loss_fn
        bound.prepare = prepare
        return bound

    def __call__(self, model: Any, batch: Any) -> StepOutput:
        raise NotImplementedError


class Supervised(Step):
    """`(inputs, targets)` batches: loss_fn(model(inputs), targets). A 1-tuple or a bare tensor is
    inputs alone (predict). Only the inputs are prepared (a float regression target stays float32)."""

    needs_loss = True

    def __init__(self, loss_fn: Optional[Callable] = None) -> None:
        self.loss_fn = loss_fn

    def __call__(self, model: Any, batch: Any) -> StepOutput:
        x, y = self.split(batch)
        out = model(self.prepare(x))
        return StepOutput(None if y is None else self.loss_fn(out, y), out, y)  # type: ignore[misc]

    def split(self, batch: Any) -> tuple[Any, Any]:
        """(inputs, targets) of a batch: a tuple or list of two."""
        if isinstance(batch, (tuple, list)):
            if len(batch) == 2:
                return batch[0], batch[1]
            if len(batch) == 1:
                return batch[0], None
            raise UserError(f"data: a batch of {len(batch)} items ({type(batch).__name__}) for the default step "
                            f"(step=supervised: (inputs, targets) pairs); valid: two items per sample, or {_OTHERS}")
        if isinstance(batch, dict):  # never unpacked: a 2-key dict would give its key strings
            raise UserError(f"data: a dict batch (keys {', '.join(map(str, batch))}) for the default step "
                            f"(step=supervised: (inputs, targets) pairs); valid: {_OTHERS}")
        return batch, None


class DictBatch(Step):
    """A dict batch: model(**the other keys), loss_fn(outputs, batch[labels])."""

    needs_loss = True

    def __init__(self, labels: str = "labels", loss_fn: Optional[Callable] = None,
                 size_key: Optional[str] = None) -> None:
        self.labels, self.loss_fn, self.size_key = labels, loss_fn, size_key

    def __call__(self, model: Any, batch: Any) -> StepOutput:
        rest = self.prepare(_without(batch, self.labels, self.name))
        out = model(**rest)
        y = batch.get(self.labels)
        if y is None:
            return StepOutput(None, out, None)  # predict() on data without labels
        return StepOutput(self.loss_fn(out, y), out, y)  # type: ignore[misc]


class ModelLoss(Step):
    """A model that computes its own loss (an output with `.loss`, or a dict with "loss": Hugging Face
    and nanoGPT style): model(**batch), labels included. Its `logits` go to the metrics with the
    labels; `shift_labels` (causal LMs: the logits at t predict the label at t + 1) passes them on
    shifted and flattened to (N, classes) and (N,). `per_token`: the model's loss is a mean over the
    labels that are not `ignore_index`; weighted by their count it becomes a sum (StepOutput.count),
    so an accumulation group and the ranks average over tokens, not over micro-batch means."""

    def __init__(self, labels: str = "labels", logits: str = "logits", shift_labels: bool = False,
                 per_token: bool = False, ignore_index: int = -100, size_key: Optional[str] = None) -> None:
        self.labels, self.logits, self.shift_labels, self.size_key = labels, logits, shift_labels, size_key
        self.per_token, self.ignore_index = per_token, ignore_index

    def __call__(self, model: Any, batch: Any) -> StepOutput:
        if not isinstance(batch, dict):
            raise UserError(f"step ({self.name}): a {type(batch).__name__} batch; valid: a dict of keyword inputs "
                            f"to the model, with {self.labels!r} for training")
        y = batch.get(self.labels)
        out = model(**self.prepare(_without(batch, self.labels, self.name)), **({} if y is None else {self.labels: y}))
        # (called without labels, a model may return its logits alone)
        loss, logits = (None, out) if isinstance(out, torch.Tensor) else (_field(out, "loss"), _field(out, self.logits))
        if y is not None and loss is None:
            raise UserError(f"step ({self.name}): the model's output ({type(out).__name__}) has no loss although the "
                            f"batch has {self.labels!r}; valid: a model whose forward returns .loss or ['loss'] when "
                            f"given {self.labels}=, or step=dict_batch with a loss")
        if y is not None and logits is not None and self.shift_labels:
            logits, y = logits[..., :-1, :].flatten(0, -2), y[..., 1:].flatten()
        if loss is not None and self.per_token and y is not None:
            count = (y != self.ignore_index).sum()
            return StepOutput(loss * count, logits, y, count)
        return StepOutput(loss, logits, y)


BUILT_IN: dict[str, type] = {"supervised": Supervised, "dict_batch": DictBatch, "model_loss": ModelLoss}
_OTHERS = ("step=dict_batch (a dict batch: its 'labels' key the targets, the rest keyword inputs), step=model_loss "
           "(the model computes its own loss), or a step of your own (docs/your-model.md)")


def _without(batch: Any, key: str, step: str) -> dict:
    if not isinstance(batch, dict):
        raise UserError(f"step ({step}): a {type(batch).__name__} batch; valid: a dict of keyword inputs "
                        f"and {key!r} (the targets)")
    return {k: v for k, v in batch.items() if k != key}


def _field(out: Any, key: str) -> Any:
    if isinstance(out, dict):
        return out.get(key)
    return getattr(out, key, None)


class UserStep(Step):
    """The user's own step function: the whole batch prepared, its result read and checked."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    @property
    def name(self) -> str:
        return name_of(self.fn)

    def __call__(self, model: Any, batch: Any) -> StepOutput:
        return read(self.fn(model, self.prepare(batch)), self.name)


_KEYS = {f.name for f in dataclasses.fields(StepOutput)}


def read(result: Any, step: str) -> StepOutput:
    """A step's result as a StepOutput: a loss tensor, a StepOutput, or a dict of StepOutput's keys."""
    if type(result) is StepOutput:
        return result
    if isinstance(result, torch.Tensor):
        return StepOutput(result)
    if isinstance(result, dict) and set(result) <= _KEYS and "loss" in result:
        return StepOutput(**result)
    what = (f"a {type(result).__name__} with keys {', '.join(map(str, result))}" if isinstance(result, dict)
            else f"a {type(result).__name__}")
    own = hasattr(result, "loss") or (isinstance(result, dict) and "loss" in result)
    hint = "; a model output that carries its own loss: step=model_loss" if own else ""
    raise UserError(f"step ({step}) returned {what}; valid: the loss (a one-element tensor), "
                    f"launcher.StepOutput(loss, outputs, targets, count) or a dict of those keys{hint}")


def resolve(step: Any, loss_fn: Optional[Callable], prepare: Callable[[Any], Any]) -> Step:
    """The step a fit (or an evaluate / predict) runs: the default, a built-in's short name, a built-in
    object or the user's callable, with the loss and the input preparation bound."""
    if step is None:
        step = Supervised()
    elif isinstance(step, str):
        if step not in BUILT_IN:
            raise UserError(f"step={step!r}: not a built-in step; valid: {', '.join(BUILT_IN)} or a callable "
                            "step(model, batch)")
        step = BUILT_IN[step]()
    elif not callable(step):
        raise UserError(f"step: a {type(step).__name__} is not callable; valid: {', '.join(BUILT_IN)} or a "
                        "callable step(model, batch)")
    if not isinstance(step, Step):
        step = UserStep(step)
    if step.needs_loss and step.loss_fn is None and loss_fn is None:
        raise UserError(f"step ({step.name}) needs a loss and none was given; valid: a recipe `loss:` node or "
                        "fit(loss_fn=...), or a step that computes its own (step=model_loss)")
    return step.bind(loss_fn, prepare)


def preparer(prepare_input: Callable[[Any], Any], channels_last: bool) -> Callable[[Any], Any]:
    """The launcher's preparation of a step's inputs: floating tensors cast for a true (non-mixed)
    precision, 4-D floating tensors to channels_last when it is on; any nest of dicts, tuples, lists."""
    def prepare(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = prepare_input(x)
            if channels_last and x.dim() == 4 and x.is_floating_point():
                x = x.contiguous(memory_format=torch.channels_last)
            return x
        return map_tensors(x, prepare)
    return prepare
