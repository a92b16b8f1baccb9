"""An MLflow store that cannot be written fails fast (issue 22): one line naming
logger.mlflow.tracking_uri, exit 2, within logger.mlflow.timeout_s, no warning flood, only logs/
left in the new run dir. Before: MLflow's SQLAlchemy engine retried 10 times with back-off (101 s)
and printed 51 warning lines first, whatever timeout_s said.

The store is really unwritable: root writes through file modes, so either a read-only tmpfs is
mounted (root) or the run is started as user nobody (setpriv) against a directory of root's; each
case skips, saying why, where this machine allows neither."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import QUIET, cli_env

TIMEOUT_S = 5  # logger.mlflow.timeout_s of the runs below
# the command's own start (interpreter, torch, the recipe, MLflow's import) on a shared 2-core
# machine, on top of timeout_s; the unbounded retries took 101 s more than that
START_S = 30
BASE = ["recipe=linreg", "trainer.gpus=0", *QUIET, "trainer.summary=false", "trainer.max_epochs=1",
        "logger=[csv,mlflow]", f"logger.mlflow.timeout_s={TIMEOUT_S}"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A read-only tmpfs for the store; the run as this user (root)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if out.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {out.stderr.strip() or out.returncode}")
    try:
        yield mnt, []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def not_permitted() -> Iterator[tuple[Path, list[str]]]:
    """A directory of root's for the store; the run as user nobody, who may not write it."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the launcher as user nobody")
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import launcher, torch"], env=cli_env(),
                           capture_output=True, cwd="/")
    if probe.returncode:
        pytest.skip(f"user nobody cannot run this checkout's python: {probe.stderr.decode()[-300:]}")
    top = Path("/tmp") / f"launcher-mlflow-{os.getpid()}"  # (pytest's tmp_path is root's alone)
    (top / "store").mkdir(parents=True, mode=0o755)
    top.chmod(0o777)  # nobody creates the run dir here
    try:
        yield top / "store", NOBODY
    finally:
        shutil.rmtree(top)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["read_only_mount", "not_permitted"])
def test_an_unwritable_mlflow_store_is_one_line_within_its_timeout(where: str, request: pytest.FixtureRequest) -> None:
    store, prefix = request.getfixturevalue(where)
    run = store.parent / "run"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    t0 = time.monotonic()
    try:
        p = subprocess.run([*prefix, sys.executable, "-m", "launcher", *BASE, f"logger.mlflow.tracking_uri={uri}",
                            f"run.dir={run}"], cwd="/", env=cli_env(), capture_output=True, text=True,
                           timeout=TIMEOUT_S + START_S + 30)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"an unwritable MLflow store was not reported within {e.timeout:.0f} s "
                    f"(logger.mlflow.timeout_s={TIMEOUT_S}): {str(e.stderr)[-600:]}")
    elapsed = time.monotonic() - t0
    # the run's own info lines may come first; then the error, one line, and nothing else
    errors = [ln for ln in p.stderr.splitlines() if not ln.startswith("[launcher] ")]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(errors) == 1, f"one line, no warnings:\n{p.stderr[-3000:]}"
    assert errors[0].startswith(f"launcher: error: logger.mlflow.tracking_uri='{uri}': MLflow did not start: ") \
        and "unable to open database file" in errors[0] and "valid: " in errors[0], errors[0]
    assert elapsed < TIMEOUT_S + START_S, f"{elapsed:.0f} s to report it (logger.mlflow.timeout_s={TIMEOUT_S})"
    left = sorted(str(x.relative_to(run)) for x in run.rglob("*")) if run.exists() else []
    assert all(x == "logs" or x.startswith("logs/") for x in left), f"only the logs may remain: {left}"
    assert list(store.iterdir()) == []
