"""What one fit() trains with on this rank, built from the user's model, data and optimizer:
batch sources, precision, the model on its device and wrapped by the strategy (DDP, FSDP,
compile), the optimizer over the parameters as they will be trained, metric accumulators,
the Stepper and the throughput meter. Built once per fit; the Trainer owns the result."""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..device import mesh as M
from ..device import strategy as S
from ..config import Strategy, TrainerConfig, UserError, one_line
from . import preflight
from .batch import first_tensor, map_tensors, to_device
from . import stream
from .data import Batches
from ..device.dist import Dist, broadcast_object
from ..device.hardware import channels_last_fits, resolve_channels_last, resolve_precision
from .metrics import Accumulator
from ..device.memory import describe, fsdp_options
from ..device.precision import Precision
from ..observe.holdings import for_run
from ..observe.phases import Phases
from ..observe.progress import Speed
from .step import Stepper
from .steps import Step, Supervised, preparer, resolve
from ..observe.summary import runs_channels_last, summarize_forward
from ..device.xla import XLA

log = logging.getLogger("launcher")


@dataclass
class FitParts:
    model: nn.Module  # the bare module (never the DDP wrapper): checkpoints, evaluation, model.pt
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Optional[Callable]
    step: Step  # what one micro-batch makes (fit/steps.py), bound to loss_fn and the input preparation
    metrics: dict[str, Any]  # the user's metric objects; each accumulator holds its own copies
    train: Batches
    val: Optional[Batches]
    prec: Precision
    strategy: Strategy
    xla: Optional[XLA]
    train_acc: Accumulator
    val_acc: Accumulator
    stepper: Stepper
    speed: Speed
    chosen: str  # what precision=auto / channels_last=auto became on this device, and why (for the log)
    channels_last: bool  # the step's 4-D floating inputs (and the model) in channels_last
    phases: Phases  # where this rank's step time goes (observe/phases.py); the Stepper laps it

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def epoch_scheduler_step(self, score: Optional[float]) -> None:
        """An epoch-interval scheduler's step at a whole epoch's end (ReduceLROnPlateau: on the score)."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if score is not None:
                self.scheduler.step(score)
        elif self.scheduler is not None:
            self.scheduler.step()


def _called(key: str, make: Callable, arg: Any) -> Any:
    """The recipe's optimizer / scheduler from its partial: what its arguments make it raise (a
    negative or non-numeric lr...) is the user's, named by the recipe key and the class."""
    try:
        return make(arg)
    except Exception as e:  # noqa: BLE001 - raised by the user's arguments to their class
        name = getattr(getattr(make, "func", make), "__qualname__", type(make).__name__)
        raise UserError(f"{key} ({name}): {one_line(e)}") from e


def _fused(make: Any, params: list[nn.Parameter], device: torch.device,
           sharded: bool) -> Optional[torch.optim.Optimizer]:
    """The recipe's optimizer built with fused=True where its class has a fused kernel for this
    device and the recipe chose no implementation (fused or foreach) itself: one kernel per step
    instead of several, and it can skip a non-finite step on the device (launcher/fit/guard.py).
    FSDP's sharded parameters (DTensors) have fused kernels only for Adam and AdamW (fused SGD
    fails at its first step: no sharding strategy for aten._fused_sgd_)."""
    func, keywords = getattr(make, "func", None), getattr(make, "keywords", None)
    if not isinstance(func, type) or not issubclass(func, torch.optim.Optimizer) or keywords is None:
        return None  # not a partial of an optimizer class: the user's own factory decides
    if sharded and func not in (torch.optim.Adam, torch.optim.AdamW):
        return None
    if "fused" in keywords or "foreach" in keywords or device.type not in ("cuda", "cpu"):
        return None
    try:
        return make(params, fused=True) if "fused" in inspect.signature(func).parameters else None
    except Exception:  # noqa: BLE001 - e.g. a parameter dtype without a fused kernel: the plain one then
        return None


def close(fp: Optional[FitParts]) -> None:
    """fit()'s end: the loaders' persistent workers end now, not whenever the parts are collected (a
    collected cycle can close their queues before the workers hear to stop: 5 s each)."""
    if fp is not None:
        for batches in (fp.train, fp.val):
            getattr(batches, "close", lambda: None)()


def build(t: TrainerConfig, d: Dist, model: nn.Module, loss_fn: Optional[Callable], optimizer: Any, train_data: Any,
          val_data: Any, metrics: dict[str, Any], scheduler: Any, batch_size: Optional[int], step: Any) -> FitParts:
    if not isinstance(model, nn.Module):
        raise UserError(f"model: {type(model).__name__} is not a torch.nn.Module; valid: a _target_ that builds one")
    for key, value, valid in (("optimizer", optimizer, "a torch.optim.Optimizer or a callable taking the parameters"),
                              ("train_data", train_data, "a Dataset or a DataLoader")):
        if value is None:
            raise UserError(f"fit(): {key} is missing; valid: {valid}")
    bs = batch_size or t.batch_size
    dd = M.data_dist(t, d)  # data shards over the data-parallel ranks: tensor-parallel peers read the same batches
    train: Any = stream.from_data(train_data, dd, bs, t.num_workers, d.device.type == "cuda", True, t.persistent_workers,
                                  t.prefetch_factor, t.seed, t.seed_per_sample) if stream.is_stream(train_data) else Batches(train_data, dd, train=True, batch_size=bs, seed=t.seed, num_workers=t.num_workers,
                    pin_memory=d.device.type == "cuda", seed_per_sample=t.seed_per_sample,
                    persistent_workers=t.persistent_workers, prefetch_factor=t.prefetch_factor)
    val: Any = None
    if stream.is_stream(val_data):  # every rank reads its streams whole: every sample once across ranks
        val = stream.from_data(val_data, dd, t.eval_batch_size or bs, t.num_workers, False, train=False, seed=t.seed,
                               seeded=t.seed_per_sample)
    elif val_data is not None:
        val = Batches(val_data, dd, train=False, batch_size=t.eval_batch_size or bs, seed=t.seed,
                      num_workers=t.num_workers, seed_per_sample=t.seed_per_sample,
                      persistent_workers=t.persistent_workers, prefetch_factor=t.prefetch_factor)
    xla = XLA() if t.accelerator == "xla" else None
    precision, why_precision = resolve_precision(t.precision, d.device)
    channels_last, why_cl = resolve_channels_last(t.channels_last, d.device, precision)
    prec = Precision(precision, d.device)
    # XLA: gradients are all-reduced by xm.reduce_gradients, not by DDP
    strategy: Strategy = "none" if xla is not None else S.resolve(t.strategy, d, t.tensor_parallel)  # type: ignore[arg-type]
    if strategy == "none" and d.distributed and xla is None:  # a torchrun world no parent has seen
        raise UserError(f"trainer.strategy=none with {d.world_size} ranks would train unsynchronised copies; "
                         "valid: auto, ddp, fsdp")
    step = resolve(step, loss_fn, preparer(prec.prepare_input, False))
    model = prec.prepare_model(model.to(d.device))
    firsts = _first_batches(train, val, d) if d.is_main and xla is None else []  # rank 0 looks, every rank learns
    if xla is None:  # (every rank knows whether it runs on XLA: all of them meet the broadcast or none)
        problem = broadcast_object(preflight.check(model, step, metrics, firsts, prec, d.device) if firsts else "")
        if problem:
            raise UserError(problem)
    batch = firsts[0][1] if firsts else None
    if channels_last and xla is None:
        # rank 0 looks at the first batch (4-D inputs only; auto also tries one on the model); all ranks follow
        fits = _channels_last_fits(t.channels_last == "auto", model, step, batch, prec) if d.is_main else None
        ok, why = broadcast_object(fits)
        if not ok:
            channels_last, why_cl = False, why
    step = step.bind(None, preparer(prec.prepare_input, channels_last))
    chosen = f"precision {precision} ({why_precision}), channels_last {'on' if channels_last else 'off'} ({why_cl})"
    summary = _summary(model, lambda: step(model, batch)) if t.summary and batch is not None else ""
    # the optimizer must see the parameters as they will be trained: after FSDP sharding
    fsdp = fsdp_options(t, precision, d.device) if strategy == "fsdp" else {}  # trainer.fsdp_* (device/memory.py)
    dp_mesh, mesh = M.parallelize(model, t, d, strategy)  # HSDP's 2-D mesh; tensor parallel applied
    net = S.wrap(model, strategy, d, t.fsdp_wrap, t.compile, channels_last, t.activation_checkpointing, fsdp, dp_mesh)
    chosen += describe(model, fsdp)
    if not isinstance(optimizer, torch.optim.Optimizer):
        fused = _fused(optimizer, list(model.parameters()), d.device, strategy == "fsdp") if xla is None else None
        optimizer = fused or _called("optimizer", optimizer, model.parameters())  # a partial from the recipe
    elif strategy == "fsdp":
        raise UserError("trainer.strategy=fsdp needs the optimizer as a callable taking the parameters "
                         "(e.g. functools.partial(torch.optim.AdamW, lr=1e-3)): FSDP replaces them")
    held = for_run(model, optimizer, t, d.world_size, strategy) if t.summary and xla is None else ""
    if scheduler is not None and not hasattr(scheduler, "step"):
        scheduler = _called("scheduler", scheduler, optimizer)
    if t.scheduler_interval == "step" and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise UserError("trainer.scheduler_interval=step with ReduceLROnPlateau: it needs the monitored "
                         "metric, which exists per epoch; valid: epoch")
    train_acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
    val_acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
    on_device = train.tensors is not None and all(x.device == d.device for x in train.tensors)
    stepper = Stepper(t, model, net, step, optimizer, prec, strategy, d, train_acc, on_device, train.batch_size, xla)
    speed = Speed.of(model, samples_per_step=train.batch_size * t.accumulate_grad_batches * dd.world_size,
                     world_size=d.world_size, device=d.device, peak_tflops=t.peak_tflops)
    log.info(chosen)  # printed once all is built: a user's error above stays the run's only line
    for text in (summary, held):
        if text:
            log.info(text)
    return FitParts(model, optimizer, scheduler, loss_fn, step, metrics, train, val, prec, strategy, xla, train_acc,
                    val_acc, stepper, speed, chosen, channels_last, stepper.phases)


def _first_batches(train: Batches, val: Optional[Batches], d: Dist) -> list[tuple[str, Any]]:
    """("training" / "validation", the split's first batch on the device) for the preflight; a split
    whose batch cannot be read is left out (the data's own error then surfaces where every rank
    meets it: in training). What the step makes of the batch is the preflight's to check."""
    firsts = []
    for split, batches in (("training", train), ("validation", val)):
        if batches is None or batches.n == 0:  # (a stream's n is unknown: None)
            continue
        try:
            firsts.append((split, to_device(batches.head(), d.device)))
        except Exception:  # noqa: BLE001 - see above
            continue
    return firsts


def _channels_last_fits(auto: bool, model: nn.Module, step: Step, batch: Any, prec: Precision) -> tuple[bool, str]:
    """channels_last stays on where the step's inputs hold a 4-D floating tensor (images) and, under auto,
    the model takes them in that layout: the default step's inputs, or any such tensor of a custom step's batch."""
    if batch is None:
        return channels_last_fits(None, lambda: (False, ""), auto)
    if isinstance(step, Supervised):
        x = prec.prepare_input(step.split(batch)[0])
        return channels_last_fits(x, lambda: runs_channels_last(model, lambda: model(
            x.contiguous(memory_format=torch.channels_last))), auto)
    images = map_tensors(batch, lambda v: v if v.dim() == 4 and v.is_floating_point() else None)
    x = first_tensor(images)
    if x is None:
        return False, f"{'auto' if auto else 'set, but not applied'}: the batch holds no 4-D floating tensor (images)"
    on = step.bind(None, preparer(prec.prepare_input, True))
    return channels_last_fits(x, lambda: runs_channels_last(model, lambda: on(model, batch)), auto)


def _summary(model: nn.Module, forward: Callable[[], Any]) -> str:
    """The model summary of the bare model (before any wrapping: its forward has no collective)."""
    try:
        return summarize_forward(model, forward)
    except Exception as e:  # noqa: BLE001 - a summary is never a reason not to train
        return f"no model summary: a forward of the first batch raised {one_line(e)}"
