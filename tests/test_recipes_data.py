"""Tests for the recipe datasets and models (launcher/recipes/mnist.py, circles.py, linreg.py).

MNIST tests use the real files in <repo>/../shared/data/mnist and are skipped
when that directory is absent. Download tests never touch the internet: they
serve a directory over a loopback HTTP server, point $LAUNCHER_MNIST_MIRROR at
it and empty the built-in mirror list.
"""

from __future__ import annotations

import collections
import functools
import gzip
import hashlib
import http.server
import multiprocessing as mp
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.recipes import circles, linreg, mnist

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"

needs_mnist = pytest.mark.skipif(  # never skipped under CI, where ../shared must be there
    not os.environ.get("CI") and not all((MNIST_DIR / f"{name}.gz").is_file() for name in mnist.FILES),
    reason=f"real MNIST .gz files not found in {MNIST_DIR}",
)

# Class counts of the official MNIST train / test sets.
TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------- helpers


class _CountingServer:
    """Loopback HTTP server over a directory that counts GETs per path."""

    def __init__(self, directory: Path, delay_s: float = 0.0) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        lock = threading.Lock()
        counts = self.counts

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                with lock:
                    counts[self.path] += 1
                if delay_s:
                    time.sleep(delay_s)  # widen the window in which a second downloader could race
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(directory))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Factory: serve(dir) starts a server and makes it the only MNIST mirror."""
    servers: list[_CountingServer] = []
    monkeypatch.setattr(mnist, "MIRRORS", ())
    # A proxy configured in the environment must not intercept loopback requests.
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    def start(directory: Path, delay_s: float = 0.0) -> _CountingServer:
        server = _CountingServer(directory, delay_s)
        servers.append(server)
        monkeypatch.setenv(mnist.MIRROR_ENV, server.url)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def real_mnist() -> tuple:
    return mnist.datasets(str(MNIST_DIR), download=False)


def _copy_mnist(dst: Path, gunzip: bool = False) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in mnist.FILES:
        src = MNIST_DIR / f"{name}.gz"
        if gunzip:
            with gzip.open(src, "rb") as fin, open(dst / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(src, dst / f"{name}.gz")
    return dst


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".part"))


def _concurrent_worker(root: str, mirror: str, barrier, results) -> None:
    # Runs in a spawned child: re-apply the test isolation the parent had.
    mnist.MIRRORS = ()
    os.environ[mnist.MIRROR_ENV] = mirror
    barrier.wait(timeout=60)  # both children are past their slow imports; now race
    try:
        train, val = mnist.datasets(root, download=True)
        results.put((len(train), len(val)))
    except BaseException as err:  # report instead of dying silently
        results.put(repr(err))


# --------------------------------------------------------------------------- MNIST: reading


@needs_mnist
def test_real_mnist_shapes_values_labels(real_mnist: tuple) -> None:
    train, val = real_mnist
    (xt, yt), (xv, yv) = train.tensors, val.tensors
    assert xt.shape == (60000, 1, 28, 28) and xv.shape == (10000, 1, 28, 28)
    assert yt.shape == (60000,) and yv.shape == (10000,)
    assert xt.dtype == xv.dtype == torch.float32
    assert yt.dtype == yv.dtype == torch.int64
    for x in (xt, xv):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(yt, minlength=10).tolist() == TRAIN_HIST
    assert torch.bincount(yv, minlength=10).tolist() == TEST_HIST
    assert int(yt[0]) == 5 and int(yv[0]) == 7
    assert len(train) == 60000 and len(val) == 10000


@needs_mnist
def test_real_mnist_pixels_match_totensor_scaling(real_mnist: tuple) -> None:
    raw = mnist.read_idx(MNIST_DIR / "train-images-idx3-ubyte.gz")
    assert raw.dtype == torch.uint8 and raw.shape == (60000, 28, 28)
    # Bit-identical to torchvision's ToTensor: float conversion then /255.
    assert torch.equal(real_mnist[0].tensors[0][:, 0], raw.float().div(255))


@needs_mnist
def test_raw_gunzipped_files_load_identically(tmp_path: Path, real_mnist: tuple) -> None:
    root = _copy_mnist(tmp_path / "raw", gunzip=True)
    train, val = mnist.datasets(root, download=False)
    assert torch.equal(train.tensors[0], real_mnist[0].tensors[0])
    assert torch.equal(val.tensors[1], real_mnist[1].tensors[1])


@needs_mnist
def test_root_expands_user_and_env_vars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MNIST_SUBDIR", "data")
    _copy_mnist(tmp_path / "data")
    train, _ = mnist.datasets("~/$MNIST_SUBDIR", download=False)
    assert len(train) == 60000


@needs_mnist
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_file_raises_value_error_naming_it(tmp_path: Path, gz: bool) -> None:
    data = gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    cut = data[:-100]
    path = tmp_path / ("t10k-labels-idx1-ubyte" + (".gz" if gz else ""))
    if gz:
        # A truncated download: the gzip stream itself is cut short.
        path.write_bytes(gzip.compress(data)[:-500])
    else:
        path.write_bytes(cut)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte") as info:
        mnist.read_idx(path)
    if not gz:
        assert "10000" in str(info.value) and "9900" in str(info.value)


@needs_mnist
def test_truncated_file_in_root_fails_datasets(tmp_path: Path) -> None:
    root = _copy_mnist(tmp_path / "m")
    blob = (root / "train-labels-idx1-ubyte.gz").read_bytes()
    (root / "train-labels-idx1-ubyte.gz").unlink()
    (root / "train-labels-idx1-ubyte").write_bytes(gzip.decompress(blob)[:-1])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*truncated"):
        mnist.datasets(root, download=False)


def test_read_idx_big_endian_types_and_bad_headers(tmp_path: Path) -> None:
    values = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
    path = tmp_path / "ints.idx"
    path.write_bytes(b"\x00\x00\x0c\x02" + struct.pack(">II", 2, 3) + values.astype(">i4").tobytes())
    out = mnist.read_idx(path)
    assert out.dtype == torch.int32 and out.tolist() == values.tolist()

    floats = np.array([1.5, -2.25], dtype=np.float32)
    gz = tmp_path / "floats.idx.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + floats.astype(">f4").tobytes()))
    assert mnist.read_idx(gz).tolist() == [1.5, -2.25]

    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 0))
    with pytest.raises(ValueError, match="bad_magic.*not an IDX"):
        mnist.read_idx(bad_magic)
    bad_type = tmp_path / "bad_type"
    bad_type.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 0))
    with pytest.raises(ValueError, match="bad_type.*0x07"):
        mnist.read_idx(bad_type)
    trailing = tmp_path / "trailing"
    trailing.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x01\x02\x03")
    with pytest.raises(ValueError, match="trailing.*2 data bytes.*has 3"):
        mnist.read_idx(trailing)


# --------------------------------------------------------------------------- MNIST: missing / download


def test_missing_without_download_names_data_root(tmp_path: Path) -> None:
    root = tmp_path / "nothing-here"
    with pytest.raises(FileNotFoundError) as info:
        mnist.datasets(root, download=False)
    msg = str(info.value)
    assert "data.root" in msg and str(root) in msg
    assert "train-images-idx3-ubyte[.gz]" in msg and "download=False" in msg
    assert "\n" not in msg
    assert not root.exists()  # download=False must not create anything


def test_all_mirrors_unreachable_gives_file_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mnist, "MIRRORS", ())
    monkeypatch.setenv(mnist.MIRROR_ENV, "http://127.0.0.1:1/")  # nothing listens on port 1
    root = tmp_path / "m"
    with pytest.raises(FileNotFoundError) as info:
        mnist.datasets(root, download=True)
    msg = str(info.value)
    assert "data.root" in msg and str(root) in msg and "127.0.0.1:1" in msg
    assert "\n" not in msg
    assert not root.exists(), "a failed download leaves nothing behind, not even its lock file"


@needs_mnist
def test_download_over_loopback(tmp_path: Path, serve) -> None:
    # The shared copies are re-gzipped (their archive md5 differs from the
    # published one), so this also covers the decompressed-payload md5 path.
    server = serve(MNIST_DIR)
    root = tmp_path / "m"
    train, val = mnist.datasets(root, download=True)
    assert len(train) == 60000 and len(val) == 10000
    for name in mnist.FILES:
        assert (root / f"{name}.gz").read_bytes() == (MNIST_DIR / f"{name}.gz").read_bytes()
        assert server.counts[f"/{name}.gz"] == 1
    assert _leftovers(root) == []
    mnist.datasets(root, download=True)  # files present now: no further requests
    assert sum(server.counts.values()) == 4


@needs_mnist
def test_corrupted_download_rejected_by_md5(tmp_path: Path, serve) -> None:
    bad_dir = _copy_mnist(tmp_path / "mirror")
    target = bad_dir / "train-labels-idx1-ubyte.gz"
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # inside the deflate stream, not the header
    target.write_bytes(bytes(blob))
    bad_md5 = hashlib.md5(bytes(blob)).hexdigest()
    serve(bad_dir)

    root = tmp_path / "m"
    with pytest.raises(mnist.ChecksumError) as info:
        mnist.datasets(root, download=True)
    msg = str(info.value)
    assert "md5" in msg and "train-labels-idx1-ubyte" in msg
    assert mnist.ARCHIVE_MD5["train-labels-idx1-ubyte"] in msg and bad_md5 in msg
    assert not (root / "train-labels-idx1-ubyte.gz").exists()
    assert not (root / "train-labels-idx1-ubyte").exists()
    assert _leftovers(root) == []


@needs_mnist
def test_archive_md5_or_payload_md5_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "t10k-labels-idx1-ubyte"
    path = tmp_path / f"{name}.gz"
    shutil.copyfile(MNIST_DIR / f"{name}.gz", path)
    actual = hashlib.md5(path.read_bytes()).hexdigest()
    mnist._verify(path, name, "test://")  # payload md5 matches the canonical one

    monkeypatch.setitem(mnist.RAW_MD5, name, "0" * 32)
    with pytest.raises(mnist.ChecksumError, match=actual):
        mnist._verify(path, name, "test://")
    monkeypatch.setitem(mnist.ARCHIVE_MD5, name, actual)
    mnist._verify(path, name, "test://")  # archive md5 alone suffices


@needs_mnist
def test_concurrent_downloads_fetch_each_file_once(tmp_path: Path, serve) -> None:
    server = serve(MNIST_DIR, delay_s=0.2)
    root = tmp_path / "shared-root"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_concurrent_worker, args=(str(root), server.url, barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert outcomes == [(60000, 10000)] * 2
    assert {path: server.counts[path] for path in server.counts} == {f"/{n}.gz": 1 for n in mnist.FILES}
    assert _leftovers(root) == []


# --------------------------------------------------------------------------- models


def test_mnist_net_forward_shape() -> None:
    net = mnist.Net().eval()
    out = net(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert [type(m).__name__ for m in net.net] == [
        "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Dropout2d", "AdaptiveMaxPool2d",
        "Flatten", "Linear", "ReLU", "Linear",
    ]  # fmt: skip


def test_circles_and_linreg_net_forward_shapes() -> None:
    assert circles.Net()(torch.zeros(5, 2)).shape == (5, 1)
    model = linreg.Net()
    assert isinstance(model, torch.nn.Linear) and model(torch.zeros(5, 2)).shape == (5, 1)


# --------------------------------------------------------------------------- synthetic datasets


@pytest.mark.parametrize(
    ("module", "sizes"), [(circles, (2800, 1200)), (linreg, (280, 120))], ids=["circles", "linreg"]
)
def test_synthetic_sizes_dtypes_determinism_and_global_rng(module, sizes: tuple[int, int]) -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    train, val = module.datasets()
    assert torch.equal(torch.get_rng_state(), state), "datasets() consumed the global torch RNG"

    assert (len(train), len(val)) == sizes
    for ds in (train, val):
        x, y = ds.tensors
        assert x.dtype == y.dtype == torch.float32
        assert x.shape[1:] == (2,) and y.shape[1:] == (1,)

    again_train, again_val = module.datasets()
    assert torch.equal(train.tensors[0], again_train.tensors[0])
    assert torch.equal(val.tensors[1], again_val.tensors[1])
    other_train, _ = module.datasets(seed=1)
    assert not torch.equal(train.tensors[0], other_train.tensors[0])

    # Train and val are a partition of the generated points: no row in both.
    rows = torch.cat((train.tensors[0], val.tensors[0]))
    assert torch.unique(rows, dim=0).shape[0] == sizes[0] + sizes[1]


def test_circles_geometry_and_balance() -> None:
    train, val = circles.datasets()
    x = torch.cat((train.tensors[0], val.tensors[0]))
    y = torch.cat((train.tensors[1], val.tensors[1]))[:, 0]
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert int(y.sum()) == 2000
    radius = x.norm(dim=1)
    # Radial noise is N(0, 1): ring means sit at 5 and 8, spreads near 1.
    assert abs(float(radius[y == 1].mean()) - 5.0) < 0.1
    assert abs(float(radius[y == 0].mean()) - 8.0) < 0.1
    assert 0.9 < float(radius[y == 1].std()) < 1.1
    # Shuffled before splitting, so both splits hold both classes roughly evenly.
    assert 0.45 < float(train.tensors[1].mean()) < 0.55


def test_circles_custom_sizes_and_bad_fraction() -> None:
    train, val = circles.datasets(n_per_class=50, val_fraction=0.2, seed=3)
    assert (len(train), len(val)) == (80, 20)
    with pytest.raises(ValueError, match="val_fraction"):
        circles.datasets(val_fraction=1.0)
    with pytest.raises(ValueError, match="n_per_class"):
        circles.datasets(n_per_class=0)


def test_linreg_least_squares_recovers_true_parameters() -> None:
    train, val = linreg.datasets()
    x = torch.cat((train.tensors[0], val.tensors[0])).double()
    y = torch.cat((train.tensors[1], val.tensors[1])).double()
    assert float(x.min()) >= -5.0 and float(x.max()) < 5.0
    design = torch.cat((x, torch.ones(len(x), 1, dtype=torch.float64)), dim=1)
    coef = torch.linalg.lstsq(design, y).solution[:, 0]
    assert torch.allclose(coef, torch.tensor([2.0, -3.0, 10.0], dtype=torch.float64), atol=0.3)
    residual = y[:, 0] - design @ coef
    assert 1.7 < float(residual.std()) < 2.3  # noise std is 2
