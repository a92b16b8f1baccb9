"""GPU health in the trackers (issue 28 item 6): this rank's CUDA memory and, where NVML's Python binding
(pynvml, the nvidia-ml-py package) is installed, its utilisation.

Read with every per-step tracker row (trainer.log_every_n_steps): the memory figures are the caching
allocator's own counters (host-side, no device synchronisation); utilisation is NVML's "a kernel was
running" percentage over its last sample period (1/6 s to 1 s), a call of some microseconds.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

GIB = float(1 << 30)


def fields(device: Any) -> dict[str, float]:
    """gpu_mem_allocated_gib, gpu_mem_reserved_gib, gpu_mem_peak_gib (the most allocated since the process
    started), gpu_util (percent; only with pynvml); {} off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    out = {"gpu_mem_allocated_gib": torch.cuda.memory_allocated(device) / GIB,
           "gpu_mem_reserved_gib": torch.cuda.memory_reserved(device) / GIB,
           "gpu_mem_peak_gib": torch.cuda.max_memory_allocated(device) / GIB}
    if _has_nvml():
        try:
            out["gpu_util"] = float(torch.cuda.utilization(device))
        except Exception:  # noqa: BLE001 - NVML refused (no driver library in a container): no field
            pass
    return out


_NVML: list[bool] = []


def _has_nvml() -> bool:
    if not _NVML:
        _NVML.append(importlib.util.find_spec("pynvml") is not None)
    return _NVML[0]
