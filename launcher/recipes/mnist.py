"""MNIST recipe: the digit-classifier CNN and a dependency-free dataset loader.

torchvision is not available to the launcher, so this module reads the four
original IDX files itself (gzipped or raw), and can fetch them from public
mirrors. Downloads are verified by MD5 and serialised per machine with a file
lock, so every rank of a job can call :func:`datasets` at the same time and
exactly one of them downloads while the others wait and then read the files.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import http.client
import math
import os
import shutil
import struct
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = [
    "FILES",
    "MIRRORS",
    "MIRROR_ENV",
    "ChecksumError",
    "Net",
    "datasets",
    "read_idx",
]

# Base URLs tried in order after $LAUNCHER_MNIST_MIRROR (if set). The original
# yann.lecun.com host is not listed: it has been unreliable / auth-walled.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MIRROR_ENV = "LAUNCHER_MNIST_MIRROR"
DOWNLOAD_TIMEOUT_S = 60.0
LOCK_NAME = ".download.lock"

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# MD5 of the published <name>.gz archives.
ARCHIVE_MD5: dict[str, str] = {
    TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
    TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
    TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
}
# MD5 of the decompressed IDX payloads. Some mirrors (and local caches) re-gzip
# the files, which changes the archive hash but not one byte of the data, so a
# payload match is accepted as well; it is the payload that training consumes.
RAW_MD5: dict[str, str] = {
    TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}

# IDX type codes; multi-byte values are stored big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_ERRORS = (OSError, EOFError, zlib.error)  # BadGzipFile is an OSError


class ChecksumError(ValueError):
    """A downloaded archive's MD5 matched neither the archive nor the payload hash."""


class _DownloadFailed(Exception):
    """Every mirror failed for a non-checksum reason; args[0] is a one-line summary."""


class Net(nn.Module):
    """Small CNN for 1x28x28 digits; returns N x 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=5),
            nn.MaxPool2d(2, 2),
            nn.Dropout2d(p=0.1),
            nn.AdaptiveMaxPool2d((1, 1)),
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file (gzipped or raw) into a tensor of the header's shape.

    Compression is detected from the content rather than the suffix, so a
    misnamed file still loads. Raises ValueError naming the file if it is not
    IDX, uses an unknown type code, or holds a different number of data bytes
    than its header promises (the usual sign of an interrupted copy).
    """
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except _GZIP_ERRORS as err:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({err})") from err

    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (first bytes {data[:4].hex()!r}, expected 0000<type><ndim>)"
        )
    type_code, ndim = data[2], data[3]
    dtype = _IDX_DTYPES.get(type_code)
    if dtype is None:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02X} (known: {known})")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header ({len(data)} bytes, need {header_len} for {ndim} dims)"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    count = math.prod(shape)
    expected = count * dtype.itemsize
    got = len(data) - header_len
    if got != expected:
        what = "truncated" if got < expected else "trailing bytes"
        raise ValueError(
            f"{path}: IDX header says shape {tuple(shape)} of {dtype.name} = {expected} data bytes "
            f"but the file has {got} ({what})"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header_len).reshape(shape)
    # One copy both converts to native byte order (torch has no big-endian
    # tensors) and makes the array writable (frombuffer over bytes is read-only,
    # which torch.from_numpy warns about).
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


def datasets(
    root: str | os.PathLike[str], download: bool = True, train_limit: int = 0, val_limit: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Return (train, val) MNIST datasets; val is the official 10k test set.

    Images are float32 N x 1 x 28 x 28 in [0, 1], labels int64. ``root`` may
    contain ``~`` and ``$VARS``. Missing files are downloaded into ``root`` when
    ``download`` is true; otherwise (or if that fails) FileNotFoundError is
    raised with a one-line message naming ``data.root``. ``train_limit`` / ``val_limit`` > 0 keep
    only the first N samples of a split (quick experiments and tests on the real data).
    """
    root_path = Path(os.path.expanduser(os.path.expandvars(os.fspath(root)))).absolute()
    paths = _ensure_files(root_path, download)
    train = _load_split(paths[TRAIN_IMAGES], paths[TRAIN_LABELS])
    val = _load_split(paths[TEST_IMAGES], paths[TEST_LABELS])
    return _head(train, train_limit), _head(val, val_limit)


def _head(ds: TensorDataset, limit: int) -> TensorDataset:
    if limit < 0:
        raise ValueError(f"data limit={limit!r}: must be >= 0 (0 = the whole split)")
    return TensorDataset(*(t[:limit] for t in ds.tensors)) if limit else ds


def _load_split(images_path: Path, labels_path: Path) -> TensorDataset:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(
            f"{images_path}: expected uint8 N x 28 x 28 images, got {images.dtype} {tuple(images.shape)}"
        )
    if labels.dtype != torch.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{labels_path}: expected uint8 labels of shape (N,), got {labels.dtype} {tuple(labels.shape)}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    if labels.numel() and int(labels.max()) > 9:
        raise ValueError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    # Same arithmetic as torchvision's ToTensor (convert, then divide by 255),
    # so pixels are bit-identical to a torchvision pipeline's.
    x = images.unsqueeze(1).to(torch.float32).div_(255)
    return TensorDataset(x, labels.to(torch.int64))


def _find(root: Path, name: str) -> Path | None:
    # Raw first: it skips decompression, and a user who gunzipped on purpose
    # most likely wants those files used.
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(root: Path) -> list[str]:
    return [name for name in FILES if _find(root, name) is None]


def _not_found(root: Path, reason: str) -> FileNotFoundError:
    missing = ", ".join(f"{name}[.gz]" for name in _missing(root))
    return FileNotFoundError(
        f"MNIST not found under data.root={str(root)!r} (missing {missing}) and download failed "
        f"({reason}); put the four IDX files there or set data.root=<dir that has them>"
    )


def _ensure_files(root: Path, download: bool) -> dict[str, Path]:
    if _missing(root):
        if not download:
            raise _not_found(root, "not attempted: download=False")
        created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _not_found(root, f"cannot create the directory: {err}") from None
        try:
            with _exclusive_lock(root / LOCK_NAME):
                # Re-check under the lock: ranks that waited find the files the
                # first rank fetched and download nothing.
                for name in _missing(root):
                    _download(name, root)
        except (_DownloadFailed, OSError) as err:  # OSError: e.g. the lock file cannot be created
            if created:
                _remove_empty(root)
            reason = str(err) if isinstance(err, _DownloadFailed) else f"{type(err).__name__}: {err}"
            raise _not_found(root, reason) from None
    found = {name: _find(root, name) for name in FILES}
    return {name: path for name, path in found.items() if path is not None}


def _remove_empty(root: Path) -> None:
    """A failed download leaves nothing in a directory it created: not even the lock file (a
    process still waiting on it then finds the download failed too, and tries on its own)."""
    if all(p.name == LOCK_NAME for p in root.iterdir()):
        (root / LOCK_NAME).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            root.rmdir()


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    # The lock file is not deleted after a download: unlinking it while another
    # process waits on the old inode would let a third process lock a fresh one
    # concurrently. Only a failed download in a directory it created removes it
    # (_remove_empty): the waiters then fail or retry on their own, nothing is lost.
    # flock is per machine (and unreliable on some network filesystems), which
    # matches "one downloader per machine".
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _mirrors() -> list[str]:
    env = os.environ.get(MIRROR_ENV, "").strip()
    bases = ([env] if env else []) + [m for m in MIRRORS if m != env]
    return [base if base.endswith("/") else base + "/" for base in bases]


def _download(name: str, root: Path) -> None:
    """Fetch <name>.gz into root from the first mirror that serves a verified copy."""
    failures: list[str] = []
    checksum_error: ChecksumError | None = None
    for base in _mirrors():
        url = f"{base}{name}.gz"
        try:
            tmp = _fetch(url, root, name)
        except ChecksumError as err:
            # A bad mirror should not block a good one, so keep trying; but if
            # none succeeds, the checksum failure is the error worth reporting.
            checksum_error = checksum_error or err
            failures.append(str(err))
            continue
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, short reads
            failures.append(f"{url}: {err}")
            continue
        os.replace(tmp, root / f"{name}.gz")
        return
    if checksum_error is not None:
        raise checksum_error
    raise _DownloadFailed(
        "; ".join(f.replace("\n", " ") for f in failures) or f"no mirrors configured (set {MIRROR_ENV})"
    )


def _fetch(url: str, root: Path, name: str) -> Path:
    """Download url to a verified temp file in root; the temp file is gone on any failure."""
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=f".{name}.gz.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                shutil.copyfileobj(resp, out, 1 << 20)
        _verify(tmp, name, url)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _verify(path: Path, name: str, url: str) -> None:
    blob = path.read_bytes()
    got = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    if got == ARCHIVE_MD5[name]:
        return
    try:
        payload = hashlib.md5(gzip.decompress(blob), usedforsecurity=False).hexdigest()
    except _GZIP_ERRORS as err:
        payload = f"<not valid gzip: {err}>"
    if payload == RAW_MD5[name]:
        return
    raise ChecksumError(
        f"{name}.gz from {url}: md5 mismatch: expected {ARCHIVE_MD5[name]} "
        f"(or {RAW_MD5[name]} decompressed), got {got} (decompressed: {payload})"
    )
