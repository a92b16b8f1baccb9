"""SLURM against a REAL cluster (slurm/ci/up.sh: Debian's slurm packages, fake nodes n1 and n2 on
this host, accounting on). Skipped with the reason only where it cannot be brought up; never under CI."""

from __future__ import annotations

import csv
import datetime
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import QUIET, REPO, cli_env, mnist_small, run_cli

SLURM = ["launcher=slurm", "launcher.poll_s=0.5", "launcher.time_min=20"]  # >= 15: see slurm/ci/README.md


@pytest.fixture(scope="session")
def cluster() -> None:
    ok = shutil.which("sbatch") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    if not ok or "n2" not in subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout:
        up = subprocess.run(["bash", str(REPO / "slurm" / "ci" / "up.sh")], capture_output=True, text=True)
        if up.returncode != 0:
            reason = f"no SLURM cluster: slurm/ci/up.sh failed: {(up.stderr or up.stdout)[-500:]}"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _job_id(stderr: str) -> str:
    line = next(ln for ln in stderr.splitlines() if "submitted job" in ln)
    return line.split("submitted job ")[1].split(";")[0]


def _sacct_states(job: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-j", job, "-o", "State"], capture_output=True, text=True)
    return out.stdout.split()


def _assert_private(folder: Path, run_dir: Path) -> None:
    """The submission folder (sbatch scripts with the setup lines, pickled configs) is the owner's
    alone; what the job itself writes into the run dir keeps the user's umask."""
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700, oct(folder.stat().st_mode)
    subdirs = [d for d in folder.rglob("*") if d.is_dir()]
    scripts = list(folder.rglob("*_submission.sh"))
    pickles = [f for f in folder.rglob("*_submitted.pkl") if not f.is_symlink()]
    assert subdirs and scripts and pickles, sorted(folder.rglob("*"))
    for d in subdirs:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, (d, oct(d.stat().st_mode))
    for f in scripts + pickles:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((run_dir / "metrics.csv").stat().st_mode) == 0o666 & ~umask


@pytest.mark.slow
def test_one_node_two_task_cpu_job(cluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "one"
    p = run_cli(["recipe=linreg", *SLURM, "launcher.wait=true", "trainer.gpus=0", "trainer.nproc=2",
                 "trainer.max_epochs=3", *QUIET, f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 node(s) x 2 CPU task(s)/node = 2 rank(s)" in p.stderr
    assert f"run dir {run_dir}" in p.stderr and "completed" in p.stderr
    assert [int(r["step"]) for r in _rows(run_dir)] == [7, 14, 21]  # 280 samples / (2 ranks x 20)
    for rank in (0, 1):
        assert f"rank {rank} of 2" in (run_dir / "logs" / f"rank-{rank}.log").read_text()
    state = torch.load(run_dir / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert len(state["ranks"]) == 2 and (run_dir / "model.pt").exists()
    _assert_private(run_dir / "slurm", run_dir)


@pytest.mark.slow
def test_two_node_job_trains_over_gloo_across_nodes(cluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "two"
    p = run_cli(["recipe=linreg", *SLURM, "launcher.wait=true", "trainer.gpus=0", "trainer.nproc=1",
                 "trainer.nodes=2", "trainer.max_epochs=2", *QUIET, f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 node(s) x 1 CPU task(s)/node = 2 rank(s)" in p.stderr
    assert "rank 0 of 2 (local rank 0) on node n1" in (run_dir / "logs" / "rank-0.log").read_text()
    assert "rank 1 of 2 (local rank 0) on node n2" in (run_dir / "logs" / "rank-1.log").read_text()
    assert [int(r["step"]) for r in _rows(run_dir)] == [7, 14]


def _preempt_args(root: Path, run_dir: Path) -> list[str]:
    return [*mnist_small(root, 2560, 512), *SLURM, "trainer.gpus=0", "trainer.nproc=2", "trainer.max_epochs=3",
            "launcher.signal_check_every_n_steps=1", "checkpoint.every_n_steps=0", *QUIET, f"run.dir={run_dir}"]


@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_resumes_exactly(cluster, tmp_path: Path, mnist_root: Path) -> None:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = run_cli([*_preempt_args(mnist_root, ref), "launcher.wait=true"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]

    # the interrupted run also logs to W&B (offline): the requeued job must continue the same W&B run
    p = run_cli([*_preempt_args(mnist_root, cut), "logger=[csv,wandb]", "logger.wandb.mode=offline"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    job = _job_id(p.stderr)
    deadline = time.monotonic() + 120
    while not (cut / "checkpoints" / "last").exists():  # the end of epoch 1: now inside epoch 2
        assert time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # what SLURM does before the time limit
    while "COMPLETED" not in _sacct_states(job):
        assert time.monotonic() < deadline + 120, f"job {job} did not finish: {_sacct_states(job)}"
        assert "FAILED" not in _sacct_states(job), (cut / "logs" / "rank-0.log").read_text()
        time.sleep(1)
    assert _sacct_states(job)[0] == "REQUEUED"
    log = (cut / "logs" / "rank-0.log").read_text()
    assert "for a requeue (signal USR1)" in log and "requeued (1 of 3 requeues)" in log and "resumed from" in log
    assert len({ln.split("run ")[1].split(":")[0] for ln in log.splitlines() if "): rank 0 of 2" in ln or
                ": rank 0 of 2" in ln}) == 1, "the requeued job continues the same run id"
    assert [int(r["step"]) for r in _rows(cut)] == [10, 20, 30], "each epoch (and step) once in the history"
    assert _rows(cut) == _rows(ref)
    from wandb_offline import read_offline_run

    runs = sorted((cut / "wandb").glob("offline-run-*"))
    run_id = json.loads((cut / "run.json").read_text())["id"]
    assert len(runs) == 2 and {read_offline_run(r)["run_id"] for r in runs} == {run_id}
    epochs = [h["epoch"] for r in runs for h in read_offline_run(r)["history"] if "val_acc" in h]
    assert epochs == [1, 2, 3], "one W&B run across the requeue, each epoch logged once"
    a = torch.load(ref / "model.pt", weights_only=True)
    b = torch.load(cut / "model.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
    _goodput_across_the_requeue(cut, job)


def _goodput_across_the_requeue(cut: Path, job: str) -> None:
    """RUN_DIR/goodput.json: two attempts of one job, nothing lost (the requeue saved the step it stopped at),
    the queue time from SLURM's own submit and start times; recomputed once the job ended (SLURM's end of its
    last run: the interpreter's exit and srun's, after the process's own last record), the buckets sum to the
    run's wall clock as sacct tells it (the first submit to the last end) within 2%."""
    g = json.loads((cut / "goodput.json").read_text())  # as the job's last process wrote it
    assert len(g["attempts"]) == 2 and g["buckets_s"]["shutdown"] > 0, g
    subprocess.run([sys.executable, "-m", "launcher.observe.goodput_sums", str(cut)], check=True, capture_output=True)
    g = json.loads((cut / "goodput.json").read_text())
    (s1, e1), (s2, e2) = [a["steps"] for a in g["attempts"]]
    assert [(a["how"], a["job"]) for a in g["attempts"]] == [("requeue", job), ("done", job)], g["attempts"]
    assert s1 == 0 < e1 == s2 < e2 == 30 and g["steps"] == {"trained": 30, "lost": 0, "final": 30}, g["steps"]
    starts = [json.loads(ln) for ln in (cut / "goodput.jsonl").read_text().splitlines() if '"start"' in ln]
    assert all(r["submit"] and r["sched"] and r["sched"] >= r["submit"] for r in starts), starts
    b = g["buckets_s"]
    assert abs(sum(b.values()) - g["wall_s"]) < 0.01 and b["lost"] == 0 and b["queue"] >= 0, b
    assert b["queue"] + b["between_attempts"] > 0 and b["startup"] > 0 and b["validation"] > 0, b
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job, "-o", "Submit,End"], capture_output=True,
                         text=True).stdout.split()
    times = [datetime.datetime.fromisoformat(t).timestamp() for row in out for t in row.split("|")]
    wall = max(times) - min(times)  # (whole seconds: 1 s either way)
    assert abs(g["wall_s"] - wall) <= max(0.02 * wall, 1.0), (g["wall_s"], wall, out)


@pytest.mark.slow
def test_requeue_limit_stops_with_a_checkpoint_and_the_same_command_resumes(cluster, tmp_path: Path,
                                                                            mnist_root: Path) -> None:
    run_dir = tmp_path / "limit"
    args = [*_preempt_args(mnist_root, run_dir), "launcher.max_requeues=0"]
    p = run_cli(args, cwd=tmp_path)
    job = _job_id(p.stderr)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last").exists():
        assert time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    while not {"FAILED", "COMPLETED"} & set(_sacct_states(job)):
        assert time.monotonic() < deadline + 60, _sacct_states(job)
        time.sleep(1)
    assert _sacct_states(job) == ["FAILED"], "not requeued: the job ends, failed, with its checkpoint written"
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert "launcher.max_requeues=0" in log and not (run_dir / "model.pt").exists()
    p = run_cli([*args, "launcher.wait=true"], cwd=tmp_path)  # the same command again: resumes, finishes
    assert p.returncode == 0, p.stderr[-3000:]
    assert [int(r["step"]) for r in _rows(run_dir)] == [10, 20, 30]


@pytest.mark.slow
def test_requeue_signal_at_the_jobs_first_moment_is_requeued_not_fatal(cluster, tmp_path: Path) -> None:
    """USR1 as soon as the tasks run (submitit's first log line), seconds before they have imported
    torch or the launcher: remembered, and acted on at the first agreed step (checkpoint, requeue,
    resume). Before that line the tasks may not exist yet, and SLURM drops a signal for no task."""
    run_dir = tmp_path / "early"
    p = run_cli(["recipe=linreg", *SLURM, "trainer.gpus=0", "trainer.nproc=2", "trainer.max_epochs=2",
                 "launcher.signal_check_every_n_steps=1", "checkpoint.every_n_steps=0", *QUIET,
                 f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    job = _job_id(p.stderr)
    first = run_dir / "slurm" / job / f"{job}_0_log.out"
    deadline = time.monotonic() + 120
    while "Starting with" not in (first.read_text() if first.exists() else ""):
        assert time.monotonic() < deadline and "FAILED" not in _sacct_states(job), _sacct_states(job)
        time.sleep(0.01)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    assert not (run_dir / "logs" / "rank-0.log").exists(), "signalled too late: the ranks were set up already"
    while "COMPLETED" not in _sacct_states(job):
        assert time.monotonic() < deadline + 60, f"job {job} did not finish: {_sacct_states(job)}"
        assert "FAILED" not in _sacct_states(job), (run_dir / "slurm" / job / f"{job}_0_log.err").read_text()[-3000:]
        time.sleep(1)
    assert _sacct_states(job) == ["REQUEUED", "COMPLETED"]
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert "stopped at step 1 for a requeue (signal USR1)" in log, log
    assert "requeued (1 of 3 requeues)" in log and "resumed from" in log
    assert [int(r["step"]) for r in _rows(run_dir)] == [7, 14], "each epoch (and step) once in the history"


@pytest.mark.slow
def test_a_killed_rank_is_named_not_the_rank_that_lost_it(cluster, tmp_path: Path) -> None:
    """kill -9 of rank 1 mid-run: the report names rank 1 and its signal (srun's task-end line), not
    rank 0's lost-connection error that follows."""
    run_dir = tmp_path / "kill"
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "recipe=linreg", *SLURM, "launcher.wait=true",
                             "trainer.gpus=0", "trainer.nproc=2", "trainer.max_epochs=1000", *QUIET,
                             f"run.dir={run_dir}"], cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.csv").exists() or len(_rows(run_dir)) < 2:  # training, past epoch 1
            assert proc.poll() is None and time.monotonic() < deadline, "no epoch done"
            time.sleep(0.05)
        lines = [ln for ln in (run_dir / "logs" / "rank-1.log").read_text().splitlines() if ", pid " in ln]
        os.kill(int(lines[-1].rsplit(", pid ", 1)[1]), signal.SIGKILL)  # fake nodes: processes of this host
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    job = _job_id(err)
    report = err[err.index(f"launcher: job {job} failed"):]
    assert report.startswith(f"launcher: job {job} failed: rank 1 was killed by signal 9 (SIGKILL) on node n1 "
                             "(srun: task 1: Killed)"), report
    assert "--- rank 0" not in report and "Connection" not in report and "Traceback" not in report, report


@pytest.mark.slow
def test_sweep_is_one_job_array(cluster, tmp_path: Path) -> None:
    p = run_cli(["-m", "recipe=linreg", "optimizer.lr=0.05,0.1", *SLURM, "launcher.wait=true", "trainer.gpus=0",
                 "trainer.max_epochs=2", *QUIET, f"run.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ids = [ln.split("submitted job ")[1].split(";")[0] for ln in p.stderr.splitlines() if "submitted job" in ln]
    assert len(ids) == 2 and {i.split("_")[0] for i in ids} == {ids[0].split("_")[0]}, ids  # ARRAYID_0, _1
    assert sorted(i.split("_")[1] for i in ids) == ["0", "1"]
    for i, lr in ((0, 0.05), (1, 0.1)):
        d = tmp_path / "sweep" / str(i)
        assert [int(r["step"]) for r in _rows(d)] == [14, 28]
        assert f"lr: {lr}" in (d / "config.yaml").read_text()
        _assert_private(tmp_path / "sweep" / "slurm", d)


@pytest.mark.slow
def test_a_script_sweep_is_one_job_array_each_point_with_its_arguments(cluster, tmp_path: Path) -> None:
    """`launcher run --multirun`: sweep.NAME values fill '${sweep.NAME}' in the script's arguments,
    one job of one array per point, each point its own run dir (the script: tests/test_script.py's)."""
    from test_script import TRAIN, launcher_run

    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    p = launcher_run(["--multirun", str(script), *SLURM, "launcher.wait=true", "trainer.gpus=0", "trainer.nproc=1",
                      "sweep.steps=2,3", f"run.dir={tmp_path / 'sweep'}", "--", "--steps", "${sweep.steps}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ids = [ln.split("submitted job ")[1].split(";")[0] for ln in p.stderr.splitlines() if "submitted job" in ln]
    assert sorted(i.rpartition("_")[2] for i in ids) == ["0", "1"] and len({i.split("_")[0] for i in ids}) == 1, ids
    for point, steps in ((0, 2), (1, 3)):
        d = tmp_path / "sweep" / str(point)
        assert (d / "progress").read_text() == str(steps) and (d / "final.pt").is_file()
        assert f"args ['--steps', '{steps}']" in (d / "logs" / "rank-0.log").read_text()
        assert json.loads((d / "command.json").read_text())["args"] == ["--steps", str(steps)]


@pytest.mark.slow
def test_sweep_over_resources_is_one_submission_per_resource_set(cluster, tmp_path: Path) -> None:
    p = run_cli(["-m", "recipe=linreg", "trainer.nproc=1,2", *SLURM, "launcher.wait=true", "trainer.gpus=0",
                 "trainer.max_epochs=1", *QUIET, f"run.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ids = [ln.split("submitted job ")[1].split(";")[0] for ln in p.stderr.splitlines() if "submitted job" in ln]
    assert len(ids) == 2 and ids[0] != ids[1], ids
    for i, world in ((0, 1), (1, 2)):  # each point got the tasks it asked for
        assert f"rank 0 of {world}" in (tmp_path / "sweep" / str(i) / "logs" / "rank-0.log").read_text()


@pytest.mark.slow
def test_own_sbatch_template_runs_the_same_worker(cluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "tmpl"
    env = cli_env(LAUNCHER_PYTHON=sys.executable)
    out = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out", "--wait",
                          str(REPO / "slurm" / "train.sbatch"), "recipe=linreg", "trainer.max_epochs=2", *QUIET,
                          f"run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, (out.stderr, list(tmp_path.glob("slurm-*.out")) and
                                 next(tmp_path.glob("slurm-*.out")).read_text()[-3000:])
    assert [int(r["step"]) for r in _rows(run_dir)] == [7, 14]  # 2 tasks from the template: 2 ranks
    assert "rank 1 of 2" in (run_dir / "logs" / "rank-1.log").read_text()
    assert len(json.loads((run_dir / "run.json").read_text())["id"]) == 8


@pytest.mark.slow
def test_a_rank_raising_fails_the_job_with_its_traceback(cluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "bad"
    p = run_cli(["recipe=linreg", "model._target_=faulty.FaultyLinear", *SLURM, "launcher.wait=true",
                 "trainer.gpus=0", "trainer.nproc=2", "trainer.max_epochs=5", *QUIET, f"run.dir={run_dir}"],
                cwd=tmp_path, FAULT_RANK="1", FAULT_STEP="4")
    assert p.returncode == 1, p.stderr[-3000:]
    assert "failed" in p.stderr and "injected failure on rank 1 at step 4" in p.stderr
    job = _job_id(p.stderr)
    logs = "".join(f.read_text() for f in (run_dir / "slurm").rglob(f"{job}_1_log.err"))
    assert "Traceback" in logs and "RuntimeError: injected failure on rank 1 at step 4" in logs


@pytest.mark.parametrize("override,expected", [
    ("+launcher.sbatch.reservaton=x", "launcher.sbatch.reservaton='x': not an sbatch option; valid:"),
    ("launcher.sbatch.reservation=x", "launcher.sbatch.reservation: extra sbatch parameters are new keys: add "
                                      "them with Hydra's '+', as +launcher.sbatch.reservation=<value>"),
    ("launcher.partition=gpu", "launcher.partition='gpu': no such partition; valid: debug"),
    ("trainer.nodes=3", "trainer.nodes=3: partition debug has 2 node(s)"),
    ("launcher.signal=KILL", "launcher.signal='KILL': unknown choice; valid: USR1, USR2"),
    ("launcher.partiton=gpu", "launcher.partiton: unknown key (did you mean launcher.partition?); valid: "
                              "launcher.name, launcher.partition"),
])
@pytest.mark.slow
def test_bad_slurm_input_is_one_line_exit_2(cluster, tmp_path: Path, override: str, expected: str) -> None:
    p = run_cli(["recipe=linreg", "launcher=slurm", override, f"run.dir={tmp_path / 'r'}"], cwd=tmp_path, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], p.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_users_error_in_a_job_is_one_line_exit_2(cluster, tmp_path: Path) -> None:
    p = run_cli(["recipe=linreg", "optimizer.lr=-1", *SLURM, "launcher.wait=true", "trainer.gpus=0",
                 "trainer.nproc=2", *QUIET, f"run.dir={tmp_path / 'bad'}"], cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("launcher: error:")]
    assert len(errors) == 1 and "optimizer (Adam): ValueError: Invalid learning rate: -1 (traceback: " in errors[0]
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_a_script_on_two_nodes_stops_on_usr1_is_requeued_and_resumes(cluster, tmp_path: Path) -> None:
    """`launcher run train.py` (tests/test_script.py's plain DDP script, which handles the signal named
    in LAUNCHER_STOP_SIGNAL itself) across the 2 fake nodes, waited for: USR1 mid-run, the script saves
    and exits 75, rank 0 requeues the job, the second attempt resumes from the script's own checkpoint
    in the same run dir and ends with the weights of an uninterrupted 2-rank run. Beside it, a one-rank
    job of the same script that ignores the signal is killed launcher.signal_delay_s after it."""
    from conftest import same_weights
    from test_script import LOCAL, TRAIN, launcher_run

    script, ref, cut = tmp_path / "train.py", tmp_path / "ref", tmp_path / "cut"
    script.write_text(TRAIN)
    p = launcher_run([str(script), *LOCAL, f"run.dir={ref}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    deaf = tmp_path / "deaf"
    p = launcher_run([str(script), *SLURM, "launcher.signal_delay_s=3", "trainer.gpus=0", "trainer.nproc=1",
                      f"run.dir={deaf}", "--", "--sleep", "0.5", "--steps", "400", "--ignore-stop"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    cmd = [sys.executable, "-m", "launcher", "run", str(script), *SLURM, "launcher.wait=true", "trainer.gpus=0",
           "trainer.nproc=1", "trainer.nodes=2", f"run.dir={cut}", "--", "--sleep", "0.5"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (cut / "progress").exists() or int((cut / "progress").read_text() or 0) < 3:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    job, deaf_job = _job_id_of(cut), _job_id_of(deaf)
    while not (deaf / "progress").exists():
        assert time.monotonic() < deadline, _sacct_states(deaf_job)
        time.sleep(0.2)
    for j in (job, deaf_job):
        subprocess.run(["scancel", "--signal=USR1", j], check=True)  # what SLURM does before the time limit
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert f"job {job} completed" in err
    assert _sacct_states(job)[0] == "REQUEUED"
    logs = [(cut / "logs" / f"rank-{r}.log").read_text() for r in (0, 1)]
    assert "attempt 0, args ['--sleep', '0.5'] on node n1" in logs[0] and "on node n2" in logs[1], logs
    stops = [[ln for ln in log.splitlines() if ln.startswith("stopped at step")] for log in logs]
    assert stops[0] and stops[0] == stops[1], logs
    assert "attempt 1" in logs[0] and "resumed from step" in logs[0], logs[0]
    same_weights(ref / "final.pt", cut / "final.pt")
    while "FAILED" not in _sacct_states(deaf_job):
        assert time.monotonic() < deadline + 120, _sacct_states(deaf_job)
        time.sleep(0.5)
    assert ("launcher: rank 0 did not stop within launcher.signal_delay_s=3 s of SIGUSR1: killed, as SLURM ends a "
            "job at its time limit") in (deaf / "logs" / "rank-0.log").read_text()
    assert not (deaf / "final.pt").exists() and "REQUEUED" not in _sacct_states(deaf_job)


def _job_id_of(run_dir: Path) -> str:
    """The job of a `launcher run` on SLURM, from its submission folder (RUN_DIR/slurm/<job id>/)."""
    return next(d.name for d in (run_dir / "slurm").iterdir() if d.name.isdigit())
