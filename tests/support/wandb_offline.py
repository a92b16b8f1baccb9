"""Read a wandb (0.31.x) offline run directory without network or wandb-core.

wandb 0.31 has no Python-side reader any more (wandb.sdk.internal.datastore
was removed; the .wandb file is written by the Go `wandb-core` binary), so
this module parses the container format itself and decodes each record with
wandb's own protobuf class `wandb.proto.wandb_internal_pb2.Record`.

.wandb container format (LevelDB log format, verified on 0.31.0):
  file header : 7 bytes  = b":W&B" + uint16le 0xBEE1 + uint8 version (0)
  then 32 KiB blocks (the file header occupies the first 7 bytes of block 0);
  each chunk  : uint32le crc | uint16le length | uint8 type | payload
                type 1=FULL 2=FIRST 3=MIDDLE 4=LAST, crc = zlib.crc32(payload,
                seed=zlib.crc32(bytes([type]))); if < 7 bytes remain in a
                block they are zero padding.
A truncated / corrupt tail (e.g. a crashed process) ends reading silently.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

_IDENT = b":W&B"
_MAGIC = 0xBEE1
_FILE_HEADER = struct.Struct("<4sHB")  # 7 bytes
_CHUNK_HEADER = struct.Struct("<IHB")  # 7 bytes
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}


def iter_raw_records(path: Path) -> Iterator[bytes]:
    """Yield serialized Record payloads from a .wandb file."""
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        return
    ident, magic, _version = _FILE_HEADER.unpack_from(data, 0)
    if ident != _IDENT or magic != _MAGIC:
        raise ValueError(f"{path}: not a W&B transaction log")
    pos = _FILE_HEADER.size
    pending: list[bytes] | None = None
    n = len(data)
    while pos < n:
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:  # block trailer padding
            pos += left_in_block
            continue
        if pos + _CHUNK_HEADER.size > n:
            return  # truncated header
        crc, length, ctype = _CHUNK_HEADER.unpack_from(data, pos)
        if crc == 0 and length == 0 and ctype == 0:  # zero padding / preallocated
            pos += left_in_block
            continue
        start = pos + _CHUNK_HEADER.size
        end = start + length
        if end > n or length > left_in_block - _CHUNK_HEADER.size:
            return  # truncated / corrupt tail
        payload = data[start:end]
        if ctype not in _TYPE_CRC or (zlib.crc32(payload, _TYPE_CRC[ctype]) & 0xFFFFFFFF) != crc:
            return  # corrupt: stop at the last good record
        pos = end
        if ctype == _FULL:
            pending = None
            yield payload
        elif ctype == _FIRST:
            pending = [payload]
        elif ctype == _MIDDLE:
            if pending is not None:
                pending.append(payload)
        elif ctype == _LAST:
            if pending is not None:
                pending.append(payload)
                yield b"".join(pending)
            pending = None


def iter_records(path: Path):
    """Yield decoded wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in iter_raw_records(path):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - skip undecodable records
            continue
        yield rec


def _loads(s: str) -> Any:
    try:
        return json.loads(s)
    except (TypeError, ValueError):
        return s


def _set_path(d: dict, key: str, nested_key, value: Any) -> None:
    keys = list(nested_key) if nested_key else [key]
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _del_path(d: dict, key: str, nested_key) -> None:
    keys = list(nested_key) if nested_key else [key]
    for k in keys[:-1]:
        d = d.get(k)
        if not isinstance(d, dict):
            return
    d.pop(keys[-1], None)


def read_offline_run(run_dir: Path) -> dict:
    """Return {"config", "history", "summary"} (+ "run_id", "records") for
    an offline run dir such as D/wandb/offline-run-YYYYmmdd_HHMMSS-<id>/.

    config  : merged ConfigRecord updates/removes ("_wandb" internal key dropped)
    history : one dict per HistoryRecord, in file order, with "_step" and the
              logged keys (values JSON-decoded; nested keys re-nested)
    summary : merged SummaryRecord updates/removes (what run.summary[...] and
              the end-of-run summary write)
    """
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")

    config: dict = {}
    summary: dict = {}
    history: list[dict] = []
    run_id = None
    counts: dict[str, int] = {}
    for path in files:
        for rec in iter_records(path):
            kind = rec.WhichOneof("record_type")
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "run":
                run_id = rec.run.run_id or run_id
                for it in rec.run.config.update:
                    _set_path(config, it.key, it.nested_key, _loads(it.value_json))
                for it in rec.run.summary.update:
                    _set_path(summary, it.key, it.nested_key, _loads(it.value_json))
            elif kind == "config":
                for it in rec.config.update:
                    _set_path(config, it.key, it.nested_key, _loads(it.value_json))
                for it in rec.config.remove:
                    _del_path(config, it.key, it.nested_key)
            elif kind == "history":
                row: dict = {}
                if rec.history.HasField("step"):
                    row["_step"] = rec.history.step.num
                for it in rec.history.item:
                    _set_path(row, it.key, it.nested_key, _loads(it.value_json))
                history.append(row)
            elif kind == "summary":
                for it in rec.summary.update:
                    _set_path(summary, it.key, it.nested_key, _loads(it.value_json))
                for it in rec.summary.remove:
                    _del_path(summary, it.key, it.nested_key)
    config.pop("_wandb", None)
    summary.pop("_wandb", None)
    return {
        "run_id": run_id,
        "config": config,
        "history": history,
        "summary": summary,
        "records": counts,
    }


