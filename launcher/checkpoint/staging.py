"""Host copies of the state for async saves: buffers allocated once and refilled at every save.

An async save must hold a copy that training cannot change while a background thread writes it.
Allocating that copy afresh at every save is what made async saves stall on a GPU (a new pageable
buffer per tensor, each copy waited for): HostStage keeps one host buffer per tensor position in
the state, pinned when the tensor lives on CUDA, and refills it with non-blocking copies queued on
the stream training runs on. Training's next kernels are queued behind those copies, so they read
the state of this step; the one wait for them (a CUDA event) is the writer's, not training's.

The caller must not stage again while the previous copy is being written (the manager waits for
the save in flight first): the buffers are the previous save's data until it is committed.

Sharded (DCP) saves get the same from torch.distributed.checkpoint itself where it has it:
`dcp_stager()` is a DefaultStager that keeps its pinned storages from one save to the next.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from typing import Any, Optional

import torch

log = logging.getLogger("launcher")

# (shape, stride, dtype, pinned) of the tensor a buffer was made for: any change, a new buffer
_Signature = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, bool]


class HostStage:
    """Host buffers for one run's async saves (rank 0's state.pt and model.pt)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], tuple[_Signature, torch.Tensor]] = {}
        self._next: dict[tuple[Any, ...], tuple[_Signature, torch.Tensor]] = {}  # those of the stage() under way
        self._seen: dict[tuple[Any, ...], torch.Tensor] = {}  # tensors staged so far in it, by what they view
        self._devices: set[torch.device] = set()
        self._events: list[Any] = []
        self.allocated_bytes = 0  # every byte allocated so far: stays flat once the buffers exist
        self.staged_bytes = 0  # bytes copied by the last stage()

    def stage(self, state: Any) -> Any:
        """A copy of `state` (containers rebuilt, tensors in the reused buffers). The copies may
        still be in flight on a GPU: call ready() before reading the result."""
        self._devices = set()
        self.staged_bytes = 0
        try:
            copied = self._copy(state, ())
        finally:
            # a position no longer in the state (a part removed) gives its buffer back
            self._buffers, self._next, self._seen = self._next, {}, {}
        self._events = []
        for device in self._devices:  # one event per GPU the state lives on (one in practice)
            with torch.cuda.device(device):
                event = torch.cuda.Event()
                event.record()
                self._events.append(event)
        return copied

    def ready(self) -> None:
        """Block until the copies queued by the last stage() have landed (the writer calls this)."""
        for event in self._events:
            event.synchronize()
        self._events = []

    def buffer(self, *path: Any) -> Optional[torch.Tensor]:
        """The buffer kept for the tensor at `path` in the state (for tests and diagnostics)."""
        kept = self._buffers.get(path)
        return kept[1] if kept is not None else None

    def _copy(self, obj: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if isinstance(obj, dict):
            out = OrderedDict() if isinstance(obj, OrderedDict) else {}
            for k, v in obj.items():
                out[k] = self._copy(v, (*path, k))
            if hasattr(obj, "_metadata"):  # a module's state_dict: load_state_dict reads its versions
                out._metadata = dict(obj._metadata)  # type: ignore[union-attr]
            return out
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy(v, (*path, i)) for i, v in enumerate(obj))
        return obj  # numbers, strings, None: immutable, or built afresh by state_dict()

    def _tensor(self, t: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
        t = t.detach()
        if (t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type not in ("cpu", "cuda")
                or type(t) is not torch.Tensor):
            return t.to("cpu", copy=True)  # kinds a plain buffer cannot hold: a fresh copy, as before
        # two entries of one tensor (tied weights) keep sharing one buffer, as torch.save keeps them
        alias = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                 t.dtype, t.device)
        if t.numel() and alias in self._seen:
            return self._seen[alias]
        pinned = t.device.type == "cuda"
        sig: _Signature = (tuple(t.shape), tuple(t.stride()), t.dtype, pinned)
        kept = self._buffers.get(path)
        if kept is not None and kept[0] == sig:
            buf = kept[1]
        else:  # first save, or the tensor changed shape or dtype (a new optimizer state, a resize)
            buf = torch.empty_like(t, device="cpu", pin_memory=pinned)
            self.allocated_bytes += buf.untyped_storage().nbytes()
        # non_blocking from CUDA into pinned memory returns at once; CPU to CPU copies right away
        buf.copy_(t, non_blocking=pinned)
        if pinned:
            self._devices.add(t.device)
        self._next[path] = (sig, buf)
        self._seen[alias] = buf
        self.staged_bytes += buf.untyped_storage().nbytes()
        return buf


def dcp_stager(on_gpu: bool) -> Any:
    """A DCP stager that keeps its host storages across saves (pinned, filled by non-blocking
    copies and one synchronisation, when the shards live on a GPU), or None where this torch's
    dcp.async_save takes no stager (then it stages into fresh host memory at every save)."""
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        return None
    if "async_stager" not in inspect.signature(dcp.async_save).parameters:
        return None
    fields = set(getattr(StagingOptions, "__dataclass_fields__", {}))
    if not {"use_pinned_memory", "use_shared_memory", "use_async_staging", "use_non_blocking_copy"} <= fields:
        return None
    # Staging on training's thread and stream (use_async_staging=False): a background staging
    # thread would race the next optimizer step unless the loop waited for it before stepping.
    # No shared memory: the writer is a thread of this process, not another process.
    options = StagingOptions(use_pinned_memory=on_gpu, use_shared_memory=False, use_async_staging=False,
                             use_non_blocking_copy=on_gpu)
    try:
        return DefaultStager(options)
    except (AssertionError, RuntimeError) as e:  # no usable accelerator after all: DCP's own default
        log.warning("checkpoint: DCP staging into reused host memory unavailable (%s); staging afresh", e)
        return None
