"""RunDir: one object owns a run directory for a process: claiming it (lock + identity + config),
whether it was new, the resume point, and removing what a failed new run wrote.

Who claims: the launcher's parent process for the ranks it starts on one node (they inherit the
lock: lock.LOCK_ENV), rank 0 everywhere else (a SLURM job, an outside torchrun, the Python API, a
multi-node local run), once per process that owns it, and the object is passed down from there.
The claim is idempotent: a run dir the parent prepared is prepared again by its rank 0 with the
same config, which writes nothing. Only the claimer discards, and only a run dir that was new.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..checkpoint import format as F
from ..config import UserError
from ..device import dist as D
from .files import check_resume, discard, is_new, prepare, restarted, unwritable
from .lock import RunLock, held_by_parent


@dataclass
class RunDir:
    path: Path
    id: str
    config: Optional[dict[str, Any]]  # as written to config.yaml: run.id and run.dir filled in
    lock: Optional[RunLock]  # held by this process (None: the parent holds it, or another rank)
    fresh: bool  # this process claimed it and nothing was there: a failed start may remove what it wrote
    unwritable: Optional[OSError] = None  # why nothing can be written there (a finished run on a read-only fs)

    @classmethod
    def claim(cls, path: Path, requested_id: str, config: Optional[dict[str, Any]],
              before_ranks: bool = False) -> "RunDir":
        """Lock (unless the process that started this one holds the lock), mint or keep the id,
        write run.json and config.yaml (drift checked first). A refusal by the lock touches nothing;
        a new run dir that fails here is removed again. before_ranks: this process starts the run's ranks
        after it (the local launcher): an earlier run's ranks still alive there refuse it too."""
        fresh = is_new(path)
        lock = None if held_by_parent(path) else RunLock.acquire(path, before_ranks=before_ranks)
        try:
            run_id = prepare(path, requested_id, config)
        except BaseException:
            if fresh and lock is not None:
                with contextlib.suppress(OSError):
                    discard(path)
            if lock is not None:
                lock.release()
            raise
        written = None if config is None else {**config, "run": {**config.get("run", {}), "id": run_id,
                                                                  "dir": str(path)}}
        return cls(path, run_id, written, lock, fresh and lock is not None, unwritable(path))

    @classmethod
    def join(cls, d: D.Dist, path: Path, requested_id: str, config: dict[str, Any]) -> "RunDir":
        """Every rank's view of one claim made by rank 0: the same path, id and writability everywhere
        (the path too: a default run.dir is a timestamp each process of an outside torchrun takes on
        its own clock)."""
        claimed: list[RunDir] = []

        def on_rank_0() -> tuple[str, str, Optional[OSError]]:
            claimed.append(cls.claim(path, requested_id, config))
            return str(path), claimed[0].id, claimed[0].unwritable

        try:
            where, run_id, problem = _on_rank_0(d, on_rank_0)
        except BaseException:
            for run in claimed:  # the broadcast itself failed: nothing to hold the run dir for
                run.release()
            raise
        if claimed:
            return claimed[0]
        path = Path(where)
        written = {**config, "run": {**config.get("run", {}), "id": run_id, "dir": where}}
        return cls(path, run_id, written, None, False, problem)

    def release(self, keep_record: bool = False) -> None:
        """Drop the lock (keep_record: a SLURM job that requeued itself is still the owner)."""
        if self.lock is not None:
            self.lock.release(keep_record=keep_record)
            self.lock = None

    def abandon(self) -> None:
        """After a user's error: a run dir this process claimed new, with no complete checkpoint in it,
        goes back to nothing but its logs/ (the traceback the error line points to)."""
        if self.fresh and not F.candidates(self.path / "checkpoints"):
            with contextlib.suppress(OSError):  # (a read-only mount: nothing was written either)
                discard(self.path)

    def resume_point(self, d: D.Dist, resume: str, below: Optional[int] = None) -> Optional[Path]:
        """resume_point() decided by rank 0 and learnt by every rank (`below`: older than that step)."""
        return _on_rank_0(d, lambda: resume_point(self.path, resume, below))


def resume_point(run_dir: Path, resume: str, below: Optional[int] = None) -> Optional[Path]:
    """The checkpoint a run in `run_dir` continues from under `resume` (auto, never, a path), or None.
    `below`: a step whose checkpoint could not be restored; the newest complete one older than it
    (the run's own checkpoints only: an explicit resume=PATH has no fallback).

    A restart of this run always continues from the run's own newest checkpoint: re-applying
    resume=PATH or never there would throw away what the run trained since it started.
    """
    own = F.latest(run_dir / "checkpoints", below)
    if resume == "auto" or (restarted() and (own is not None or below is not None)):
        return own
    if resume == "never":
        check_resume(run_dir, resume)
        return None
    return F.resolve(resume) if below is None else None


def _on_rank_0(d: D.Dist, fn: Callable[[], Any]) -> Any:
    """fn() on rank 0, its result (or its error) on every rank: ranks may differ on clocks and
    disks, and an error raised on rank 0 alone would leave the others waiting in the broadcast.
    A user's error is raised on every rank; a bug keeps its traceback on rank 0."""
    result, error, bug = None, "", None
    if d.is_main:
        try:
            result = fn()
        except ValueError as e:  # UserError, ConfigError, format's ValueError
            error = str(e)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
            bug, error = e, f"rank 0 failed: {type(e).__name__}: {e}"
    result, error, is_bug = D.broadcast_object((result, error, bug is not None))
    if bug is not None:
        raise bug
    if error:
        raise RuntimeError(error) if is_bug else UserError(error)
    return result
