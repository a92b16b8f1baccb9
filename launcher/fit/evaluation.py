"""Forward passes without gradients: evaluation (every sample exactly once) and predictions."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .batch import inputs_and_targets
from .data import Batches, batch_size_of, to_device
from ..device.dist import Dist, all_gather_object
from .metrics import Accumulator
from ..config import TrainerConfig
from ..device.hardware import resolve_precision
from ..device.precision import Precision
from ..device.strategy import eager_if_odd
from ..device.modes import inference


def forward_all(model: nn.Module, batches: Batches, device: torch.device, prec: Precision,
                lockstep: bool) -> Iterator[tuple[Any, Any, bool]]:
    """(batch on device, outputs, real) over this rank's evaluation shard, without gradients.

    Under FSDP every forward is a collective (parameters are gathered), so ranks with fewer eval
    batches repeat one and discard it (real=False) until the rank with the most is done.
    """
    own = len(batches)
    most = math.ceil(math.ceil(batches.n / batches.dist.world_size) / batches.batch_size) if lockstep else own
    first = None
    with inference(model):  # each module back in its own mode after (a frozen BatchNorm stays frozen)
        for batch in batches.epoch(0):
            batch = to_device(batch, device)
            first = batch if first is None else first
            yield batch, _forward(model, batch, prec, batches.batch_size), True
        for _ in range(most - own):
            first = first if first is not None else to_device(batches.head(), device)
            _forward(model, first, prec, batches.batch_size)


def _forward(model: nn.Module, batch: Any, prec: Precision, full: int) -> Any:
    """A compiled model compiles once more for inference (grad mode is part of its guards) and runs
    the last, shorter batch eagerly (strategy.eager_if_odd)."""
    x = inputs_and_targets(batch)[0]
    n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else full
    with prec.autocast(), eager_if_odd(model, n, full):
        return model(prec.prepare_input(x))


def evaluate(model: nn.Module, loss_fn: Callable, batches: Batches, acc: Accumulator, device: torch.device,
             prec: Precision, lockstep: bool = False, prefix: str = "val") -> dict[str, float]:
    """<prefix>_loss and <prefix>_<metric> over every rank's shard (a collective: every rank calls it).
    fit's own validation is val_*; Trainer.evaluate names what it evaluated (test_* by default)."""
    # The bare module, not DDP: ranks hold different numbers of eval batches, and DDP's forward
    # would start a collective (buffer broadcast) per batch and hang the ranks that ran out.
    acc.reset()
    for batch, out, _real in forward_all(model, batches, device, prec, lockstep):
        y = inputs_and_targets(batch)[1]
        with prec.autocast():
            loss = loss_fn(out, y)
        acc.update(loss.float(), batch_size_of(y), out, y)
    return acc.compute(prefix)


def predict(model: nn.Module, batches: Batches, d: Dist, prec: Precision, lockstep: bool) -> Optional[torch.Tensor]:
    """Outputs for every sample, in dataset order, on rank 0 (None on other ranks)."""
    outs = [out.float().cpu() for _, out, _ in forward_all(model, batches, d.device, prec, lockstep)]
    shards = all_gather_object(torch.cat(outs) if outs else None)
    if not d.is_main:
        return None
    # rank r holds samples r, r+W, ...: interleave back into dataset order
    full = [s for s in shards if s is not None]
    out = torch.empty((batches.n, *full[0].shape[1:]), dtype=full[0].dtype)
    for r, s in enumerate(shards):
        if s is not None:
            out[r::d.world_size] = s
    return out


def outside_fit(t: TrainerConfig, d: Dist, fp: Any, data: Any,
                batch_size: Optional[int]) -> tuple[Optional[Batches], Precision, bool]:
    """For evaluate() / predict() called on a Trainer: `data`'s batches (None for no data), the fit's
    precision (fp: fit.parts.FitParts, None before any fit), and lockstep forwards when the model is
    FSDP-sharded."""
    batches = None if data is None else Batches(data, d, train=False,
                                                batch_size=batch_size or t.eval_batch_size or t.batch_size)
    if fp is not None:
        return batches, fp.prec, fp.sharded
    return batches, Precision(resolve_precision(t.precision, d.device)[0], d.device), False
