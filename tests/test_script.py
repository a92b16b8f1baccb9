"""`launcher run SCRIPT`: an unmodified torchrun-style DDP script (written here, importing nothing from
the launcher) on local ranks, with its errors as one line each; SLURM and Ray runs are in
tests/test_slurm.py and tests/test_ray.py (their clusters' fixtures live there)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, same_weights

# A plain DDP script: it reads the torch env, calls init_process_group, checkpoints every step into
# LAUNCHER_RUN_DIR (or --out under torchrun) and resumes from it; on its stop signal (the name in
# LAUNCHER_STOP_SIGNAL, its own handler) it agrees with the other ranks, saves and exits 75.
TRAIN = '''
import argparse, os, signal, sys, time
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=12)
p.add_argument("--out", default="")
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--kill-at", type=int, default=-1)
p.add_argument("--exit", type=int, default=0)
p.add_argument("--no-init", action="store_true")
p.add_argument("--helper", action="store_true")
p.add_argument("--stop-at", type=int, default=-1)
p.add_argument("--ignore-stop", action="store_true")  # no handler of its own, no stop_requested(): the signal ignored  # as if the stop signal came before this step (first attempt)  # launcher.stop_requested() instead of its own agreement
args = p.parse_args()
out = os.environ.get("LAUNCHER_RUN_DIR") or args.out
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
attempt = int(os.environ.get("LAUNCHER_ATTEMPT", "0"))
node = os.environ.get("SLURMD_NODENAME", "")
print(f"rank {rank} of {world}, attempt {attempt}, args {sys.argv[1:]}{' on node ' + node if node else ''}", flush=True)
with open(os.path.join(out, f"pid-{rank}"), "w") as f:
    f.write(str(os.getpid()))
stop = []
if os.environ.get("LAUNCHER_STOP_SIGNAL") and not args.helper and not args.ignore_stop:
    signal.signal(getattr(signal, "SIG" + os.environ["LAUNCHER_STOP_SIGNAL"]), lambda *a: stop.append(1))
if args.exit and rank == 1:
    print("rank 1 gives up", flush=True)
    sys.exit(args.exit)
if args.no_init and rank == 1:
    time.sleep(600)
dist.init_process_group("gloo")
torch.manual_seed(0)
model = DDP(torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
ckpt, start = os.path.join(out, "ckpt.pt"), 0
if os.path.exists(ckpt):
    state = torch.load(ckpt)
    model.module.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    start = state["step"]
    print(f"resumed from step {start}", flush=True)
data = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
for step in range(start, args.steps):
    if args.ignore_stop:
        stopping = False
    elif args.helper:
        import launcher
        stopping = launcher.stop_requested()
    else:
        flag = torch.tensor([len(stop)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopping = bool(flag.item())
    if stopping or (step == args.stop_at and attempt == 0):
        print(f"stopped at step {step}", flush=True)
        sys.exit(75)
    if step == args.kill_at and rank == 1 and attempt == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    i = (step * world + rank) % 8
    x = data[i * 8:(i + 1) * 8]
    loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)
        with open(os.path.join(out, "progress"), "w") as f:
            f.write(str(step + 1))
    dist.barrier()
    time.sleep(args.sleep)
if rank == 0:
    torch.save(model.module.state_dict(), os.path.join(out, "final.pt"))
dist.destroy_process_group()
'''

LOCAL = ["trainer.gpus=0", "trainer.nproc=2"]


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("script") / "train.py"
    path.write_text(TRAIN)
    return path


def launcher_run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "run", *args], cwd=cwd, env=cli_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)


# ---- errors: one line each, exit 2, printed once (fast tier) ----------------------------------------

def error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("launcher: error: ")]
    assert len(errors) == 1, p.stderr[-2000:]
    return errors[0]


def test_a_script_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    line = error_line(launcher_run(["nope.py", *LOCAL], tmp_path))
    assert "script='" in line and "nope.py': no such file; valid: a Python file" in line
    assert not list(tmp_path.iterdir())  # no run dir: nothing written


def test_a_module_that_does_not_import_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "__init__.py").write_text("raise ImportError('no such dependency: flashy')\n")
    line = error_line(launcher_run(["-m", "broken.train", *LOCAL], tmp_path))
    assert line == ("launcher: error: -m='broken.train': does not import: ImportError: no such dependency: flashy; "
                    "valid: a module importable from this directory or the PYTHONPATH")
    line = error_line(launcher_run(["-m", "not_a_module_here", *LOCAL], tmp_path))
    assert "-m='not_a_module_here': no such module" in line


def test_script_arguments_before_the_separator_are_refused_with_the_fix(tmp_path: Path, script: Path) -> None:
    line = error_line(launcher_run([str(script), "--lr", "3e-4"], tmp_path))
    assert "override='--lr': not KEY=VALUE: the script's own arguments go after `--`" in line
    assert f"launcher run {script} [KEY=VALUE ...] -- --lr ..." in line
    assert "script='': missing; valid: launcher run train.py" in error_line(launcher_run([], tmp_path))
    p = launcher_run(["--help"], tmp_path)
    assert p.returncode == 0 and "After `--`: the script's arguments, exactly as given" in p.stdout


def test_sweep_values_fill_the_script_arguments_and_every_mistake_is_one_line(tmp_path: Path, script: Path) -> None:
    from launcher.cli.script_args import parse
    from launcher.config import ConfigError, ScriptConfig, check_script, with_sweep

    s = ScriptConfig(path=str(script), args=["--lr", "${sweep.lr}", "--tag=${sweep.tag}-x", "--keep", "$HOME"])
    assert with_sweep(s, {"lr": 0.001, "tag": True}).args == ["--lr", "0.001", "--tag=true-x", "--keep", "$HOME"]
    with pytest.raises(ConfigError, match=r"^--='--tag=\$\{sweep\.tag\}-x': names sweep.tag, which is not given; valid: "
                       r"sweep.tag=A,B before `--` \(with launcher run --multirun\); the sweep's placeholders: "):
        with_sweep(s, {"lr": 1})
    with pytest.raises(ConfigError, match=r"^sweep.wd=0.1: no script argument takes it; valid: '\$\{sweep.wd\}' in"):
        with_sweep(s, {"lr": 1, "tag": "a", "wd": 0.1})
    with pytest.raises(ConfigError, match=r"^sweep.lr=1: a recipe run has no script arguments to fill"):
        check_script(ScriptConfig(), {"lr": 1})
    assert parse(["--multirun", str(script), "sweep.lr=1,2", "--", "--lr", "${sweep.lr}"]) == (
        ScriptConfig(path=str(script), args=["--lr", "${sweep.lr}"]), ["--multirun", "sweep.lr=1,2"])
    with pytest.raises(ConfigError, match=r"^-m='train.py': names a module here, not a script or a sweep; valid: "):
        parse(["-m", "train.py", "sweep.lr=1,2"])
    line = error_line(launcher_run([str(script), "sweep.lr=1,2", f"run.dir={tmp_path / 'r'}", "--", "${sweep.lr}"],
                                   tmp_path))
    assert line.startswith("launcher: error: sweep.lr=1,2: several values outside a sweep; valid: a sweep, with -m")
    assert not (tmp_path / "r").exists()


def test_a_rank_exiting_nonzero_is_named_with_its_code_and_log(tmp_path: Path, script: Path) -> None:
    run_dir = tmp_path / "run"
    p = launcher_run([str(script), *LOCAL, f"run.dir={run_dir}", "--", "--exit", "3"], tmp_path)
    line = error_line(p)
    assert f"launcher: error: rank 1 exited with code 3 (its log: {run_dir}/logs/rank-1.log); its last lines:" in line
    assert "    | rank 1 gives up" in p.stderr  # the log's tail, under the one line
    assert "rank 1 gives up" in (run_dir / "logs" / "rank-1.log").read_text()


def test_a_stop_with_no_restart_left_says_so(tmp_path: Path, script: Path) -> None:
    line = error_line(launcher_run([str(script), *LOCAL, f"run.dir={tmp_path / 'run'}", "--", "--stop-at", "0"],
                                   tmp_path))
    assert re.match(r"launcher: error: rank [01] exited with code 75 \(it asked to run again, and "
                    r"launcher.max_restarts=0 allows no more restarts\) \(its log: ", line), line


def test_a_rank_that_never_joins_is_named_after_the_join_timeout(tmp_path: Path, script: Path) -> None:
    t0 = time.monotonic()
    p = launcher_run([str(script), *LOCAL, "trainer.join_timeout_s=3", f"run.dir={tmp_path / 'run'}", "--",
                      "--no-init"], tmp_path)
    assert error_line(p) == ("launcher: error: rank 1 never called init_process_group: rank 0 waited 3 s for it "
                             "(trainer.join_timeout_s=3; a script that works longer before init_process_group "
                             "needs more, e.g. trainer.join_timeout_s=600)")
    assert time.monotonic() - t0 < 60


# ---- real runs (slow tier) ----------------------------------------------------------------------------

@pytest.mark.slow
def test_two_local_ranks_equal_torchrun_a_killed_rank_restarts_a_stop_resumes(tmp_path: Path, script: Path) -> None:
    """The same script, the same weights under torchrun and `launcher run`; then rank 1 SIGKILLed at
    step 5, the group restarted (launcher.max_restarts=1), resumed from the script's own checkpoint
    and ending with the same weights again; then the stop signal (LAUNCHER_STOP_SIGNAL, USR1) to one
    rank: launcher.stop_requested() is true on both ranks at the same step, the script saves and
    exits 75, the group restarts and resumes, ending with the same weights once more."""
    ref = tmp_path / "torchrun"
    ref.mkdir()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), "--out", str(ref)], cwd=tmp_path, env=cli_env(OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]

    run_dir = tmp_path / "run"
    p = launcher_run([str(script), *LOCAL, f"run.dir={run_dir}", "--", "--steps", "12"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    same_weights(ref / "final.pt", run_dir / "final.pt")
    assert "rank 1 of 2, attempt 0, args ['--steps', '12']" in (run_dir / "logs" / "rank-1.log").read_text()
    command = json.loads((run_dir / "command.json").read_text())
    assert command["script"] == str(script) and command["args"] == ["--steps", "12"]
    assert command["env"]["OMP_NUM_THREADS"] == "1" and (run_dir / "command.json").stat().st_mode & 0o077 == 0

    killed = tmp_path / "killed"
    p = launcher_run([str(script), *LOCAL, "launcher.max_restarts=1", f"run.dir={killed}", "--", "--kill-at", "5"],
                     tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    log = (killed / "logs" / "rank-0.log").read_text()
    assert "rank 0 of 2, attempt 1" in log and "resumed from step 5" in log, log
    same_weights(ref / "final.pt", killed / "final.pt")

    stopped = tmp_path / "stopped"
    p = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(script), *LOCAL, "launcher.max_restarts=1",
                          f"run.dir={stopped}", "--", "--sleep", "0.3", "--helper"], cwd=tmp_path,
                         env=cli_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (stopped / "progress").exists() or int((stopped / "progress").read_text() or 0) < 3:
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.1)
    os.kill(int((stopped / "pid-1").read_text()), signal.SIGUSR1)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    logs = [(stopped / "logs" / f"rank-{r}.log").read_text() for r in (0, 1)]
    stop_lines = [[ln for ln in log.splitlines() if ln.startswith("stopped at step")] for log in logs]
    assert stop_lines[0] and stop_lines[0] == stop_lines[1], logs  # the same step on both ranks
    assert "attempt 1" in logs[0] and "resumed from step" in logs[0], logs[0]
    same_weights(ref / "final.pt", stopped / "final.pt")
