"""trainer.nonfinite: a step with a non-finite loss or gradient never reaches the weights, and the
host learns of it without waiting for the device at every step.

With a fused optimizer (torch's fused Adam, AdamW, SGD, Adagrad: `_step_supports_amp_scaling`)
the step is skipped on the device: the flag "some gradient is inf/nan" is computed there and
handed to the kernel as `found_inf`, exactly as GradScaler does for 16-mixed, so the kernel leaves
weights, moments and the step count untouched. The flags and losses of the last steps stay on the
device in two small ring buffers; the host reads them every `every` steps (and at epoch ends,
checkpoints and the end of the run), on every rank at the same step, because the flag is computed
from the all-reduced gradients (DDP) or the global norm (FSDP) and so is the same on every rank.
The error then names the step the bad gradients came from, a few steps after it.

Any other optimizer cannot be told to skip on the device: the flag is read at every step then (one
device->host sync per step, the cost the fused path removes), and the run's log says so once.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Optional

import torch
from torch import nn

from ..device import strategy as S
from ..config import Strategy
from ..device.dist import all_gather_object

log = logging.getLogger("launcher")


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Does `optimizer.step()` honour `optimizer.found_inf` (the fused kernels)?"""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and \
        all(g.get("fused") for g in optimizer.param_groups)


class Guard:
    def __init__(self, mode: str, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 strategy: Strategy, device: torch.device, every: int) -> None:
        self.mode, self.opt, self.params, self.strategy = mode, optimizer, params, strategy
        self.device, self.wanted_every = device, every
        self.on_device: Optional[bool] = None  # decided at the first step: a resume may have changed it
        self.first = 0  # the step in slot 0 of the buffers
        self.pending = 0  # steps recorded since the last read
        self.skipped = 0

    def _decide(self) -> None:
        """Fused or not is known once the checkpoint is restored: loading an optimizer state saved
        by a non-fused optimizer (an older run) sets its param groups back to non-fused."""
        self.on_device = skips_on_device(self.opt)
        self.every = self.wanted_every if self.on_device else 1
        self.flags = torch.zeros(self.every, dtype=torch.float32, device=self.device)  # 1.0: that step was bad
        self.losses = torch.zeros(self.every, dtype=torch.float32, device=self.device)  # this rank's loss then
        # On a CPU the "device" is the host: reading the flag costs no sync, and there is nothing to say
        if not self.on_device and self.device.type != "cpu":
            fusable = "fused" in inspect.signature(type(self.opt).__init__).parameters
            log.info("trainer.nonfinite=%s with %s (not fused): its flag is read at every step (one device->host "
                     "sync per step)%s", self.mode, type(self.opt).__name__,
                     "; built with fused=True it would skip bad steps on the device instead" if fusable else "")

    def before_step(self, loss: torch.Tensor, norm: Optional[torch.Tensor], step: int) -> bool:
        """Record step `step`'s flag; False when it must not step (known now: only without fused)."""
        if self.on_device is None:
            self._decide()
        if self.pending == 0:
            self.first = step
        slot = step - self.first
        flag = self.flags[slot]  # a 0-dim view, as the kernels want it; zero since the last read
        if norm is not None or self.strategy == "fsdp":  # the global norm: the same on every rank
            norm = norm if norm is not None else S.grad_norm(self.params, 0.0)
            flag.copy_(torch.logical_not(torch.isfinite(norm)))
        else:  # the gradients are all-reduced: each rank finds the same (one fused kernel, no norm)
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, torch.ones(1, device=flag.device))
        self.losses[slot].copy_(loss.detach().float())
        self.pending += 1
        if self.on_device:
            self.opt.found_inf = flag  # type: ignore[attr-defined]  # the fused kernel skips when 1
            return True
        return not self.read()

    def after_step(self, step: int) -> None:
        if self.on_device and self.pending == self.every:
            self.read()

    def read(self) -> bool:
        """Look at the steps recorded since the last read (one sync; every rank at the same step):
        raises for trainer.nonfinite=error; counts and logs skipped steps. True if any was bad."""
        if self.pending == 0:
            return False
        flags = self.flags[:self.pending].tolist()
        losses = self.losses[:self.pending].tolist()
        first, self.pending = self.first, 0
        self.flags.zero_()
        bad = [i for i, f in enumerate(flags) if f]
        for i in bad:
            self._report(first + i, losses[i])
        return bool(bad)

    def _report(self, step: int, loss: float) -> None:
        """Name the step and the rank(s) whose loss went bad (a collective: every rank is here)."""
        losses = all_gather_object(loss)
        ranks = [r for r, v in enumerate(losses) if not math.isfinite(v)]
        where = f"rank(s) {ranks} (loss {[losses[r] for r in ranks]})" if ranks else \
            "every rank's loss is finite, not every gradient"
        msg = f"non-finite loss or gradient norm at step {step}: {where}"
        if self.mode == "error":
            raise FloatingPointError(f"{msg}; the optimizer did not step (trainer.nonfinite=skip skips such "
                                     "steps)")
        self.skipped += 1
        log.warning("%s; step skipped (%d so far)", msg, self.skipped)
