"""What one fit() trains with on this rank, built from the user's model, data and optimizer:
batch sources, precision, the model on its device and wrapped by the strategy (DDP, FSDP,
compile), the optimizer over the parameters as they will be trained, metric accumulators,
the Stepper and the throughput meter. Built once per fit; the Trainer owns the result."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import strategy as S
from .config import Strategy, TrainerConfig
from .data import Batches
from .dist import Dist
from .metrics import Accumulator
from .precision import Precision
from .progress import Speed
from .step import Stepper
from .xla import XLA


@dataclass
class FitParts:
    model: nn.Module  # the bare module (never the DDP wrapper): checkpoints, evaluation, model.pt
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Callable
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

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"


def build(t: TrainerConfig, d: Dist, model: nn.Module, loss_fn: Callable, optimizer: Any, train_data: Any,
          val_data: Any, metrics: dict[str, Any], scheduler: Any, batch_size: Optional[int]) -> FitParts:
    bs = batch_size or t.batch_size
    train = Batches(train_data, d, train=True, batch_size=bs, seed=t.seed, num_workers=t.num_workers,
                    pin_memory=d.device.type == "cuda")
    val = Batches(val_data, d, train=False, batch_size=t.eval_batch_size or bs,
                  num_workers=t.num_workers) if val_data is not None else None
    xla = XLA() if t.accelerator == "xla" else None
    prec = Precision(t.precision, d.device)  # type: ignore[arg-type]
    # XLA: gradients are all-reduced by xm.reduce_gradients, not by DDP
    strategy: Strategy = "none" if xla is not None else S.resolve(t.strategy, d)  # type: ignore[arg-type]
    if strategy == "none" and d.distributed and xla is None:  # a torchrun world no parent has seen
        raise ValueError(f"trainer.strategy=none with {d.world_size} ranks would train unsynchronised copies; "
                         "valid: auto, ddp, fsdp")
    model = prec.prepare_model(model.to(d.device))
    # the optimizer must see the parameters as they will be trained: after FSDP sharding
    net = S.wrap(model, strategy, d, t.fsdp_wrap, t.compile, t.channels_last)
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model.parameters())  # a partial from the recipe
    elif strategy == "fsdp":
        raise ValueError("trainer.strategy=fsdp needs the optimizer as a callable taking the parameters "
                         "(e.g. functools.partial(torch.optim.AdamW, lr=1e-3)): FSDP replaces them")
    if scheduler is not None and not hasattr(scheduler, "step"):
        scheduler = scheduler(optimizer)
    if t.scheduler_interval == "step" and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError("trainer.scheduler_interval=step with ReduceLROnPlateau: it needs the monitored "
                         "metric, which exists per epoch; valid: epoch")
    train_acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
    val_acc = Accumulator({k: copy.deepcopy(m) for k, m in metrics.items()}, d.device)
    on_device = train.tensors is not None and all(x.device == d.device for x in train.tensors)
    stepper = Stepper(t, net, [p for p in model.parameters() if p.requires_grad], loss_fn, optimizer, prec,
                      strategy, d, train_acc, on_device, xla)
    speed = Speed.of(model, samples_per_step=train.batch_size * t.accumulate_grad_batches * d.world_size,
                     world_size=d.world_size, device=d.device, peak_tflops=t.peak_tflops)
    return FitParts(model, optimizer, scheduler, loss_fn, metrics, train, val, prec, strategy, xla, train_acc,
                    val_acc, stepper, speed)
