"""A run directory has one owner and one truth (issue 10), through the real CLI: a second start is
refused, a dead owner's lock taken over, config drift applied or refused, checkpoints that do not
load fall back, a full / read-only / forbidden run dir is one line, SIGTERM ends 1 and N ranks alike."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from conftest import QUIET, cli_env, fill_disk, run_cli
from conftest import rows as _rows

LINREG = ["recipe=linreg", *QUIET]  # 280 training samples, batch 20: 14 steps per epoch


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    # a session of its own, so a test can pause the launcher and its ranks together (os.killpg)
    return subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(what: Callable[[], Any], timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = what()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under run_dir but the lock: (size, mtime_ns)."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and p.name != ".lock"}


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("launcher: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ---- one owner -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_start_into_a_run_in_use_is_refused_naming_its_owner_and_touches_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    args = [*LINREG, "trainer.max_epochs=400", "checkpoint.every_n_epochs=50", f"run.dir={run_dir}"]
    first = _start(args, tmp_path)
    try:
        _wait_for(lambda: (run_dir / "checkpoints" / "last").exists())
        # the owner is paused while the others try, so every change seen is theirs: a running owner
        # writes its own checkpoints (.tmp-step-*) in between, which would hide or fake one
        os.killpg(first.pid, signal.SIGSTOP)
        before = _snapshot(run_dir)
        second = run_cli([*args, "trainer.seed=7"], cwd=tmp_path)  # another seed: would replace the results
        assert second.returncode == 2
        line = _one_line(second.stderr)
        assert f"run.dir='{run_dir}': in use by another run (pid {first.pid} on host" in line, line
        assert _snapshot(run_dir) == before, "the refused start touched the run dir"
        assert "seed: 7" not in (run_dir / "config.yaml").read_text()
        # the Python API's rank 0 takes the lock itself: refused the same way, and deletes nothing
        from launcher import Trainer
        from launcher.config import UserError

        net = torch.nn.Linear(2, 1)
        data = torch.utils.data.TensorDataset(torch.randn(40, 2), torch.randn(40, 1))
        with pytest.raises(UserError, match="in use by another run"):
            Trainer(run_dir=str(run_dir), max_epochs=1, batch_size=20, monitor="train_loss", progress=False,
                    logger="none").fit(net, torch.nn.MSELoss(), torch.optim.SGD(net.parameters(), lr=0.1), data)
        assert _snapshot(run_dir) == before, "the refused Trainer touched the run dir"
    finally:
        os.killpg(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert (run_dir / ".lock").read_text() == "", "released on exit: an empty record is a free run dir"
    assert [int(r["epoch"]) for r in _rows(run_dir)] == list(range(1, 401))


@pytest.mark.slow
def test_two_starts_at_the_same_moment_one_runs_the_other_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    args = [*LINREG, "trainer.max_epochs=2", f"run.dir={run_dir}"]
    procs = [_start(args, tmp_path) for _ in range(2)]
    results = [(p.wait(timeout=240), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, err in results]
    refused = next(err for code, err in results if code == 2)
    assert "in use by another run" in _one_line(refused)
    assert [int(r["step"]) for r in _rows(run_dir)] == [14, 28]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")) == \
        ["step-0000014", "step-0000028"] and not (run_dir / "checkpoints" / "retired").exists()


@pytest.mark.slow
def test_the_lock_of_a_killed_launcher_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    args = [*LINREG, "trainer.max_epochs=400", "checkpoint.every_n_epochs=50", f"run.dir={run_dir}"]
    first = _start(args, tmp_path)
    _wait_for(lambda: (run_dir / "checkpoints" / "last").exists())
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == first.pid  # the dead owner's record
    p = run_cli([*args[:-2], "trainer.max_epochs=60", f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"its previous owner (pid {first.pid} on host" in p.stderr and "is gone; taking it over" in p.stderr


# ---- one truth -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_applies_safe_changes_and_lr_and_refuses_the_rest_before_writing(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    base = [*LINREG, f"run.dir={run_dir}", "checkpoint.every_n_steps=5", "trainer.max_steps=20"]
    p = run_cli(base, cwd=tmp_path)  # max_steps=20 ends mid-epoch 2, on a step checkpoint's step
    assert p.returncode == 0, p.stderr[-3000:]
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert log.count("checkpoint at step 20:") == 1, "the last step is saved once"
    assert (run_dir / "config.yaml").stat().st_mode & 0o777 == 0o600
    assert (run_dir / "checkpoints" / "step-0000020").stat().st_mode & 0o777 == 0o700
    config = (run_dir / "config.yaml").read_bytes()
    before = _snapshot(run_dir)

    for change, keys in [(["recipe=circles"], "model._target_ 'launcher.recipes.linreg.Net' -> 'launcher.recipes.circles.Net'"),
                         (["data.n=500", "trainer.batch_size=10"], "data.n 400 -> 500, trainer.batch_size 20 -> 10")]:
        p = run_cli([*base, *change, "trainer.max_steps=40"], cwd=tmp_path)
        assert p.returncode == 2
        line = _one_line(p.stderr)
        assert f"run.dir='{run_dir}': holds a run with other settings; cannot continue it with" in line
        assert keys in line and "trainer.max_steps" not in line, line
        assert (run_dir / "config.yaml").read_bytes() == config and _snapshot(run_dir) == before

    p = run_cli([*base, "trainer.max_steps=-1", "trainer.max_epochs=3", "optimizer.lr=0.01"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "continuing with changed settings: optimizer.lr 0.1 -> 0.01, trainer.max_epochs 50 -> 3, " \
           "trainer.max_steps 20 -> -1" in (run_dir / "logs" / "rank-0.log").read_text()
    # max_steps=20 left epoch 2 open at step 20: continued, it ends at 28 (its row replaced), then 42
    assert [(int(r["step"]), float(r["lr"])) for r in _rows(run_dir)] == [(14, 0.1), (28, 0.01), (42, 0.01)]
    assert "lr: 0.01" in (run_dir / "config.yaml").read_text()
    state = torch.load(run_dir / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.01
    # Adam's state was kept, not rebuilt: its step count goes on from 20
    assert int(state["optimizer"]["state"][0]["step"]) == 42


# ---- checkpoints that do not load ----------------------------------------------------------------

class _Payload:
    """A pickle that runs a command when unpickled the unsafe way."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def _plant(folder: Path, marker: Path) -> None:
    """Replace a complete checkpoint's state.pt with a hostile pickle and re-seal its manifest, so
    only the load itself can tell."""
    torch.save({"model": _Payload(marker)}, folder / "state.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_a_checkpoint_that_does_not_load_falls_back_and_none_left_is_one_line(tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "r", tmp_path / "pwned"
    base = [*LINREG, f"run.dir={run_dir}", "checkpoint.keep_last=3", "checkpoint.save_top_k=0"]
    assert run_cli([*base, "trainer.max_epochs=3"], cwd=tmp_path).returncode == 0
    ckpts = run_dir / "checkpoints"
    _plant(ckpts / "step-0000042", marker)
    p = run_cli([*base, "trainer.max_epochs=4"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"cannot resume from {ckpts / 'step-0000042'}: {ckpts / 'step-0000042' / 'state.pt'}: cannot be " \
           "loaded (refused: it holds what a weights-only load does not allow" in p.stderr
    assert "trying the previous complete checkpoint" in p.stderr and "resumed from" in p.stderr
    assert "weights_only=False" not in p.stderr and "weights_only` set to `False`" not in p.stderr
    assert not marker.exists(), "the pickle's command never ran"
    assert [int(r["step"]) for r in _rows(run_dir)] == [14, 28, 42, 56]  # epoch 3 trained again from 28

    for folder in [f for f in ckpts.iterdir() if f.name.startswith("step-")]:
        _plant(folder, marker)
    p = run_cli([*base, "trainer.max_epochs=5"], cwd=tmp_path)
    assert p.returncode == 2
    line = _one_line(p.stderr)
    assert "cannot resume from" in line and "no earlier complete checkpoint is left" in line, line
    assert "weights_only=False" not in p.stderr and not marker.exists()


def test_python_api_resume_with_another_model_shape_is_one_user_error(tmp_path: Path) -> None:
    from launcher import Trainer
    from launcher.config import UserError

    x, y = torch.randn(64, 3), torch.randn(64, 1)
    data = torch.utils.data.TensorDataset(x, y)
    net = torch.nn.Linear(3, 1)
    kw = dict(run_dir=str(tmp_path / "api"), progress=False, summary=False, batch_size=16, logger="none",
              monitor="train_loss")
    Trainer(max_epochs=1, **kw).fit(net, torch.nn.MSELoss(), torch.optim.SGD(net.parameters(), lr=0.1), data)
    wide = torch.nn.Linear(3, 2)
    with pytest.raises(UserError) as e:
        Trainer(max_epochs=2, **kw).fit(wide, torch.nn.MSELoss(), torch.optim.SGD(wide.parameters(), lr=0.1), data)
    text = str(e.value)
    assert "\n" not in text and "size mismatch for weight" in text and "no earlier complete checkpoint" in text, text
    assert (tmp_path / "api" / ".lock").read_text() == ""  # released on the error path too


# ---- the run dir's filesystem --------------------------------------------------------------------

@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_resumes(tmp_path: Path, small_fs: Path) -> None:
    run_dir = small_fs / "r"
    base = [*LINREG, f"run.dir={run_dir}", "logger.csv.plots=false"]
    assert run_cli([*base, "trainer.max_epochs=2"], cwd=tmp_path).returncode == 0
    filler = fill_disk(small_fs)
    # 3 blocks left: the lock's record, the log and metrics.csv fit; a 19 KB state.pt does not
    os.truncate(filler, filler.stat().st_size - 3 * 4096)
    p = run_cli([*base, "trainer.max_epochs=4"], cwd=tmp_path)
    assert p.returncode == 2
    line = _one_line(p.stderr)
    assert f"{run_dir}/" in line and "No space left on device (ENOSPC); valid: free some space" in line, line
    assert "enforce fail" not in p.stderr and "--- Logging error ---" not in p.stderr
    ckpts = run_dir / "checkpoints"
    assert not [q for q in ckpts.iterdir() if q.name.startswith(".tmp-")], "nothing half-written stays"
    assert os.readlink(ckpts / "last") == "step-0000028"
    filler.unlink()
    p = run_cli([*base, "trainer.max_epochs=4"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr and [int(r["step"]) for r in _rows(run_dir)][-1] == 56


@pytest.mark.slow
def test_a_read_only_run_dir_finished_says_so_and_unfinished_is_one_line(tmp_path: Path, small_fs: Path) -> None:
    run_dir = small_fs / "r"
    base = [*LINREG, f"run.dir={run_dir}", "logger.csv.plots=false", "trainer.max_epochs=1"]
    assert run_cli(base, cwd=tmp_path).returncode == 0
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_fs)]).returncode == 0
    p = run_cli(base, cwd=tmp_path)  # finished: nothing to write, nothing written
    assert p.returncode == 0, p.stderr[-3000:]
    assert "run complete at epoch 1" in p.stderr
    p = run_cli([*base, "trainer.max_epochs=2"], cwd=tmp_path)
    assert p.returncode == 2
    line = _one_line(p.stderr)
    assert f"{run_dir}" in line and "Read-only file system (EROFS); valid: a path on a writable filesystem" in line


def test_a_run_dir_this_user_may_not_write_is_one_line(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the launcher as an unprivileged user (root may write anywhere)")
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                            "import launcher, torch"], env=cli_env(), capture_output=True, cwd="/")
    if probe.returncode:
        pytest.skip(f"user nobody cannot run this checkout's python: {probe.stderr.decode()[-300:]}")
    parent = Path("/tmp") / f"launcher-eacces-{os.getpid()}"
    parent.mkdir(mode=0o755)
    try:
        p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                            "launcher", *LINREG, f"run.dir={parent}/r"], env=cli_env(), capture_output=True,
                           text=True, cwd="/", timeout=120)
        assert p.returncode == 2
        line = _one_line(p.stderr)
        assert f"{parent}/r" in line and "Permission denied (EACCES); valid: a path this user may write" in line
        assert list(parent.iterdir()) == []
    finally:
        shutil.rmtree(parent)


# ---- signals -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_ends_one_rank_and_n_ranks_alike(tmp_path: Path, ranks: int) -> None:
    pytest.importorskip("wandb")
    from wandb_offline import iter_records

    run_dir = tmp_path / "r"
    first = _start([*LINREG, "logger=[csv,wandb]", "trainer.max_epochs=100000", "trainer.gpus=0",
                    f"trainer.nproc={ranks}", f"run.dir={run_dir}"], tmp_path)
    _wait_for(lambda: (run_dir / "checkpoints" / "last").exists(), timeout=120)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err[-3000:]
    assert "launcher: interrupted by SIGTERM; the run stopped" in err and "Traceback" not in err, err[-3000:]
    assert (run_dir / ".lock").read_text() == ""
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    exits = [r.exit.exit_code for r in iter_records(runs[0]) if r.WhichOneof("record_type") == "exit"]
    assert len(runs) == 1 and exits == [1], "rank 0 finished its W&B run"
