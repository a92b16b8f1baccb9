"""Run identity and the run directory: one id per run, minted once, kept across resumes.

The parent (or rank 0 under an outside torchrun/srun) calls prepare(); ranks only read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from . import dist as D
from .checkpoint import format as F
from .config import ConfigError, UserError

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"


def new_id() -> str:
    """8 lowercase base-36 characters: unique enough per project, valid as a W&B run id."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_id(run_dir: Path) -> str:
    """The id recorded in run_dir, or "" when the directory holds no run yet."""
    try:
        return str(json.loads((run_dir / RUN_FILE).read_text())["id"])
    except (FileNotFoundError, KeyError, ValueError):
        return ""


def prepare(run_dir: Path, run_id: str, config: dict[str, Any] | None) -> str:
    """Create run_dir, keep (or mint) its run id, write run.json and the resolved config.

    Returns the run id. An explicit run_id that contradicts the directory's is an error: two runs
    would share checkpoints and one W&B run.
    """
    existing = read_id(run_dir)
    new = is_new(run_dir)
    if existing and run_id and run_id != existing:
        raise ConfigError("run.id", run_id, f"{run_dir} already belongs to run {existing!r}",
                          f"{existing!r}, or a new run.dir")
    run_id = existing or run_id or new_id()
    if config is not None:
        config = {**config, "run": {**config.get("run", {}), "id": run_id, "dir": str(run_dir)}}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not existing:
            _atomic_write(run_dir / RUN_FILE, json.dumps({"id": run_id, "created": time.time()}) + "\n")
        if config is not None:
            _atomic_write(run_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    except OSError as e:
        if new:
            with contextlib.suppress(OSError):
                discard(run_dir)
        raise ConfigError("run.dir", str(run_dir), f"cannot be written ({e.strerror or e})",
                          "a directory this user can create and write") from None
    return run_id


def is_new(run_dir: Path) -> bool:
    """Nothing is there yet (no directory, or an empty one): what a failed start writes may go."""
    return not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir()))


def discard(run_dir: Path) -> None:
    """Remove what a run that failed before its first checkpoint wrote, but its logs/ (the traceback
    the error line points to); the directory itself too when nothing else is left in it."""
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.name == "logs":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def node_local_config(config: dict[str, Any]) -> Path:
    """The resolved config in a node-local temp file (multi-node local runs: see __main__)."""
    fd, path = tempfile.mkstemp(prefix="launcher-config-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return Path(path)


def restarted() -> bool:
    """This process is a restart of its run: an elastic restart or a SLURM requeue."""
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def resume_point(run_dir: Path, resume: str) -> Optional[Path]:
    """The checkpoint a run in `run_dir` continues from under `resume` (auto, never, a path), or None.

    A restart of this run always continues from the run's own newest checkpoint: re-applying
    resume=PATH or never there would throw away what the run trained since it started.
    """
    own = F.latest(run_dir / "checkpoints")
    if resume == "auto" or (restarted() and own is not None):
        return own
    if resume == "never":
        if own is not None:
            raise ConfigError("resume", "never", f"{run_dir} already holds checkpoints of another start",
                              "auto (continue it), or a new run.dir")
        return None
    return F.resolve(resume)


def agree_on_run(d: D.Dist, run_dir: Path, run_id: str, config: dict[str, Any] | None) -> tuple[Path, str]:
    """prepare() on rank 0, its result (or its error) on every rank (ranks may differ on clocks and
    disks; an error raised on rank 0 alone would leave the others waiting in the broadcast)."""
    error = ""
    if d.is_main:
        try:
            run_id = prepare(run_dir, run_id, config)
        except ConfigError as e:
            error = str(e)
    run_dir, run_id, error = D.broadcast_object((run_dir, run_id, error))
    if error:
        raise UserError(error)
    return run_dir, run_id


def agree_on_resume_point(d: D.Dist, run_dir: Path, resume: str) -> Optional[Path]:
    """resume_point() decided by rank 0 and learnt by every rank; its error raised on every rank
    (raised on rank 0 alone, the others would wait for it in the broadcast)."""
    found: Optional[Path] = None
    error = ""
    if d.is_main:
        try:
            found = resume_point(run_dir, resume)
        except ValueError as e:  # ConfigError too
            error = str(e)
    found, error = D.broadcast_object((found, error))
    if error:
        raise UserError(error)
    return found
