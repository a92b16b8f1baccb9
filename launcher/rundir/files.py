"""The run directory's files: its identity (run.json, one id minted once and kept across resumes),
the resolved config (config.yaml), and the two checks a start makes against them (run.id, resume),
written once here and called by the parent's checks and by the claim alike."""

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

from ..checkpoint import format as F
from ..config import ConfigError
from ..config.faults import run_dir_error
from . import drift

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"


RESULTS = ("model.pt", "metrics.csv", "plots.png")  # what a finished run's last line points to


def results(run_dir: Path) -> str:
    """Where a finished run's results are, for its last line (the user should not have to `ls runs/`):
    the run dir, relative to the working directory when inside it, and which of RESULTS it holds."""
    path, here = Path(run_dir).absolute(), Path.cwd()
    shown = path.relative_to(here) if path.is_relative_to(here) else path
    files = [f for f in RESULTS if (path / f).exists()]
    return f"{shown} ({', '.join(files)})" if files else str(shown)


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


def check_identity(run_dir: Path, run_id: str) -> str:
    """The id run_dir holds ("" when none); an explicit run.id that contradicts it is refused: two
    runs would share checkpoints and one W&B run."""
    existing = read_id(run_dir)
    if run_id and existing and run_id != existing:
        raise ConfigError("run.id", run_id, f"{run_dir} already belongs to run {existing!r}",
                          f"{existing!r}, or a new run.dir")
    return existing


def check_resume(run_dir: Path, resume: str) -> None:
    """resume=never refuses a run dir holding checkpoints; resume=PATH must name a complete checkpoint."""
    if resume == "never" and F.candidates(run_dir / "checkpoints"):
        raise ConfigError("resume", "never", f"{run_dir} already holds checkpoints of another start",
                          "auto (continue it), or a new run.dir")
    if resume not in ("auto", "never"):
        try:
            F.resolve(resume)
        except ValueError as e:
            raise ConfigError("resume", resume, str(e).split(": ", 1)[-1],
                              "auto, never, or a complete checkpoint") from None


def prepare(run_dir: Path, run_id: str, config: dict[str, Any] | None) -> str:
    """Create run_dir, keep (or mint) its run id, write run.json and the resolved config. Called
    by the run dir's owner (RunDir.claim), which discards a new run dir that fails.

    Returns the run id. An explicit run_id that contradicts the directory's is an error: two runs
    would share checkpoints and one W&B run. A run dir holding checkpoints may change only what
    drift.check allows, whatever `resume` says (resume=PATH into it too: its config.yaml must go on
    describing the checkpoints on disk); config.yaml is rewritten only when it changes (so a
    finished run on a read-only filesystem can still be asked to continue).
    """
    existing = check_identity(run_dir, run_id)
    run_id = existing or run_id or new_id()
    old = read_config(run_dir)
    if config is not None:
        config = {**config, "run": {**config.get("run", {}), "id": run_id, "dir": str(run_dir)}}
        if old is not None and F.candidates(run_dir / "checkpoints"):
            drift.check(str(run_dir), old, config)  # before anything is written
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not existing:
            _atomic_write(run_dir / RUN_FILE, json.dumps({"id": run_id, "created": time.time()}) + "\n")
        if config is not None and config != old:
            # 0600: the config holds the launcher's setup lines and whatever the recipe passes
            _atomic_write(run_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False), mode=0o600)
    except OSError as e:
        raise run_dir_error(e, run_dir) from None
    with contextlib.suppress(OSError):  # one an earlier launcher wrote 0644 (read-only fs: left as it is)
        if (run_dir / CONFIG_FILE).stat().st_mode & 0o077:
            os.chmod(run_dir / CONFIG_FILE, 0o600)
    return run_id


def read_config(run_dir: Path) -> Optional[dict[str, Any]]:
    """The run's config.yaml, or None when it has none (or one that is not a mapping)."""
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def unwritable(run_dir: Path) -> Optional[OSError]:
    """Why nothing can be written in run_dir (read-only, full, not permitted), or None."""
    probe = run_dir / f".probe-{os.getpid()}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        return e
    return None


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


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, mode)  # an earlier, more open file of that name keeps its mode otherwise
        f.write(text)
    os.replace(tmp, path)


def node_local_config(config: dict[str, Any]) -> Path:
    """The resolved config in a node-local temp file (multi-node local runs: see __main__), 0600;
    the caller removes it when its ranks are done."""
    fd, path = tempfile.mkstemp(prefix="launcher-config-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return Path(path)


def restarted() -> bool:
    """This process is a restart of its run: an elastic restart or a SLURM requeue."""
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
