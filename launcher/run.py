"""Run identity and the run directory: one id per run, minted once, kept across resumes.

The parent (or rank 0 under an outside torchrun/srun) calls prepare(); ranks only read.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

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
    if existing and run_id and run_id != existing:
        raise ValueError(f"run.id={run_id!r}: {run_dir} already belongs to run {existing!r}; "
                         "valid: that id, or a new run.dir")
    run_id = existing or run_id or new_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        config = {**config, "run": {**config.get("run", {}), "id": run_id, "dir": str(run_dir)}}
    if not existing:
        _atomic_write(run_dir / RUN_FILE, json.dumps({"id": run_id, "created": time.time()}) + "\n")
    if config is not None:
        import yaml

        _atomic_write(run_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    return run_id


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def node_local_config(config: dict[str, Any]) -> Path:
    """The resolved config in a node-local temp file (multi-node local runs: see __main__)."""
    import tempfile

    import yaml

    fd, path = tempfile.mkstemp(prefix="launcher-config-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return Path(path)
