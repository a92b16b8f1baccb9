"""Writing checkpoints: full (rank 0, state.pt) or sharded (FSDP: every rank its DCP shard), now or
in the background (checkpoint.async), always committed the same way (checkpoint.commit).

At most one save is in flight: save() first waits for the previous one. A background save stages
its tensors first (a CPU copy, or DCP's own staging), so training may change the live weights at
once; the commit (manifest, rename, links, pruning) runs when every byte is written, so a crash
mid-save leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

from . import checkpoint as ckpt
from .dist import Dist

log = logging.getLogger("launcher")


def _cpu_copy(obj: Any) -> Any:
    """A copy that training cannot change under the writer's feet."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class Saver:
    def __init__(self, checkpointer: ckpt.Checkpointer, d: Dist, *, sharded: bool, background: bool,
                 xla: Any = None) -> None:
        # XLA tensors are written through xm.save, a rendezvous of all ranks: no background thread
        self.ckpt, self.d, self.sharded, self.background = checkpointer, d, sharded, background and xla is None
        self.xla = xla
        self._thread: Optional[threading.Thread] = None
        self._future: Any = None
        self._error: Optional[BaseException] = None
        self._pg: Any = None
        if sharded and background and d.distributed:
            import torch.distributed as td

            # DCP's background finish runs collectives; a group of their own keeps them from
            # interleaving with the training loop's all-reduces.
            self._pg = td.new_group(backend="gloo")

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any], score: Optional[float],
             shards: Optional[dict[str, Any]] = None) -> None:
        """state: rank 0's full state (model/optimizer included unless sharded); shards: DCP state."""
        self.wait()
        started = time.perf_counter()
        folder = self.ckpt.dir / ckpt.step_name(step)
        tmp = ckpt.staging(folder)
        if self.d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if self.sharded:
            import torch.distributed.checkpoint as dcp

            from . import dist as D

            D.barrier()  # the staging folder exists before any rank writes into it
            if self.background:
                self._future = dcp.async_save(shards, checkpoint_id=str(tmp / ckpt.SHARDED), process_group=self._pg)
            else:
                dcp.save(shards, checkpoint_id=str(tmp / ckpt.SHARDED))
        if self.xla is not None:
            from . import dist as D

            D.barrier()  # rank 0 created the staging folder
            self.xla.save(state, str(tmp / ckpt.STATE))  # every rank; the master writes
            if self.d.is_main:
                self.ckpt.committed(ckpt.commit(tmp, folder, meta), score)
            return
        if not self.d.is_main:
            return
        if not self.background:
            self._finish(tmp, folder, state, meta, score, started)
            return
        state = _cpu_copy(state)
        self._thread = threading.Thread(target=self._finish_bg, args=(tmp, folder, state, meta, score, started),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _finish(self, tmp: Path, folder: Path, state: dict[str, Any], meta: dict[str, Any],
                score: Optional[float], started: float) -> None:
        if self._future is not None:
            self._future.result()  # rank 0's future ends after every rank's shard and the metadata
            self._future = None
        ckpt.write_state(tmp, state)
        self.ckpt.committed(ckpt.commit(tmp, folder, meta), score)
        log.info("checkpoint %s committed %.3f s after the save began", folder.name, time.perf_counter() - started,
                 extra={"file_only": True})

    def _finish_bg(self, *args: Any) -> None:
        try:
            self._finish(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise what it failed with."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._future is not None:  # ranks > 0 of a sharded background save
            self._future.result()
            self._future = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"background checkpoint save failed: {error}") from error
