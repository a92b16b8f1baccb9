"""Checkpoints on disk: atomic `step-NNNNNNN/` folders, finding the latest, and safe loading.

A checkpoint is written into a hidden staging folder, its files fsynced, then `manifest.json`
(format version, sizes and sha256 of every file), then the folder is renamed into place. So a
folder named step-* with a manifest whose sizes and hashes match is complete; anything else (a
crash mid-save, a truncated copy) is reported by name and passed over for the previous complete
one. Loading uses torch.load(weights_only=True): a checkpoint cannot run code.

Layout. Format 2 (written now): model.pt holds the "model" entry, the bare model's state_dict,
the very object the run's final model.pt holds, so that file can be a hard link to the newest
checkpoint's rather than a second serialisation of the same weights (manager.publish_weights);
state.pt holds every other entry (one per registered Stateful part) plus run_id and config.
Under FSDP the model and optimizer entries are torch.distributed.checkpoint shards in sharded/
instead, and there is no model.pt; under XLA (xm.save writes one file) the model stays in
state.pt. Format 1 (every release before): the same, but the model always inside state.pt.
Both load (load() puts model.pt back as the "model" entry); every file, model.pt and the shards
included, is listed with its size and sha256 in the manifest.
This module knows files, not training: what the entries mean is the manager's callers' business.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("launcher")
STATE = "state.pt"
WEIGHTS = "model.pt"  # format 2: the state's "model" entry, in a file of its own
MODEL = "model"
MANIFEST = "manifest.json"
SHARDED = "sharded"
FORMAT = 2  # written into every manifest; a reader refuses (one line) a format it does not know
READS = (1, 2)
_NAME = re.compile(r"^step-(\d{7,})$")


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """The sha256 of each file, several files at once. Rank 0 hashes every file of a checkpoint,
    FSDP's shard of every rank included: one after another that is 69 s of a 7B save at 1.22 GB/s
    (docs/SCALE.md 3.1). hashlib and file reads release the GIL, so threads use as many cores: as
    many as this rank's own intra-op threads (its share of the node), at most 8."""
    workers = min(len(paths), max(1, torch.get_num_threads()), 8)
    if workers <= 1:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(workers, thread_name_prefix="launcher-sha256") as pool:
        return list(pool.map(_sha256, paths))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging(folder: Path) -> Path:
    """Where `folder` is written before it is committed (the same path on every rank)."""
    return folder.with_name(f".tmp-{folder.name}")


def begin(folder: Path) -> Path:
    """A fresh, empty staging folder for `folder` (whatever an earlier attempt left is removed)."""
    tmp = staging(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)  # a checkpoint holds the config (setup lines, recipe arguments)
    return tmp


def write(folder: Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `state` as the checkpoint `folder` (e.g. run/checkpoints/step-0000100), atomically."""
    tmp = begin(folder)
    write_state(tmp, state)
    return commit(tmp, folder, meta)


def write_state(tmp: Path, state: dict[str, Any]) -> None:
    """state.pt, and the "model" entry (when there is one) as model.pt beside it."""
    rest = dict(state)
    if MODEL in rest:
        _save(rest.pop(MODEL), tmp / WEIGHTS)
    _save(rest, tmp / STATE)


def _save(obj: Any, path: Path) -> None:
    """torch.save through a Python file: a full disk is then an OSError naming the file (given a
    path, torch's C++ writer says only "[enforce fail at inline_container.cc] unexpected pos")."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e


def save_atomic(obj: Any, path: Path) -> None:
    """`obj` as the file `path`, whole or not at all (a kill mid-write leaves the previous file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def commit(tmp: Path, folder: Path, meta: dict[str, Any]) -> Path:
    """Seal a staged checkpoint: manifest (size + sha256 of every file, shards included), then rename."""
    paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
    files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": digest}
             for p, digest in zip(paths, _sha256_all(paths))}
    manifest = {"format": FORMAT, **meta, "files": files, "written_at": time.time()}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if folder.exists():  # re-saving the same step (e.g. a final save): swap, never a moment with none
        old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, folder)
    fsync_dir(folder.parent)
    return folder


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def format_problem(folder: Path, manifest: dict[str, Any]) -> str:
    return (f"{folder}: checkpoint format {manifest.get('format')!r}; this launcher reads format "
            f"{', '.join(map(str, READS))} (the checkpoint was written by another launcher version)")


def verify(folder: Path) -> Optional[str]:
    """None when `folder` is a complete checkpoint, else why not (one line)."""
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError:
        return f"{folder}: no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError) as e:
        return f"{folder}/{MANIFEST}: unreadable ({e})"
    if manifest.get("format") not in READS:
        return format_problem(folder, manifest)
    files = manifest.get("files", {})
    for name, info in files.items():  # the cheap checks first, then every file hashed at once
        path = folder / name
        if not path.exists():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != info["bytes"]:
            return f"{path}: {size} bytes, the manifest says {info['bytes']} (truncated or corrupt)"
    paths = [folder / name for name in files]
    for path, info, digest in zip(paths, files.values(), _sha256_all(paths)):
        if digest != info["sha256"]:
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
    model = model_weights(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(model, out)
    return out


def model_weights(folder: Path) -> dict[str, Any]:
    """The bare model's whole state_dict from any checkpoint (export's, and --format hf's)."""
    folder = resolve(folder)
    if not is_sharded(folder):
        return load_weights(folder, verified=True)  # resolve() has just verified it
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # only export needs it

    with tempfile.TemporaryDirectory() as tmpdir:
        full = Path(tmpdir) / "full.pt"
        dcp_to_torch_save(folder / SHARDED, full)  # reassembles every shard, any world size
        sd = torch.load(full, weights_only=True)
    return {k[len("model."):]: v for k, v in _flatten(sd).items() if k.startswith("model.")}


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
    state = _torch_load(folder / STATE, map_location)
    if (folder / WEIGHTS).is_file():  # format 2: the model's entry has a file of its own
        state[MODEL] = _torch_load(folder / WEIGHTS, map_location)
    return state


def load_weights(folder: Path, map_location: Any = "cpu", verified: bool = False) -> dict[str, Any]:
    """The "model" entry of a complete unsharded checkpoint, either format (format 2 reads model.pt
    alone, not the optimizer's state beside it)."""
    if not (folder / WEIGHTS).is_file():
        return load(folder, map_location, verified)[MODEL]
    problem = None if verified else verify(folder)
    if problem:
        raise ValueError(problem)
    return _torch_load(folder / WEIGHTS, map_location)


def _torch_load(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means this file is unusable
        raise ValueError(f"{path}: cannot be loaded ({_load_problem(e)})") from None


def _load_problem(e: Exception) -> str:
    """torch.load's refusal in one line, without its advice to load with weights_only=False (that
    would run whatever code the file carries)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        # the paragraph with the advice and the link to the docs go; what it met stays
        said = [ln for ln in lines[1:] if "weights_only" not in ln and not ln.startswith(("Check the doc", "Please file"))]
        reason = (said[0].removeprefix("WeightsUnpickler error:").strip() if said else "an object it does not allow")
        return f"refused: it holds what a weights-only load does not allow ({reason.rstrip('.')})"
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def latest(ckpt_dir: Path, below: Optional[int] = None) -> Optional[Path]:
    """The newest complete checkpoint (older than step `below` if given), reporting (and passing
    over) every broken newer one."""
    for folder in candidates(ckpt_dir):
        if below is not None and step_of(folder) >= below:
            continue
        problem = verify(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s", problem)
    return None


def resolve(path: str | Path, what: str = "resume") -> Path:
    """A user's checkpoint path (`what`=PATH in messages: resume=..., or the export's argument) as a
    verified complete checkpoint folder: a step folder (or a link to one), its state.pt, a
    checkpoints/ folder, or a run directory (its latest). ValueError else."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{what}={path}: no such file or directory")
    if p.is_file() and p.name == STATE:
        p = p.parent
    for ckpt_dir in (p, p / "checkpoints"):
        if candidates(ckpt_dir):
            found = latest(ckpt_dir)
            if found is None:
                raise ValueError(f"{what}={path}: no complete checkpoint under {ckpt_dir}")
            return found
    problem = verify(p)
    if problem:
        try:
            manifest = read_manifest(p)
        except (OSError, ValueError):
            manifest = {"format": FORMAT}
        if manifest.get("format") not in READS:  # complete, but not ours to read: say so, not "damaged"
            raise ValueError(f"{what}={path}: {format_problem(p, manifest)}")
        raise ValueError(f"{what}={path}: not a complete checkpoint ({problem})")
    return p


def clean_temp(ckpt_dir: Path) -> None:
    """Remove what an interrupted save left behind (rank 0, at start).

    A `.old-X` whose `X` is missing is the committed checkpoint of a same-step swap that was
    cut between its two renames: it is put back, not deleted.
    """
    if not ckpt_dir.is_dir():
        return
    for p in ckpt_dir.iterdir():
        if p.name.startswith(".old-"):
            name = p.name[len(".old-"):].rsplit("-", 1)[0]
            if not (ckpt_dir / name).exists() and verify(p) is None:
                os.rename(p, ckpt_dir / name)
                continue
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)


def retire_after(ckpt_dir: Path, step: int) -> None:
    """Move the checkpoints newer than `step` (the point training continues from) into
    checkpoints/retired/: kept for the user, but out of `latest()` and out of pruning, which
    would otherwise rank that abandoned timeline above the checkpoints written from now on."""
    stale = [p for p in candidates(ckpt_dir) if step_of(p) > step]
    if not stale:
        return
    target = ckpt_dir / "retired" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for p in stale:
        os.rename(p, target / p.name)
    log.warning("moved %d checkpoint(s) newer than step %d to %s (training continues from step %d)",
                len(stale), step, target, step)


def replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically: readers see the old or the new target, never none."""
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
