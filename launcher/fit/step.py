"""One optimizer step: the micro-batches' step (launcher/fit/steps.py: the user's, or the default)
and backward, then unscale, clip, guard, step.

Gradients are all-reduced only on the last micro-batch of an accumulation group. A step that returns
a loss sum and its count (tokens) is backpropagated as the sum; before the optimizer step the group's
counts are summed over the ranks (one scalar all-reduce) and the gradients scaled by world / count,
so the update is the mean over every token of the group, however the group was split. The path holds
no host sync (the non-finite guard's with a fused optimizer included: launcher/fit/guard.py). The Stepper
holds the step's tools, not the loop's state: the Trainer tells it where it is.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from ..device import strategy as S
from ..config import Strategy, TrainerConfig, UserError
from .batch import to_device
from ..device.dist import Dist, all_reduce_sum
from .guard import Guard
from .metrics import Accumulator
from ..device.precision import Precision
from ..observe.phases import Phases
from .seeding import rng_state, set_rng_state
from .steps import Step, StepOutput

log = logging.getLogger("launcher")


class Stepper:
    def __init__(self, t: TrainerConfig, model: nn.Module, net: nn.Module, step: Step,
                 optimizer: torch.optim.Optimizer, prec: Precision, strategy: Strategy, d: Dist, acc: Accumulator,
                 data_on_device: bool, full_batch: int, xla: Any = None) -> None:
        self.t, self.model, self.net, self.step_fn, self.opt = t, model, net, step, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.full_batch = full_batch  # a compiled model runs other batch sizes eagerly (strategy.eager_if_odd)
        self.prec, self.strategy, self.d, self.acc, self.xla = prec, strategy, d, acc, xla
        # in-memory tensors already where the model is: no per-step device check (the fast path)
        self.data_on_device = data_on_device
        self.counts: Any = None  # the group's summed StepOutput.count so far (a loss-sum step), on the device
        self.first_step_logged = False
        # its reads come every log_every_n_steps (at most 100), where the loss is read for the logs anyway
        self.guard = Guard(t.nonfinite, optimizer, self.params, strategy, d.device,
                           every=min(t.log_every_n_steps or 50, 100))
        self.phases = Phases(d.device)  # lapped at forward, backward and the optimizer step's ends

    def micro(self, batch: Any, last: bool, group: int) -> torch.Tensor:
        """Forward and backward of one micro-batch of a `group`; gradients sync on the `last`."""
        out, n = self._forward_backward(batch, last, group)
        self.acc.add(out, n)
        self.phases.lap("backward")
        return out.loss  # type: ignore[return-value]

    def _forward_backward(self, batch: Any, last: bool, group: int) -> tuple[StepOutput, int]:
        batch = batch if self.data_on_device else to_device(batch, self.d.device)
        n = self.step_fn.samples(batch)
        with S.no_sync(self.net, self.strategy, skip=not last), S.eager_if_odd(self.model, n, self.full_batch):
            with self.prec.autocast():
                out = self.step_fn(self.net, batch)
            self.phases.lap("forward")
            if out.loss is None:
                raise UserError(f"step ({self.step_fn.name}) returned no loss for a training batch; valid: a loss "
                                "(is the batch missing its targets?)")
            if out.count is None:
                # mean over the group's samples, as one batch of the whole group would give
                self.prec.backward(out.loss / group if group > 1 else out.loss)
            else:  # a sum: scaled by the group's count over all ranks before the optimizer step
                self.prec.backward(out.loss)
                count = torch.as_tensor(out.count, dtype=torch.float64, device=self.d.device)
                self.counts = count if self.counts is None else self.counts + count
        return out, n

    def _normalise(self) -> None:
        """Gradients of loss sums -> the mean over every count of the group on every rank. DDP and FSDP
        average over the ranks (a division by the world size), hence world / total."""
        total = all_reduce_sum(self.counts.clone())
        if self.xla is not None and self.d.world_size > 1 and not torch.distributed.is_initialized():
            raise UserError("a step returning a loss sum (StepOutput.count) on several XLA devices is not supported "
                            "yet; valid: a mean loss")
        scale = self.d.world_size / total.clamp(min=1.0)
        by_dtype: dict[torch.dtype, torch.Tensor] = {}
        for p in self.params:
            if p.grad is not None:
                g = p.grad
                g.mul_(by_dtype.setdefault(g.dtype, scale.to(g.dtype)))
        self.counts = None

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
            self.counts = None
            for p in self.model.parameters():
                p.grad = None
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
            set_rng_state(rng)

    def step(self, loss: torch.Tensor, step: int) -> bool:
        """The optimizer step that makes `step`; False when the guard skipped it and knows so now
        (a fused optimizer skips a bad step on the device: the host hears of it a few steps later)."""
        stepped = self._step(loss, step)
        self.phases.lap("optimizer")
        return stepped

    def _step(self, loss: torch.Tensor, step: int) -> bool:
        t = self.t
        if self.xla is not None:
            self.xla.reduce_gradients(self.opt)  # global gradients before clipping and the guard
        if self.counts is not None:
            self._normalise()
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
