"""One optimizer step: the micro-batches' forward and backward, then unscale, clip, guard, step.

Gradients are all-reduced only on the last micro-batch of an accumulation group. The path holds
no host sync except the non-finite guard's one flag (trainer.nonfinite=off removes it). The Stepper
holds the step's tools, not the loop's state: the Trainer tells it where it is.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import strategy as S
from .config import Strategy, TrainerConfig
from .data import batch_size_of, to_device
from .dist import Dist, all_gather_object
from .metrics import Accumulator
from .precision import Precision

log = logging.getLogger("launcher")


class Stepper:
    def __init__(self, t: TrainerConfig, net: nn.Module, params: list[nn.Parameter], loss_fn: Callable,
                 optimizer: torch.optim.Optimizer, prec: Precision, strategy: Strategy, d: Dist,
                 acc: Accumulator, data_on_device: bool, channels_last: bool, xla: Any = None) -> None:
        self.t, self.net, self.params, self.loss_fn, self.opt = t, net, params, loss_fn, optimizer
        self.prec, self.strategy, self.d, self.acc, self.xla = prec, strategy, d, acc, xla
        # in-memory tensors already where the model is: no per-step device check (the fast path)
        self.data_on_device = data_on_device
        self.channels_last = channels_last
        self.skipped_steps = 0
        self.first_step_logged = False

    def micro(self, batch: Any, last: bool, group: int) -> torch.Tensor:
        """Forward and backward of one micro-batch of a `group`; gradients sync on the `last`."""
        x, y = batch if self.data_on_device else to_device(batch, self.d.device)
        x = self.prec.prepare_input(x)
        if self.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with S.no_sync(self.net, self.strategy, skip=not last):
            with self.prec.autocast():
                out = self.net(x)
                loss = self.loss_fn(out, y)
            # mean over the group's samples, as one batch of the whole group would give
            self.prec.backward(loss / group if group > 1 else loss)
        self.acc.update(loss.float(), y.shape[0] if isinstance(y, torch.Tensor) else batch_size_of(y),
                        out.detach(), y)
        return loss

    def step(self, loss: torch.Tensor, step: int) -> bool:
        """The optimizer step that makes `step`; False when the guard skipped it (nonfinite=skip)."""
        t = self.t
        if self.xla is not None:
            self.xla.reduce_gradients(self.opt)  # global gradients before clipping and the guard
        self.prec.unscale(self.opt)
        norm = S.grad_norm(self.params, t.gradient_clip_val) if t.gradient_clip_val > 0 else None
        # 16-mixed: the GradScaler skips inf/nan steps itself (and lowers its scale)
        if t.nonfinite != "off" and self.prec.scaler is None:
            finite = bool(torch.isfinite(norm)) if norm is not None else S.grads_finite(self.params, self.strategy)
            if not finite:
                self._nonfinite(loss, norm, step)  # raises unless trainer.nonfinite=skip
                self.opt.zero_grad(set_to_none=True)
                return False
        self.prec.step(self.opt)
        if self.xla is not None:
            self.xla.mark_step()  # cut and run the step's lazy graph
        self.opt.zero_grad(set_to_none=True)
        if not self.first_step_logged:  # start-up latency: bench/startup.py reads this line
            self.first_step_logged = True
            log.info("first optimizer step done at unix time %.3f", time.time(), extra={"file_only": True})
        return True

    def _nonfinite(self, loss: torch.Tensor, norm: Optional[torch.Tensor], step: int) -> None:
        """Name the step and the rank(s) whose loss went bad (the norm is global: all ranks get here)."""
        losses = all_gather_object(float(loss.detach().float()))
        bad = [r for r, v in enumerate(losses) if not math.isfinite(v)]
        where = f"rank(s) {bad} (loss {[losses[r] for r in bad]})" if bad else \
            f"every rank's loss is finite, not every gradient{f' (norm {float(norm)})' if norm is not None else ''}"
        msg = f"non-finite loss or gradient norm at step {step}: {where}"
        if self.t.nonfinite == "error":
            raise FloatingPointError(f"{msg}; the optimizer did not step (trainer.nonfinite=skip skips such steps)")
        self.skipped_steps += 1
        log.warning("%s; step skipped (%d so far)", msg, self.skipped_steps)
