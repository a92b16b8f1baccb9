"""R_hash of docs/SCALE.md section 3.1: rank 0's single-threaded sha256 over a checkpoint, the
smaller of the hash's own rate and one client's read rate of the filesystem.

    python bench/hash_read.py                       # 1 GiB, 5 rounds, file in runs/bench-hash
    python bench/hash_read.py --dir /shared/fs --gib 4

Three figures, medians of the rounds:
  sha256 in memory  hashlib.sha256 over 1 GiB of zero bytes already in memory (docs/SCALE.md's
                    one-line command, repeated)
  read              a file of that size written and fsynced in --dir, then read in 4 MiB chunks
                    (os.posix_fadvise DONTNEED first, asking the kernel to drop it from the page
                    cache; a sandbox or a network FS may ignore that, so this can be a cached read)
  read + sha256     launcher/checkpoint/format.py `_sha256` on the same file: what `commit` and
                    `verify` do per file
  K shards          the same bytes as --shards files (FSDP: one per rank), hashed as `commit` and
                    `verify` hash a checkpoint's files: `_sha256_all`, in as many threads as torch's
                    intra-op threads (at most 8)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHUNK = 1 << 22


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(REPO / "runs" / "bench-hash"))
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shards", type=int, default=16)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from launcher.checkpoint.format import _sha256, _sha256_all

    size = int(a.gib * (1 << 30))
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    fs = os.popen(f"df -T {d} | tail -1").read().split()
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; dir {d} on "
          f"{fs[0] if fs else '?'} ({fs[1] if len(fs) > 1 else '?'}); {size / 1e9:.3f} GB; medians of {a.rounds} "
          f"rounds; {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    mem, read, both, sharded = [], [], [], []
    b = bytes(size)
    path = d / "blob"
    block = os.urandom(CHUNK)
    with open(path, "wb") as f:
        for _ in range(size // CHUNK):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    shards = [d / f"shard-{i}" for i in range(a.shards)]
    for shard in shards:
        with open(shard, "wb") as f:
            f.write(os.urandom(size // a.shards))
            os.fsync(f.fileno())
    threads = min(len(shards), torch.get_num_threads(), 8)
    for r in range(a.rounds):
        t = time.perf_counter()
        hashlib.sha256(b).digest()
        mem.append(size / (time.perf_counter() - t))
        _drop(path)
        t = time.perf_counter()
        with open(path, "rb") as f:
            while f.read(CHUNK):
                pass
        read.append(size / (time.perf_counter() - t))
        _drop(path)
        t = time.perf_counter()
        _sha256(path)
        both.append(size / (time.perf_counter() - t))
        for shard in shards:
            _drop(shard)
        t = time.perf_counter()
        _sha256_all(shards)
        sharded.append(size / (time.perf_counter() - t))
        print(f"#   round {r}: sha256 in memory {mem[-1] / 1e9:.3f} GB/s, read {read[-1] / 1e9:.3f} GB/s, "
              f"read + sha256 {both[-1] / 1e9:.3f} GB/s, {a.shards} shards in {threads} threads "
              f"{sharded[-1] / 1e9:.3f} GB/s", flush=True)
    path.unlink()
    for shard in shards:
        shard.unlink()
    print("| sha256 in memory (GB/s) | read, 4 MiB chunks (GB/s) | read + sha256, format._sha256 (GB/s) | "
          f"{a.shards} shards, format._sha256_all in {threads} threads (GB/s) |")
    print("|---|---|---|---|")
    print(f"| {statistics.median(mem) / 1e9:.3f} | {statistics.median(read) / 1e9:.3f} | "
          f"{statistics.median(both) / 1e9:.3f} | {statistics.median(sharded) / 1e9:.3f} |")


if __name__ == "__main__":
    main()
