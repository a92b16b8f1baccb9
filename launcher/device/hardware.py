"""What the device in front of this rank can do fast, detected at run time, and the defaults that
follow: trainer.precision=auto and trainer.channels_last=auto resolve here, per rank, on the
device it trains on (never on the machine the code was written on).

- precision: bf16-mixed where bf16 matrix math is native (a CUDA GPU that supports bf16; a CPU with
  AMX or AVX512-BF16 units), else 32. Where bf16 is emulated (AVX2-only CPUs, pre-Ampere GPUs)
  autocast costs more than it saves: measured 2.4-3x slower than fp32 on an AVX2-only EPYC.
- channels_last: on for CUDA with mixed precision (tensor cores want NHWC) and on CPUs (oneDNN's
  NHWC convolutions; the mnist CNN in fp32, 1 rank: +36% on a 2-core AMX Xeon, +42% on a 2-core
  AVX2-only EPYC; one report from another AVX2 EPYC saw -19%, so `trainer.channels_last=false` is
  worth a try there). It only means something for 4-D (image) inputs, so it is off, and said to be
  off, for a model whose inputs are not 4-D (an MLP, a GPT's token ids, a linear model).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from ..config import PrecisionName


def cpu_threads(local_ranks: int) -> int:
    """Threads for one CPU rank: the CPUs this process may run on (taskset, a cgroup cpuset, SLURM's
    binding; os.cpu_count() counts the whole machine), shared by the ranks on this node that were
    given the same set; SLURM's --cpus-per-task when it says how many are this task's own."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        usable = os.cpu_count() or 1
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit():
        return max(1, min(usable, int(per_task)))
    return max(1, usable // max(1, local_ranks))


def cpu_features() -> dict[str, bool]:
    """The x86 features the defaults depend on, as torch's own CPU dispatch sees them."""
    cpu = torch.cpu
    probe = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported",
             "avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    # private probes (torch >= 2.5); a torch without one reports the feature absent: on 2.4, which has
    # none of them, every feature reads absent and precision=auto picks 32 on any CPU
    return {name: bool(getattr(cpu, fn, lambda: False)()) for name, fn in probe.items()}


def bf16_native(device: torch.device) -> tuple[bool, str]:
    """(does `device` do bf16 matrix math in hardware, why) for the log line."""
    if device.type == "cuda":
        try:
            ok = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.5 has no emulation to exclude
            ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        return ok, f"{name} {'supports' if ok else 'lacks'} bf16"
    if device.type == "cpu":
        f = cpu_features()
        if f["amx"] or f["avx512_bf16"]:
            return True, f"CPU has {'AMX' if f['amx'] else 'AVX512-BF16'}"
        return False, f"CPU has no AMX or AVX512-BF16 ({torch.backends.cpu.get_cpu_capability()})"
    return False, f"{device.type}: no rule, full precision"


def resolve_precision(requested: str, device: torch.device) -> tuple[PrecisionName, str]:
    """trainer.precision as it will run on `device`, and why (auto only; an explicit value stays)."""
    if requested != "auto":
        return requested, "set"  # type: ignore[return-value]
    native, why = bf16_native(device)
    return ("bf16-mixed" if native else "32"), f"auto: {why}"


def resolve_channels_last(requested: object, device: torch.device, precision: str) -> tuple[bool, str]:
    if requested != "auto":
        return bool(requested), "set"
    if device.type == "cuda":
        on = precision in ("bf16-mixed", "16-mixed")
        return on, f"auto: CUDA with {'mixed precision' if on else 'precision ' + precision}"
    if device.type == "cpu":
        return True, "auto: CPU (oneDNN NHWC convolutions)"
    return False, f"auto: {device.type}"


def channels_last_fits(x: Any, try_model: Callable[[], tuple[bool, str]], auto: bool) -> tuple[bool, str]:
    """(keep channels_last on, why not) given the first batch's inputs `x` (None where they could not be
    read): only 4-D tensors have a channels_last layout, so any other input turns it off, set or auto;
    under auto a 4-D input is also tried on the model (`try_model`: a `.view()` of a conv output fails)."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 4):
        what = f"{x.dim()}-D" if isinstance(x, torch.Tensor) else type(x).__name__
        return False, f"{'auto' if auto else 'set, but not applied'}: the model's inputs are {what}, not 4-D images"
    return try_model() if auto else (True, "")
