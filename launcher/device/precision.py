"""trainer.precision: 32, bf16-mixed, 16-mixed (with a GradScaler), bf16-true.

Mixed precision is autocast on the device's own type (cpu, cuda, xla); the weights stay float32 and
the optimizer steps in float32. 16-mixed scales the loss (GradScaler) so small float16 gradients do
not flush to zero; the scaler's state is part of the checkpoint. bf16-true casts the model itself.
This is the one truth of the compute dtype: under FSDP, trainer.fsdp_param_dtype / fsdp_reduce_dtype
(FSDP2's MixedPrecisionPolicy, device/memory.py) may carry bf16-mixed out, never contradict it.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional

import torch


class Precision:
    absent_ok = True  # checkpoints from before 944490e have no "scaler" entry: no GradScaler state then
    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision, self.device = precision, device
        self.autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        self.scaler: Optional[Any] = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
        self.param_dtype = torch.bfloat16 if precision == "bf16-true" else None
        if device.type == "cuda" and precision != "32":
            # a run that accepts bf16/fp16 matmuls accepts TF32 for the float32 ones left outside
            # autocast (torch's default keeps them full float32, at a fraction of the tensor cores'
            # speed); trainer.precision=32 keeps them float32 as asked
            torch.set_float32_matmul_precision("high")

    def autocast(self) -> ContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.param_dtype) if self.param_dtype is not None else model

    def prepare_input(self, x: Any) -> Any:
        """bf16-true: floating inputs must match the bf16 weights."""
        if self.param_dtype is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.to(self.param_dtype)
        return x

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale before clipping or checking their norm."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skips the step itself when it finds inf/nan gradients
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> Optional[dict[str, Any]]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, sd: Optional[dict[str, Any]]) -> None:
        if self.scaler is not None and sd:
            self.scaler.load_state_dict(sd)
