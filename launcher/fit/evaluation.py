"""Forward passes without gradients: evaluation (every sample exactly once) and predictions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .batch import to_device
from . import stream
from .data import Batches
from ..device.dist import Dist, all_gather_object, all_reduce_sum
from .metrics import Accumulator
from ..config import TrainerConfig, UserError
from ..device.hardware import resolve_precision
from ..device.precision import Precision
from ..device.strategy import eager_if_odd
from ..device.modes import inference
from .steps import Step, StepOutput, preparer, resolve


def forward_all(model: nn.Module, step: Step, batches: Batches, device: torch.device, prec: Precision,
                lockstep: bool) -> Iterator[tuple[StepOutput, int]]:
    """(the step's output, samples) for each batch of this rank's evaluation shard, without gradients.

    Under FSDP every forward is a collective (parameters are gathered), so ranks with fewer eval
    batches repeat one and discard it until the rank with the most is done.
    """
    if batches.n is None:  # a stream (fit/stream.py): no length to know the most by
        yield from _forward_stream(model, step, batches, device, prec, lockstep)
        return
    own = len(batches)
    most = math.ceil(math.ceil(batches.n / batches.dist.world_size) / batches.batch_size) if lockstep else own
    first = None
    with inference(model):  # each module back in its own mode after (a frozen BatchNorm stays frozen)
        for batch in batches.epoch(0):
            batch = to_device(batch, device)
            first = batch if first is None else first
            yield _forward(model, step, batch, prec, batches.batch_size)
        for _ in range(most - own):
            first = first if first is not None else to_device(batches.head(), device)
            _forward(model, step, first, prec, batches.batch_size)


def _forward_stream(model: nn.Module, step: Step, batches: Any, device: torch.device, prec: Precision,
                    lockstep: bool) -> Iterator[tuple[StepOutput, int]]:
    """Every batch of this rank's streams once. In lockstep (FSDP) the ranks ask each other before
    each forward whether any still has a batch (one all-reduce per batch: a stream has no length to
    know the most by; small beside the forward's own parameter gathers); one that has none repeats
    its first and discards it."""
    first = None
    with inference(model):
        source = iter(batches.epoch(0))
        while True:
            batch = next(source, None)
            if lockstep:
                if not all_reduce_sum(torch.tensor([batch is not None], dtype=torch.int64, device=device)).item():
                    return
                if batch is None:
                    first = first if first is not None else to_device(batches.head(), device)
                    _forward(model, step, first, prec, batches.batch_size)
                    continue
            elif batch is None:
                return
            batch = to_device(batch, device)
            first = batch if first is None else first
            yield _forward(model, step, batch, prec, batches.batch_size)


def _forward(model: nn.Module, step: Step, batch: Any, prec: Precision, full: int) -> tuple[StepOutput, int]:
    """A compiled model compiles once more for inference (grad mode is part of its guards) and runs
    the last, shorter batch eagerly (strategy.eager_if_odd)."""
    n = step.samples(batch)
    with prec.autocast(), eager_if_odd(model, n, full):
        return step(model, batch), n


def evaluate(model: nn.Module, step: Step, batches: Batches, acc: Accumulator, device: torch.device,
             prec: Precision, lockstep: bool = False, prefix: str = "val") -> dict[str, float]:
    """<prefix>_loss and <prefix>_<metric> over every rank's shard (a collective: every rank calls it).
    fit's own validation is val_*; Trainer.evaluate names what it evaluated (test_* by default)."""
    # The bare module, not DDP: ranks hold different numbers of eval batches, and DDP's forward
    # would start a collective (buffer broadcast) per batch and hang the ranks that ran out.
    acc.reset()
    for out, n in forward_all(model, step, batches, device, prec, lockstep):
        if out.loss is None:
            raise UserError(f"step ({step.name}) returned no loss for an evaluation batch; valid: data with targets")
        acc.add(out, n)
    return acc.compute(prefix)


def predict(model: nn.Module, step: Step, batches: Batches, d: Dist, prec: Precision,
            lockstep: bool) -> Optional[torch.Tensor]:
    """The step's outputs for every sample, in dataset order, on rank 0 (None on other ranks)."""
    if batches.n is None:
        raise UserError("predict(): data is an iterable (streaming) dataset; valid: a map-style dataset "
                        "(__len__, __getitem__): predictions come back in the dataset's order")
    outs: list[torch.Tensor] = []
    for out, n in forward_all(model, step, batches, d.device, prec, lockstep):
        y = out.outputs
        shape = list(y.shape) if isinstance(y, torch.Tensor) else None
        if shape is None or not shape or shape[0] != n or (outs and shape[1:] != list(outs[0].shape[1:])):
            got = f"outputs {shape}" if shape is not None else f"{type(y).__name__} outputs"
            raise UserError(f"predict(): step ({step.name}) gave {got} for a batch of {n} samples"
                            + (f" (earlier batches: {list(outs[0].shape[1:])} per sample)" if outs and shape else "")
                            + "; valid: a tensor with one row per sample, of one shape (pad to a fixed length; "
                            "a causal LM's step=model_loss gives them for data without labels)")
        outs.append(y.float().cpu())
    # one per data-parallel rank: its tensor-parallel peers (neighbouring ranks) computed the same outputs
    shards = all_gather_object(torch.cat(outs) if outs else None)[::d.world_size // batches.dist.world_size]
    if not d.is_main:
        return None
    # data rank r holds samples r, r+W, ...: interleave back into dataset order
    full = [s for s in shards if s is not None]
    out = torch.empty((batches.n, *full[0].shape[1:]), dtype=full[0].dtype)
    for r, s in enumerate(shards):
        if s is not None:
            out[r::len(shards)] = s
    return out


@dataclass
class Outside:
    """What Trainer.evaluate / predict run with: the model on the device, its step, the data's batches,
    the fit's precision (or the configured one before any fit), lockstep forwards under FSDP."""
    model: nn.Module
    step: Step
    batches: Batches
    prec: Precision
    lockstep: bool


def outside_fit(t: TrainerConfig, d: Dist, fp: Any, data: Any, batch_size: Optional[int], model: Optional[nn.Module],
                loss_fn: Optional[Callable], step: Any, what: str) -> Outside:
    """evaluate() / predict() called on a Trainer, after a fit (fp: fit.parts.FitParts) or before one:
    what was not given comes from the fit."""
    if model is None and fp is None:
        raise UserError(f"{what}() before fit() needs model=")
    model = (model or fp.model).to(d.device)
    bs = batch_size or t.eval_batch_size or t.batch_size
    d = fp.train.dist if fp is not None else d  # the fit's data-parallel view: tensor-parallel peers read the same
    batches: Any = stream.from_data(data, d, bs, t.num_workers, False, train=False) if stream.is_stream(data) else \
        Batches(data, d, train=False, batch_size=bs)
    if fp is not None:
        prec, lockstep = fp.prec, fp.sharded
    else:
        prec, lockstep = Precision(resolve_precision(t.precision, d.device)[0], d.device), False
    if step is None and loss_fn is None and fp is not None:
        step = fp.step  # the fit's own, bound to its loss
    else:
        # a loss is needed only for a loss: predict() runs a step that needs one without it
        loss_fn = loss_fn or (fp.loss_fn if fp is not None else None) or (_no_loss if what == "predict" else None)
        step = resolve(step or (fp.step if fp is not None else None), loss_fn, preparer(prec.prepare_input, False))
    return Outside(model, step, batches, prec, lockstep)


def _no_loss(outputs: Any, targets: Any) -> None:
    return None
