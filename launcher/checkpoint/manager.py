"""When checkpoints are written, which are kept, and how a run's state is saved and put back.

CheckpointManager saves and restores one dict of Stateful parts (name -> object with state_dict()
and load_state_dict()) that the trainer registers once; it knows nothing about the loop. A part
that also has dcp_state_dict() / load_dcp_state_dict() (the model and the optimizer) is written
as torch.distributed.checkpoint shards by every rank when the run is sharded (FSDP); everything
else goes into rank 0's state.pt (and model.pt). Saves are sync or async (checkpoint.async: one
in flight, its tensors staged first into host buffers reused from save to save, staging.py, so
training may change the live weights at once); either way the commit (manifest, rename, links,
retention) runs when every byte is written, so a crash mid-save leaves the previous checkpoint as
the latest complete one. The newest checkpoint's model.pt is also the run's final weights file:
publish_weights() hard-links it instead of serialising the weights a second time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Protocol

import torch

from ..device import dist as D
from ..config import CheckpointConfig
from ..device.strategy import full_weights
from . import format as F
from .held import load_sharded
from .staging import HostStage, dcp_stager

log = logging.getLogger("launcher")
Boundary = Literal["step", "epoch", "partial_epoch", "requeue", "end"]  # where the loop asks maybe_save


class Stateful(Protocol):
    """A part of the run that survives restarts. One that sets `absent_ok = True` accepts
    load_state_dict(None) from a checkpoint written before the part existed."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, sd: Any) -> None: ...


class Retention:
    """Which checkpoints stay: the keep_last newest and the save_top_k best by the monitored score.
    Owns the `last` and `best` links. Stateful: the top-k list survives restarts."""

    def __init__(self, ckpt_dir: Path, *, save_top_k: int, mode: str, keep_last: int) -> None:
        self.dir, self.save_top_k, self.mode, self.keep_last = ckpt_dir, save_top_k, mode, keep_last
        self.top: list[tuple[float, str]] = []  # (score, folder name), best first
        # (score, name) of the checkpoint being written: its top-k list as once committed (a resume ranks it right)
        self.pending: Optional[tuple[Optional[float], str]] = None

    def ranked(self, score: Optional[float], name: str) -> list[tuple[float, str]]:
        """The top-k list with `name` scored `score` (a re-save of the same name replaces it)."""
        top = [t for t in self.top if t[1] != name]
        if score is not None and self.save_top_k > 0:
            top.append((score, name))
        top.sort(key=lambda t: t[0], reverse=self.mode == "max")
        return top[: self.save_top_k]

    def committed(self, folder: Path, score: Optional[float]) -> None:
        """After `folder` is complete: the `last`/`best` links, top-k, and pruning."""
        F.replace_symlink(self.dir / "last", folder.name)
        if score is not None and self.save_top_k > 0:
            self.top = self.ranked(score, folder.name)
            if self.top[0][1] == folder.name:
                F.replace_symlink(self.dir / "best", folder.name)
        self.prune()

    def doomed(self, names: list[str]) -> list[str]:
        """Of `names` (newest first), those neither among the keep_last newest nor among the best."""
        best = {name for _, name in self.top}
        return [n for n in names[self.keep_last:] if n not in best]

    def prune(self) -> None:
        for name in self.doomed([p.name for p in F.candidates(self.dir)]):
            F.remove_tree(self.dir / name)

    @property
    def best(self) -> Optional[tuple[float, Path]]:
        return (self.top[0][0], self.dir / self.top[0][1]) if self.top else None

    def state_dict(self) -> dict[str, Any]:
        top = self.ranked(*self.pending) if self.pending is not None else self.top
        return {"top": [list(t) for t in top]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.top = [(float(s), str(n)) for s, n in sd.get("top", [])]


class CheckpointManager:
    """One run's checkpoints: the interval rules, retention, and the save / restore of `states`."""

    def __init__(self, ckpt_dir: Path, cfg: CheckpointConfig, *, mode: str, dist: D.Dist,
                 states: dict[str, Stateful], sharded: bool, info: dict[str, Any], xla: Any = None,
                 before_save: Callable[[Path], None] = lambda folder: None,
                 after_commit: Optional[Callable[[Path], None]] = None) -> None:
        self.dir, self.cfg, self.d, self.sharded, self.info, self.xla = ckpt_dir, cfg, dist, sharded, info, xla
        # the guard's read and the callbacks' on_checkpoint; after_commit: on_checkpoint_saved (settle())
        self.before_save, self.after_commit = before_save, after_commit
        self._untold: Optional[Path] = None  # the newest save after_commit has not heard of
        self.retention = Retention(ckpt_dir, save_top_k=cfg.save_top_k, mode=mode, keep_last=cfg.keep_last)
        self.states: dict[str, Stateful] = {**states, "checkpointer": self.retention}
        # XLA tensors are written through xm.save, a rendezvous of all ranks: no background thread
        self.async_save = cfg.async_save and xla is None
        self.last_saved_step = -1
        self.blocked_s = 0.0  # seconds the loop has waited in this process's saves (goodput's checkpoint stall)
        self.restored_config: Any = None
        self._thread: Optional[threading.Thread] = None
        self._future: Any = None
        self._error: Optional[BaseException] = None
        self._host = HostStage()  # rank 0's async copies: allocated at the first save, then reused
        self._stager: Any = None  # DCP's counterpart for the shards (made at the first sharded save)
        self._weights: Optional[tuple[int, Path]] = None  # (step, model.pt) of the newest commit
        self._pg: Any = None
        if sharded and self.async_save and torch.distributed.is_initialized():
            # DCP's background finish runs collectives; a gloo group of their own keeps them from
            # interleaving with the training loop's all-reduces, and async_save needs a CPU backend
            # even in a world of one on a GPU (whose default group is nccl alone).
            self._pg = torch.distributed.new_group(backend="gloo")

    # ---- when: the whole save decision ------------------------------------------------------------
    def maybe_save(self, step: int, epoch: int, at: Boundary, score: Optional[float] = None) -> float:
        """Save here if the rules say so; the loop asks after every step and at every epoch end.
        `epoch`: epochs completed. Returns the seconds training was blocked (0.0: no save).

        - "step", a step inside an epoch: every_n_steps (an epoch's last step is decided at "epoch");
        - "epoch", an epoch just completed: every_n_epochs, or every_n_steps if this step is one;
        - "partial_epoch", the run ends inside an epoch (max_steps): always, at that exact position,
          so a run continued with a larger limit finishes the very epoch bitwise;
        - "requeue", a stop for a requeue: always, even with checkpoints off (the next attempt
          needs it), unless this step is saved already;
        - "end", the run's end: a last checkpoint unless this step is saved already.
        """
        c = self.cfg
        on_step = c.every_n_steps > 0 and step % c.every_n_steps == 0
        if at == "step":
            due = c.enabled and on_step
        elif at == "epoch":
            due = c.enabled and ((c.every_n_epochs > 0 and epoch % c.every_n_epochs == 0) or on_step)
        elif at == "partial_epoch":
            due = c.enabled
        elif at == "requeue":
            due = self.last_saved_step != step
        else:
            due = c.enabled and self.last_saved_step != step
        if not due:
            return 0.0
        started, before = time.perf_counter(), self.blocked_s
        if self.after_commit is not None:
            self.settle()  # (an async save in flight: durable, and heard of, before the next one begins)
        self.before_save(self.dir / F.step_name(step))
        self.save(step, epoch, score)
        if self.after_commit is not None and not self.async_save:
            self.settle()
        blocked = time.perf_counter() - started
        self.blocked_s = before + blocked  # (its wait() for the previous save counted once, here)
        return blocked

    @property
    def best(self) -> Optional[tuple[float, Path]]:
        return self.retention.best

    def clean(self) -> None:
        """Rank 0, before the resume point is chosen: finish or remove what interrupted saves left."""
        if self.d.is_main:
            F.clean_temp(self.dir)

    def retire_after(self, step: int) -> None:
        """Rank 0, once training continues from `step`: newer checkpoints are another timeline."""
        self._untold = self._untold if self._untold is None or F.step_of(self._untold) <= step else None
        if self.d.is_main:
            F.retire_after(self.dir, step)

    # ---- save ------------------------------------------------------------------------------------
    def save(self, step: int, epoch: int, score: Optional[float]) -> None:
        """A checkpoint of every registered part at `step` (a collective: every rank calls it)."""
        started = time.perf_counter()
        previous = self.last_saved_step if self._busy() else -1  # a save in flight is the last one made
        self.wait()  # the previous save's commit updates the top-k list this one records (and frees the buffers)
        if previous >= 0:
            # a checkpoint interval shorter than a write: part of what this save blocks (rank log only,
            # like the line below that says how long in all)
            log.info("checkpoint at step %d waited %.3f s for the save of step %d still being written", step,
                     time.perf_counter() - started, previous, extra={"file_only": True})
        folder = self.dir / F.step_name(step)
        writes = self.d.is_main or self.xla is not None  # xm.save is called by every rank (the master writes)
        state: dict[str, Any] = {}
        shards: dict[str, Any] = {}
        self.retention.pending = (score, folder.name)
        try:
            for name, part in self.states.items():
                if self.sharded and hasattr(part, "dcp_state_dict"):
                    shards[name] = part.dcp_state_dict()  # type: ignore[attr-defined]
                else:
                    sd = part.state_dict()  # on every rank: some parts gather from all ranks
                    if writes:
                        state[name] = sd
        finally:
            self.retention.pending = None
        state.update(self.info)
        meta = {"step": step, "epoch": epoch, "run_id": self.info.get("run_id", ""),
                "world_size": self.d.world_size, "sharded": self.sharded}
        self._write(folder, state, meta, score, shards, started)
        self.last_saved_step, self._untold = step, folder
        log.info("checkpoint at step %d: training blocked %.3f s", step, time.perf_counter() - started,
                 extra={"file_only": True})

    def _write(self, folder: Path, state: dict[str, Any], meta: dict[str, Any], score: Optional[float],
               shards: dict[str, Any], started: float) -> None:
        tmp = F.staging(folder)
        if self.d.is_main:
            F.begin(folder)
        if self.sharded:
            import torch.distributed.checkpoint as dcp  # FSDP runs only: a second of import otherwise

            D.barrier()  # the staging folder exists before any rank writes into it
            if self.async_save:
                self._future = self._dcp_async_save(dcp, shards, str(tmp / F.SHARDED))
            else:
                dcp.save(shards, checkpoint_id=str(tmp / F.SHARDED))
        if self.xla is not None:
            D.barrier()  # rank 0 created the staging folder
            self.xla.save(state, str(tmp / F.STATE))  # every rank; the master writes
            if self.d.is_main:
                self.retention.committed(F.commit(tmp, folder, meta), score)
            return
        if not self.d.is_main:
            return
        if not self.async_save:
            self._finish(tmp, folder, state, meta, score, started)
            return
        self._thread = threading.Thread(target=self._finish_in_background,
                                        args=(tmp, folder, self._host.stage(state), meta, score, started),
                                        name=f"checkpoint-{folder.name}", daemon=True)
        self._thread.start()

    def _dcp_async_save(self, dcp: Any, shards: dict[str, Any], checkpoint_id: str) -> Any:
        """dcp.async_save through one stager kept for the whole run (its host storages reused)
        where this torch has one; its plain async_save (fresh host copies) otherwise."""
        if self._stager is None:
            self._stager = dcp_stager(on_gpu=self.d.device.type == "cuda") or False
        extra = {"async_stager": self._stager} if self._stager else {}
        saved = dcp.async_save(shards, checkpoint_id=checkpoint_id, process_group=self._pg, **extra)
        return getattr(saved, "upload_completion", saved)  # an AsyncSaveResponse where staging is async

    def _finish(self, tmp: Path, folder: Path, state: dict[str, Any], meta: dict[str, Any],
                score: Optional[float], started: float) -> None:
        try:
            if self._future is not None:
                self._future.result()  # rank 0's future ends after every rank's shard and the metadata
                self._future = None
            F.write_state(tmp, state)
            done = F.commit(tmp, folder, meta)
        except BaseException:
            F.remove_tree(tmp)  # nothing half-written stays (a full disk gets its space back)
            raise
        self._weights = (int(meta["step"]), done / F.WEIGHTS)
        self.retention.committed(done, score)
        log.info("checkpoint %s committed %.3f s after the save began", folder.name, time.perf_counter() - started,
                 extra={"file_only": True})

    def _finish_in_background(self, *args: Any) -> None:
        try:
            self._host.ready()  # the copies queued on the GPU have landed in the host buffers
            self._finish(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._error = e

    def _busy(self) -> bool:
        return ((self._thread is not None and self._thread.is_alive())
                or (self._future is not None and not self._future.done()))

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise what it failed with."""
        if self._thread is not None:
            started = time.perf_counter()
            self._thread.join()
            self._thread, self.blocked_s = None, self.blocked_s + time.perf_counter() - started
        if self._future is not None:  # ranks > 0 of a sharded async save
            self._future.result()
            self._future = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"background checkpoint save failed: {error}") from error

    def settle(self) -> None:
        """wait() for the save in flight; then tell after_commit of the newest save it has not heard of, on every
        rank after a barrier: rank 0 (which commits) is through, so the folder is complete wherever it is read."""
        self.wait()
        if self.after_commit is not None and self._untold is not None:
            D.barrier()
            folder, self._untold = self._untold, None
            self.after_commit(folder)

    def close(self) -> None:
        """Give back the host buffers of async saves (pinned memory is scarce); call after wait()."""
        self._host = HostStage()
        if self._stager:
            self._stager.close()
        self._stager = None

    def publish_weights(self, dest: Path) -> bool:
        """Make `dest` (the run's model.pt) the newest save's weights file by a hard link: no second serialisation,
        and pruning that checkpoint later leaves `dest` whole (the data stays while a link does). Atomic: `dest`
        is the old file or the new one, never missing or partial. False, with nothing changed, where there is no
        such file: this rank wrote no checkpoint, the newest is sharded or from before format 2, or links do
        not work there (another filesystem); the caller then saves the weights itself. Call after wait()."""
        if self._weights is None or self._weights[0] != self.last_saved_step or not self._weights[1].is_file():
            return False
        tmp = dest.with_name(f".{dest.name}.link{os.getpid()}")
        try:
            tmp.unlink(missing_ok=True)
            os.link(self._weights[1], tmp)
            os.replace(tmp, dest)
        except OSError as e:  # EXDEV, EPERM, ENOTSUP...: the caller's own save is the fallback
            tmp.unlink(missing_ok=True)
            log.info("model.pt: no hard link to %s (%s); saving it instead", self._weights[1], e)
            return False
        F.fsync_dir(dest.parent)
        return True

    def final_weights(self, dest: Path, model: Any, trained: bool) -> None:
        """The run's model.pt, at its end (every rank calls it: under FSDP gathering is a collective).
        The last checkpoint's model.pt holds these very weights: a hard link, no second serialisation;
        else (sharded, checkpoints off, another filesystem) the bare model's full weights, written
        atomically. A finished run asked again (nothing trained) keeps the model.pt it has."""
        if (trained or not dest.exists()) and self.publish_weights(dest):
            return
        weights = full_weights(model, self.sharded, self.d.is_main)
        if weights is not None and (trained or not dest.exists()):
            F.save_atomic(weights, dest)  # a kill mid-write must not leave half of it

    # ---- restore ---------------------------------------------------------------------------------
    def restore(self, folder: Path) -> None:
        """Put every registered part back from `folder` (every rank reads it; rank 0 chose and verified
        it). A sharded checkpoint loads at any world size, sharded run or not."""
        sd = F.load(folder, verified=True)
        self.restored_config = sd.get("config")  # what that segment of the run ran with
        shards: dict[str, Any] = {}
        if F.is_sharded(folder):  # DCP fills the templates with each rank's part, whatever wrote them
            shards = load_sharded(self.states, str(folder / F.SHARDED))
        for name, part in self.states.items():
            if name in shards:
                part.load_dcp_state_dict(shards[name])  # type: ignore[attr-defined]
            elif name in sd:
                part.load_state_dict(sd[name])
            elif getattr(part, "absent_ok", False):  # a part added after the checkpoint was written
                part.load_state_dict(None)
            else:
                raise ValueError(f"{folder / F.STATE}: holds no {name!r} state; valid: a checkpoint written "
                                 "by this launcher for this kind of run")
        self.last_saved_step = int(F.read_manifest(folder)["step"])
