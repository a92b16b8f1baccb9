"""Batches as nests of tensors: dicts (any Mapping), tuples (named too), lists and dataclasses.

What the launcher does to a batch whatever its shape: move it to the device, measure its size (the
first tensor's first dimension), and map a function over its tensors (the step's input preparation:
launcher/fit/steps.py). What a batch *means* (which part is the input, which the target) is the step's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`fn` applied to every tensor of a nest of dicts, tuples (named too), lists and dataclasses."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):  # dict, OrderedDict, a UserDict such as transformers' BatchEncoding
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple: rebuilt by field
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: map_tensors(getattr(batch, f.name), fn)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def first_tensor(batch: Any) -> Optional[torch.Tensor]:
    """The first tensor of a nest, depth first (dicts in key order): what measures its batch size."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        items: Any = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        items = (getattr(batch, f.name) for f in dataclasses.fields(batch))
    else:
        return None
    for v in items:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor on `device` (non-blocking: pinned host memory copies asynchronously)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True) if t.device != device else t)


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: its first tensor's first dimension (0 for a batch with no tensor)."""
    t = first_tensor(batch)
    return 0 if t is None else (t.shape[0] if t.dim() else 1)
