"""One optimizer step: the micro-batches' forward and backward, then unscale, clip, guard, step.

Gradients are all-reduced only on the last micro-batch of an accumulation group. The path holds
no host sync (the non-finite guard's with a fused optimizer included: launcher/fit/guard.py). The Stepper
holds the step's tools, not the loop's state: the Trainer tells it where it is.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch import nn

from ..device import strategy as S
from ..config import Strategy, TrainerConfig
from .batch import inputs_and_targets
from .data import batch_size_of, to_device
from ..device.dist import Dist
from .guard import Guard
from .metrics import Accumulator
from ..device.precision import Precision
from .seeding import rng_state, set_rng_state

log = logging.getLogger("launcher")


class Stepper:
    def __init__(self, t: TrainerConfig, model: nn.Module, net: nn.Module, loss_fn: Callable,
                 optimizer: torch.optim.Optimizer, prec: Precision, strategy: Strategy, d: Dist, acc: Accumulator,
                 data_on_device: bool, channels_last: bool, full_batch: int, xla: Any = None) -> None:
        self.t, self.model, self.net, self.loss_fn, self.opt = t, model, net, loss_fn, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.full_batch = full_batch  # a compiled model runs other batch sizes eagerly (strategy.eager_if_odd)
        self.prec, self.strategy, self.d, self.acc, self.xla = prec, strategy, d, acc, xla
        # in-memory tensors already where the model is: no per-step device check (the fast path)
        self.data_on_device = data_on_device
        self.channels_last = channels_last
        self.first_step_logged = False
        # its reads come every log_every_n_steps (at most 100), where the loss is read for the logs anyway
        self.guard = Guard(t.nonfinite, optimizer, self.params, strategy, d.device,
                           every=min(t.log_every_n_steps or 50, 100))

    def micro(self, batch: Any, last: bool, group: int) -> torch.Tensor:
        """Forward and backward of one micro-batch of a `group`; gradients sync on the `last`."""
        loss, out, y = self._forward_backward(batch, last, group)
        self.acc.update(loss.float(), y.shape[0] if isinstance(y, torch.Tensor) else batch_size_of(y),
                        out.detach(), y)
        return loss

    def _forward_backward(self, batch: Any, last: bool, group: int) -> tuple[torch.Tensor, Any, Any]:
        x, y = inputs_and_targets(batch if self.data_on_device else to_device(batch, self.d.device))
        x = self.prec.prepare_input(x)
        if self.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else self.full_batch
        with S.no_sync(self.net, self.strategy, skip=not last), S.eager_if_odd(self.model, n, self.full_batch):
            with self.prec.autocast():
                out = self.net(x)
                loss = self.loss_fn(out, y)
            # mean over the group's samples, as one batch of the whole group would give
            self.prec.backward(loss / group if group > 1 else loss)
        return loss, out, y

    def settle_buckets(self, batches: Any) -> None:
        """A process resumed after step 0: one throwaway synced forward and backward under DDP, so
        that every step it trains uses the gradient buckets the uninterrupted run used at that step.

        Why: DDP all-reduces its first iteration's gradients in one bucket in parameter order and
        then rebuilds the buckets in the order the gradients became ready, once per process. gloo's
        ring all-reduce (NCCL's rings too) sums each element over the ranks starting at a rank that
        depends on the element's position in its bucket, so at 3 ranks or more the two layouts give
        sums that differ in the last bits (at 2, a + b == b + a). An uninterrupted run trains step 1 in
        the first layout and every later step in the rebuilt one; without this, a process resumed
        at step k would train step k + 1 in the first layout (16 ranks on SLURM: weights off in the
        last bits from there on). The batch (the dataset's first samples) and the gradients are
        dropped; the RNG streams and the module buffers (BatchNorm statistics) are put back, so
        nothing but DDP's layout changes (a model that counts its own forwards sees one more). The
        ready order is rank 0's (DDP broadcasts it) and is the model's backward order, the same for
        this batch as for any other."""
        if not isinstance(self.net, nn.parallel.DistributedDataParallel) or not batches.n:
            return  # FSDP, XLA and one rank reduce in a layout that never changes
        if self.d.world_size < 3:
            return  # each element's sum is one addition, the same bits in any layout: no forward to spend
        rng, buffers = rng_state(), [b.detach().clone() for b in self.model.buffers()]
        try:
            self._forward_backward(batches.head(), last=True, group=1)
        finally:
            for p in self.model.parameters():
                p.grad = None
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
            set_rng_state(rng)

    def step(self, loss: torch.Tensor, step: int) -> bool:
        """The optimizer step that makes `step`; False when the guard skipped it and knows so now
        (a fused optimizer skips a bad step on the device: the host hears of it a few steps later)."""
        t = self.t
        if self.xla is not None:
            self.xla.reduce_gradients(self.opt)  # global gradients before clipping and the guard
        self.prec.unscale(self.opt)
        norm = S.grad_norm(self.params, t.gradient_clip_val) if t.gradient_clip_val > 0 else None
        # 16-mixed: the GradScaler skips inf/nan steps itself (and lowers its scale)
        guarded = t.nonfinite != "off" and self.prec.scaler is None
        if guarded and not self.guard.before_step(loss, norm, step):
            self.opt.zero_grad(set_to_none=True)
            return False
        self.prec.step(self.opt)
        if self.xla is not None:
            self.xla.mark_step()  # cut and run the step's lazy graph
        self.opt.zero_grad(set_to_none=True)
        if guarded:
            self.guard.after_step(step)
        if not self.first_step_logged:  # start-up latency: bench/startup.py reads this line
            self.first_step_logged = True
            log.info("first optimizer step done at unix time %.3f", time.time(), extra={"file_only": True})
        return True

    def check(self) -> None:
        """Hear now of bad steps the device skipped (before a checkpoint, at an epoch's end, at the
        end): raises for trainer.nonfinite=error. Every rank calls it at the same step."""
        self.guard.read()
