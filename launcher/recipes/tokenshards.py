"""A small language model trained on memory-mapped token shards: data that need not fit in memory,
read lazily by loader workers (issue 25, item 5).

    python -m launcher.recipes.tokenshards prepare DATA_DIR [TEXT_FILE ...]   # text -> shards
    python -m launcher recipe=tokenshards data.path=DATA_DIR trainer.gpus=0 trainer.nproc=2

Shards are raw little-endian uint16 token ids, `DATA_DIR/{train,val}-NNNNN.bin`. Tokens are bytes
(a vocabulary of 256: nothing to download); uint16 leaves room for a real tokenizer's ids. Without
`data.path` the recipe writes shards of charlm's grammar text once (to $LAUNCHER_DATA or
~/.cache/launcher, as mnist's data) and reads those.

The dataset is map-style, not a stream: sample i is the i-th window of block_size + 1 tokens, found
from the shards' sizes alone, so the launcher's exact resume, resume at another world size, coverage
ledger and per-sample seeding hold as for any map-style dataset, and no epoch has to be read in file
order. A window is read from a np.memmap that each process opens on first use (a worker opens its
own: nothing of the data is pickled or copied into it), so a rank holds the pages of the windows it
read, never the files. Random windows read this way are page-cache reads: on local disk or a page
cache larger than the set's hot part they cost microseconds (docs/benchmarks.md, section 7).
"""

from __future__ import annotations

import bisect
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from . import charlm

VOCAB_SIZE = 256  # byte-level tokens
DTYPE = np.dtype("<u2")  # 2 bytes a token on disk
SHARD_TOKENS = 1 << 24  # 32 MB shards: several per rank-worker stream, each one file a memmap


class TokenWindows(Dataset):
    """(x, y) int64 windows of `block_size` tokens, y = x shifted by one, over the shard files in order.

    Windows do not cross a shard's end and do not overlap: a shard of L tokens gives (L - 1) //
    block_size of them (the last token of one window is the first target of the next)."""

    def __init__(self, files: Iterable[str | Path], block_size: int) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.files = [str(f) for f in files]
        self.block_size = block_size
        counts = [max(os.path.getsize(f) // DTYPE.itemsize - 1, 0) // block_size for f in self.files]
        self.starts = np.cumsum([0, *counts]).tolist()  # window index where each shard begins
        self._maps: Optional[list[np.memmap]] = None  # opened per process on first read (__getstate__)
        self._pid = -1

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict[str, Any]:
        # a worker started by spawn or forkserver gets the file names, never the maps or their pages
        return {**self.__dict__, "_maps": None, "_pid": -1}

    def _shards(self) -> list[np.memmap]:
        if self._maps is None or self._pid != os.getpid():
            self._maps = [np.memmap(f, dtype=DTYPE, mode="r") for f in self.files]
            self._pid = os.getpid()
        return self._maps

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        s = bisect.bisect_right(self.starts, i) - 1
        lo = (i - self.starts[s]) * self.block_size
        ids = torch.from_numpy(self._shards()[s][lo: lo + self.block_size + 1].astype(np.int64))
        return ids[:-1], ids[1:]


class _Shards:
    """Writes one split's tokens into numbered shard files of SHARD_TOKENS tokens each."""

    def __init__(self, out: Path, split: str, shard_tokens: int) -> None:
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.files: list[Path] = []
        self._f: Optional[BinaryIO] = None
        self._left = 0

    def write(self, data: bytes) -> None:
        ids = np.frombuffer(data, dtype=np.uint8).astype(DTYPE)
        while len(ids):
            if self._left == 0:
                self._open()
            take, ids = ids[: self._left], ids[self._left:]
            self._f.write(take.tobytes())  # type: ignore[union-attr]
            self._left -= len(take)

    def _open(self) -> None:
        self.close()
        path = self.out / f"{self.split}-{len(self.files):05d}.bin"
        self.files.append(path)
        # written under a temporary name and renamed: ranks that each prepare the default set race safely
        self._f = open(f"{path}.{os.getpid()}.tmp", "wb")
        self._left = self.shard_tokens

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            os.replace(self._f.name, self._f.name[: -len(f".{os.getpid()}.tmp")])
            self._f = None


def prepare(out: str | Path, texts: Iterable[str | Path], val_fraction: float = 0.1,
            shard_tokens: int = SHARD_TOKENS, chunk: int = 1 << 24) -> tuple[list[Path], list[Path]]:
    """Text files -> byte-token shards in `out`: the last `val_fraction` of all bytes (in the files'
    order) for validation, the rest for training. Reads `chunk` bytes at a time: the input need not
    fit in memory either. Returns (train files, val files)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    texts = [Path(t) for t in texts]
    total = sum(t.stat().st_size for t in texts)
    cut = total - round(total * val_fraction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = _Shards(out, "train", shard_tokens), _Shards(out, "val", shard_tokens)
    done = 0
    for t in texts:
        with open(t, "rb") as f:
            while data := f.read(chunk):
                head = data[: max(cut - done, 0)]
                train.write(head)
                val.write(data[len(head):])
                done += len(data)
    train.close()
    val.close()
    return train.files, val.files


def _default_set(n_chars: int, seed: int) -> Path:
    """charlm's grammar text as shards, written once per (n_chars, seed)."""
    out = Path(os.environ.get("LAUNCHER_DATA", "~/.cache/launcher")).expanduser() / f"tokenshards-{n_chars}-{seed}"
    if not (out / "done").exists():
        text = out / f"text.{os.getpid()}"
        out.mkdir(parents=True, exist_ok=True)
        text.write_text(charlm.corpus(n_chars, seed))
        prepare(out, [text])
        text.unlink()
        (out / "done").touch()
    return out


def datasets(path: Optional[str] = None, block_size: int = 64, n_chars: int = 1_000_000,
             seed: int = 0) -> tuple[TokenWindows, Optional[TokenWindows]]:
    """(train, val) windows over `path`'s shards (val None when it has no val-*.bin); without a path,
    charlm's grammar text of `n_chars` characters, prepared once."""
    root = Path(path).expanduser() if path else _default_set(n_chars, seed)
    train, val = sorted(root.glob("train-*.bin")), sorted(root.glob("val-*.bin"))
    if not train:
        raise ValueError(f"path={str(root)!r} holds no train-*.bin shards; write them with: python -m "
                         f"launcher.recipes.tokenshards prepare {root} TEXT_FILE...")
    return TokenWindows(train, block_size), (TokenWindows(val, block_size) if val else None)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "prepare":
        print("usage: python -m launcher.recipes.tokenshards prepare DATA_DIR [TEXT_FILE ...] "
              "(no files: charlm's grammar, 2M characters)", file=sys.stderr)
        return 2
    out, texts = Path(argv[1]), argv[2:]
    if not texts:
        out.mkdir(parents=True, exist_ok=True)
        (out / "grammar.txt").write_text(charlm.corpus(2_000_000, 0))
        texts = [str(out / "grammar.txt")]
    train, val = prepare(out, texts)
    tokens = sum(os.path.getsize(f) for f in train + val) // DTYPE.itemsize
    print(f"{len(train)} train and {len(val)} val shards, {tokens} tokens, in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
