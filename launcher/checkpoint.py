"""Checkpoints on disk: atomic `step-NNNNNNN/` folders, the latest + top-k, and safe loading.

A checkpoint is written into a hidden temp folder, its files fsynced, then `manifest.json` (sizes
and sha256 of every file), then the folder is renamed into place. So a folder named step-* with a
manifest whose sizes and hashes match is complete; anything else (a crash mid-save, a truncated
copy) is reported by name and passed over for the previous complete one. Loading uses
torch.load(weights_only=True): a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("launcher")
STATE = "state.pt"
MANIFEST = "manifest.json"
SHARDED = "sharded"
_NAME = re.compile(r"^step-(\d{7,})$")


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: readers see the old or the new target, never none


def staging(folder: Path) -> Path:
    """Where `folder` is written before it is committed (the same path on every rank)."""
    return folder.with_name(f".tmp-{folder.name}")


def write(folder: Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `state` as the checkpoint `folder` (e.g. run/checkpoints/step-0000100), atomically."""
    tmp = staging(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_state(tmp, state)
    return commit(tmp, folder, meta)


def write_state(tmp: Path, state: dict[str, Any]) -> None:
    with open(tmp / STATE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: Path, folder: Path, meta: dict[str, Any]) -> Path:
    """Seal a staged checkpoint: manifest (size + sha256 of every file, shards included), then rename."""
    files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"format": 1, **meta, "files": files, "written_at": time.time()}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if folder.exists():  # re-saving the same step (e.g. a final save): swap, never a moment with none
        old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, folder)
    _fsync_dir(folder.parent)
    return folder


def verify(folder: Path) -> Optional[str]:
    """None when `folder` is a complete checkpoint, else why not (one line)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"{folder}: no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError) as e:
        return f"{folder}/{MANIFEST}: unreadable ({e})"
    for name, info in manifest.get("files", {}).items():
        path = folder / name
        if not path.exists():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != info["bytes"]:
            return f"{path}: {size} bytes, the manifest says {info['bytes']} (truncated or corrupt)"
        if _sha256(path) != info["sha256"]:
            return f"{path}: sha256 differs from the manifest (corrupt)"
    return None


def candidates(ckpt_dir: Path) -> list[Path]:
    """step-* folders, newest step first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def is_sharded(folder: Path) -> bool:
    """Written under FSDP: model and optimizer as torch.distributed.checkpoint shards in sharded/."""
    return (folder / SHARDED / ".metadata").exists()


def export_model(folder: Path, out: Path) -> Path:
    """One single-file state_dict of the bare model (for inference), from any checkpoint."""
    folder = resolve(folder)
    if is_sharded(folder):
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmpdir:
            full = Path(tmpdir) / "full.pt"
            dcp_to_torch_save(folder / SHARDED, full)  # reassembles every shard, any world size
            sd = torch.load(full, weights_only=True)
        model = {k[len("model."):]: v for k, v in _flatten(sd).items() if k.startswith("model.")}
    else:
        model = load(folder)["model"]
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, out)
    return out


def _flatten(sd: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sd.items():
        if isinstance(v, dict) and not isinstance(v, torch.Tensor):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load(folder: Path, map_location: Any = "cpu", verified: bool = False) -> dict[str, Any]:
    """The state of a complete checkpoint; ValueError naming the file when it is not one.
    verified=True skips re-hashing a folder rank 0 has just checked (every rank loads it)."""
    problem = None if verified else verify(folder)
    if problem:
        raise ValueError(problem)
    try:
        return torch.load(folder / STATE, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means this file is unusable
        raise ValueError(f"{folder / STATE}: cannot be loaded ({type(e).__name__}: {e})") from None


def latest(ckpt_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint, reporting (and passing over) every broken newer one."""
    for folder in candidates(ckpt_dir):
        problem = verify(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s", problem)
    return None


def resolve(path: str | Path) -> Path:
    """A user's resume=PATH as a verified complete checkpoint folder: a step folder (or a link to
    one), its state.pt, a checkpoints/ folder, or a run directory (its latest). ValueError else."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == STATE:
        p = p.parent
    for ckpt_dir in (p, p / "checkpoints"):
        if candidates(ckpt_dir):
            found = latest(ckpt_dir)
            if found is None:
                raise ValueError(f"resume={path}: no complete checkpoint under {ckpt_dir}")
            return found
    problem = verify(p)
    if problem:
        raise ValueError(f"resume={path}: not a complete checkpoint ({problem})")
    return p


class Checkpointer:
    """Owns the interval rules, the `last`/`best` links and the top-k retention of one run."""

    def __init__(self, ckpt_dir: Path, *, enabled: bool, every_n_epochs: int, every_n_steps: int,
                 save_top_k: int, mode: str, keep_last: int = 2) -> None:
        self.dir, self.enabled = ckpt_dir, enabled
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.save_top_k, self.mode, self.keep_last = save_top_k, mode, keep_last
        self.top: list[tuple[float, str]] = []  # (score, folder name), best first
        self.last_saved_step = -1

    def due_step(self, step: int) -> bool:
        return self.enabled and self.every_n_steps > 0 and step % self.every_n_steps == 0

    def due_epoch(self, epoch: int) -> bool:
        return self.enabled and self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0

    def clean_temp(self) -> None:
        """Remove what an interrupted save left behind (rank 0, at start).

        A `.old-X` whose `X` is missing is the committed checkpoint of a same-step swap that was
        cut between its two renames: it is put back, not deleted.
        """
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            if p.name.startswith(".old-"):
                name = p.name[len(".old-"):].rsplit("-", 1)[0]
                if not (self.dir / name).exists() and verify(p) is None:
                    os.rename(p, self.dir / name)
                    continue
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)

    def retire_after(self, step: int) -> None:
        """Move this run's checkpoints newer than `step` (the point training continues from) into
        checkpoints/retired/: kept for the user, but out of `latest()` and out of pruning, which
        would otherwise rank that abandoned timeline above the checkpoints written from now on."""
        stale = [p for p in candidates(self.dir) if int(p.name.split("-")[1]) > step]
        if not stale:
            return
        target = self.dir / "retired" / time.strftime("%Y%m%d-%H%M%S")
        target.mkdir(parents=True, exist_ok=True)
        for p in stale:
            os.rename(p, target / p.name)
        log.warning("moved %d checkpoint(s) newer than step %d to %s (training continues from step %d)",
                    len(stale), step, target, step)

    def committed(self, folder: Path, score: Optional[float]) -> Path:
        """After `folder` is complete: the `last`/`best` links, top-k, and pruning."""
        _replace_symlink(self.dir / "last", folder.name)
        if score is not None and self.save_top_k > 0:
            self.top = self._ranked(score, folder.name)
            if self.top[0][1] == folder.name:
                _replace_symlink(self.dir / "best", folder.name)
        self._prune(best={name for _, name in self.top})
        return folder

    def _prune(self, best: set[str]) -> None:
        """Delete every step folder that is neither among the keep_last newest nor among the best."""
        for p in candidates(self.dir)[self.keep_last:]:
            if p.name not in best:
                shutil.rmtree(p, ignore_errors=True)

    @property
    def best(self) -> Optional[tuple[float, Path]]:
        return (self.top[0][0], self.dir / self.top[0][1]) if self.top else None

    def _ranked(self, score: Optional[float], name: str) -> list[tuple[float, str]]:
        top = [t for t in self.top if t[1] != name]
        if score is not None and self.save_top_k > 0:
            top.append((score, name))
        top.sort(key=lambda t: t[0], reverse=self.mode == "max")
        return top[: self.save_top_k]

    def state_dict(self, pending: Optional[tuple[Optional[float], str]] = None) -> dict[str, Any]:
        """The top-k list; with `pending` (the score and name of the checkpoint being written),
        as it will be once that checkpoint is committed, so the checkpoint records itself."""
        top = self._ranked(*pending) if pending is not None else self.top
        return {"top": [list(t) for t in top]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.top = [(float(s), str(n)) for s, n in sd.get("top", [])]
