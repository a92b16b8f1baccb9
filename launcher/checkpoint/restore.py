"""Continuing a run: put back the newest checkpoint that loads, falling back past those that do not.

A checkpoint can be complete on disk (its manifest matches) and still not load: a pickle the
weights-only loader refuses (hostile, or written by an incompatible torch), a model or optimizer
whose shapes no longer match, a part missing. Each such checkpoint is named in one warning with
the reason and the previous complete one is tried, as for a damaged one (format.latest); when none
is left, or an explicit resume=PATH does not load: one line, exit 2. Every rank restores; they
agree on the outcome, so all of them move on to the same fallback together.
"""

from __future__ import annotations

import logging
import pickle
import sys
from pathlib import Path
from typing import Callable, Optional

from ..device import dist as D
from . import format as F
from .manager import CheckpointManager
from ..config import UserError

log = logging.getLogger("launcher")


def _load_error_types() -> tuple[type[BaseException], ...]:
    """What a checkpoint that does not fit raises: torch's load_state_dict (RuntimeError, KeyError,
    ValueError, TypeError, IndexError), unpickling, a missing shard file, and DCP's own exception
    (a BaseException: imported only when torch.distributed.checkpoint is already loaded)."""
    kinds: list[type[BaseException]] = [ValueError, RuntimeError, KeyError, TypeError, IndexError, AttributeError,
                                        pickle.UnpicklingError, EOFError, OSError]
    dcp_api = sys.modules.get("torch.distributed.checkpoint.api")
    if dcp_api is not None:
        kinds.append(dcp_api.CheckpointException)
    return tuple(kinds)


def _problem(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = "; ".join(lines) or type(e).__name__
    if not isinstance(e, ValueError) or "cannot be loaded" not in text:  # format.load's lines are complete
        text = f"{type(e).__name__}: {text}"
    return text if len(text) <= 400 else text[:397] + "..."


def _try(ckpt: CheckpointManager, folder: Path) -> str:
    """Restore `folder` into every registered part on this rank; "" or why it failed (one line)."""
    try:
        ckpt.restore(folder)
    except _load_error_types() as e:
        log.warning("restoring %s failed", folder, exc_info=True, extra={"file_only": True})
        return _problem(e)
    return ""


def _agreed(d: D.Dist, problem: str) -> str:
    """The first rank's problem, on every rank ("" when every rank restored)."""
    if not d.distributed:
        return problem
    return next((p for p in D.all_gather_object(problem) if p), "")


def restore(ckpt: CheckpointManager, d: D.Dist, choose: Callable[[Optional[int]], Optional[Path]], resume: str,
            restarted: bool) -> Optional[Path]:
    """The checkpoint the run continues from, restored; None when it starts fresh. `choose(below)`:
    the run dir's resume point (older than step `below`), the same on every rank; `restarted`: this
    process is a restart of its run (then every fallback is tried whatever `resume` says)."""
    ckpt.clean()  # before choosing: a same-step swap cut short is put back first
    below: Optional[int] = None
    failed: Optional[tuple[Path, str]] = None
    while True:
        folder = choose(below)
        if folder is None:
            if failed is None:
                return None
            where, problem = failed
            fallback = "; no earlier complete checkpoint is left" if below is not None and resume == "auto" else ""
            raise UserError(f"cannot resume from {where}: {problem}{fallback}; valid: a checkpoint this run's "
                            "model and optimizer can load (the same recipe), or a new run.dir")
        problem = _agreed(d, _try(ckpt, folder))
        if not problem:
            return folder
        if resume == "auto" or restarted:  # (said once: by rank 0 on the console, by all in their logs)
            log.warning("cannot resume from %s: %s; trying the previous complete checkpoint", folder, problem,
                        extra={"file_only": not d.is_main})
        manifest = F.read_manifest(folder)  # (a resume=PATH folder may be a `best` link: no step in its name)
        failed, below = (folder, problem), int(manifest["step"]) if "step" in manifest else F.step_of(folder)
