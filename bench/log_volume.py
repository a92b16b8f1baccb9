"""Log volume per step row (docs/SCALE.md section 6): the bytes one W&B row adds to the offline
run-*.wandb file, and the bytes one progress-bar refresh adds to a redirected stderr (L_bar).

    python bench/log_volume.py                     # charlm, 1 CPU rank, 300 steps, a row every step
    python bench/log_volume.py --steps 600 --every 1

Runs, in a fresh run dir under runs/bench-logvol:

    python -m launcher recipe=charlm trainer.gpus=0 trainer.max_steps=STEPS trainer.log_every_n_steps=EVERY
        trainer.peak_tflops=1 'logger=[csv,wandb]' logger.wandb.mode=offline run.dir=DIR

(trainer.peak_tflops=1 only so that the row carries `mfu`, as a GPU run's does: train_loss_step,
lr, samples_per_s, tokens_per_s, mfu, the five values of section 6) with stderr a pipe (not a
terminal, as under SLURM or `2> file`), each chunk timestamped on arrival. Then:
  W&B  run-*.wandb is read as W&B's LevelDB-style log (7-byte file header; 32 KiB blocks; each
       chunk a 7-byte header: CRC32, length, type), every record decoded with wandb's own
       protobuf (wandb_internal_pb2.Record); the step rows are the history records carrying
       train_loss_step. Bytes per row = its record's bytes + 7 per chunk header (block padding
       aside); W&B also writes summary records beside each row (its values again, and _runtime):
       with those, and the file's size over the rows, all records included.
  bar  stderr is cut at each '\r' (tqdm redraws the line in place); the pieces that are the bar
       (they hold "step/s" or "s/step") are its refreshes: bytes per refresh (L_bar) and
       refreshes per second of training, so bytes per day = L_bar x refreshes/s x 86,400.
       The captured stderr is left in DIR/stderr.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCK = 32768


def wandb_records(path: Path) -> list[tuple[int, bytes]]:
    """(bytes in the file incl. chunk headers, payload) of each record of a .wandb file."""
    data = path.read_bytes()
    pos, out, cur, cur_len = 7, [], b"", 0  # file header: ":W&B", magic, version
    while pos + 7 <= len(data):
        left = BLOCK - (pos % BLOCK)
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left  # zero padding to the block's end
            continue
        cur += data[pos + 7:pos + 7 + length]
        cur_len += 7 + length
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            out.append((cur_len, cur))
            cur, cur_len = b"", 0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=1, help="trainer.log_every_n_steps")
    ap.add_argument("--dir", default=str(REPO / "runs" / "bench-logvol"))
    a = ap.parse_args()
    run_dir = Path(a.dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "launcher", "recipe=charlm", "trainer.gpus=0", f"trainer.max_steps={a.steps}",
           f"trainer.log_every_n_steps={a.every}", "trainer.peak_tflops=1", "logger=[csv,wandb]",
           "logger.wandb.mode=offline", f"run.dir={run_dir}"]
    env = {**os.environ, "WANDB_SILENT": "true"}
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    chunks: list[tuple[float, bytes]] = []
    assert p.stderr is not None
    while True:
        b = os.read(p.stderr.fileno(), 1 << 16)
        if not b:
            break
        chunks.append((time.perf_counter(), b))
    (run_dir / "stderr.txt").write_bytes(b"".join(c for _, c in chunks))  # as a redirected stderr holds it
    if p.wait():
        sys.exit(f"{' '.join(cmd)} exited with {p.returncode}:\n{b''.join(c for _, c in chunks).decode()[-3000:]}")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print("# " + " ".join(cmd[1:]))

    # ---- progress bar ----------------------------------------------------------------------
    pieces: list[tuple[float, bytes]] = []  # (arrival, '\r' + piece) of each bar redraw
    for t, c in chunks:
        for piece in re.split(rb"(?=\r)", c):
            if piece.startswith(b"\r") and (b"step/s" in piece or b"s/step" in piece):
                pieces.append((t, piece.split(b"\n")[0]))
    sizes = [len(pc) for _, pc in pieces]
    span = pieces[-1][0] - pieces[0][0] if len(pieces) > 1 else float("nan")
    per_s = (len(pieces) - 1) / span
    bar_bytes_s = sum(sizes[1:]) / span
    print(f"bar: {len(pieces)} redraws over {span:.1f} s: {per_s:.2f} per s; bytes per redraw median "
          f"{statistics.median(sizes):.0f} (min {min(sizes)}, max {max(sizes)}); {bar_bytes_s:.0f} B/s "
          f"= {bar_bytes_s * 86400 / 1e6:.1f} MB/day")
    print(f"bar: a late redraw: {pieces[-2][1]!r}")

    # ---- W&B -------------------------------------------------------------------------------
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(run_dir.rglob("run-*.wandb"))
    if not files:
        sys.exit(f"no run-*.wandb under {run_dir}")
    f = files[-1]
    recs = wandb_records(f)
    kinds: dict[str, list[int]] = {}
    rows: list[int] = []
    payload: list[int] = []
    for size, raw in recs:
        r = pb.Record()
        r.ParseFromString(raw)
        kind = r.WhichOneof("record_type") or "?"
        kinds.setdefault(kind, []).append(size)
        if kind == "history" and any(item.key == "train_loss_step" or list(item.nested_key) == ["train_loss_step"]
                                     for item in r.history.item):
            rows.append(size)
            payload.append(len(raw))
            example = r
    total = f.stat().st_size
    print(f"wandb: {f.relative_to(run_dir)}: {total:,} B, {len(recs)} records: "
          + ", ".join(f"{k} {len(v)} ({sum(v):,} B)" for k, v in sorted(kinds.items())))
    summary = sum(kinds.get("summary", []))
    print(f"wandb: {len(rows)} step rows: the history record of a row in the file median {statistics.median(rows):.0f} B "
          f"(record {statistics.median(payload):.0f} + chunk header 7; min {min(rows)}, max {max(rows)}); "
          f"with the summary records written beside each row (the row's values again, and _runtime): "
          f"{(sum(rows) + summary) / len(rows):.0f} B per row; whole file / step rows = {total / len(rows):.0f} B")
    print("wandb: a step row's items: " + ", ".join(f"{i.key or '.'.join(i.nested_key)}={i.value_json}"
                                                 for i in example.history.item))


if __name__ == "__main__":
    main()
