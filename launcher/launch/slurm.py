"""SLURM: submit through submitit (one task per rank), and be a rank inside an srun step.

Submission (`launcher=slurm` on a login node): check the topology against the partition, say what
is asked of SLURM, submit one job (or one job array for a -m sweep) whose tasks each run
`SlurmRank`: export the torch env from SLURM's, then the same worker as local runs.
Inside an allocation (`srun python -m launcher ...`, e.g. slurm/train.sbatch) nothing is submitted:
export_env() turns SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS and the node list into the
torch env and this process is one rank.

Requeue is ours, not submitit's: submitit's handler checkpoints inside the signal handler on rank 0
only, at any point of a step; launcher/launch/preempt.py instead agrees on a step across ranks first.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import config as C
from ..config import faults
from . import worker
from .script import failure_in_job_logs

log = logging.getLogger("launcher")
# every task's first code (see that file): the requeue signal is caught before seconds of imports
SIGNAL_FIRST = Path(__file__).with_name("signal_first.py")
# written by the batch script at the start of each attempt (a requeue appends to the same .err)
ATTEMPT_LINE = 'echo "launcher: attempt $((${SLURM_RESTART_COUNT:-0} + 1)) starts on $(hostname)" >&2'
_ATTEMPT = re.compile(r"(?m)^launcher: attempt \d+ starts on ")


# ---- inside an allocation -------------------------------------------------------------------------

def in_srun_step() -> bool:
    """A task of an srun step (SLURM_STEP_ID is set there, not in the batch script itself)."""
    return "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ


def _tasks_on_this_node() -> int:
    """Parse SLURM_STEP_TASKS_PER_NODE ("2(x3),1") for this node's task count."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "1")
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(os.environ.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else 1


def first_host(nodelist: str) -> str:
    """The first hostname of a SLURM node list ("n[1-2]" -> "n1"), as SLURM itself expands it."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.split():
        return out.stdout.split()[0]
    m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)  # no scontrol: the simple forms
    return (m.group(1) + (m.group(2) or "")) if m else nodelist


def export_env() -> None:
    """The torch env (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) of
    this srun task, exported by submitit's TorchDistributedEnvironment, then narrowed to the step.

    Overwrites: sbatch copies the submitting shell's env, which may hold stale values. The port is
    set from the job id before submitit reads it (its own pick is random per job, so two elements
    of an array could collide): the same on every task and after a requeue, distinct for array
    elements (consecutive job ids). submitit reads the job's task count and node list and assumes
    even tasks per node; an srun step may use fewer tasks or nodes than its allocation, and uneven
    ones, so SLURM's step values win where it gives them.
    """
    from submitit.helpers import TorchDistributedEnvironment  # the [slurm] extra; local runs never need it

    env = os.environ
    env["SUBMITIT_EXECUTOR"] = "slurm"  # also in an sbatch script's own srun: submitit must read SLURM's env
    env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    # one device per rank is chosen by LOCAL_RANK (dist.init), not by narrowing CUDA_VISIBLE_DEVICES
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if env.get("SLURM_STEP_NUM_TASKS"):
        env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    if env.get("SLURM_STEP_NODELIST"):
        env["MASTER_ADDR"] = first_host(env["SLURM_STEP_NODELIST"])
    env["LOCAL_WORLD_SIZE"] = str(_tasks_on_this_node())


class SlurmRank:
    """The callable submitit runs in every task: one rank of the run whose config is at config_path."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path

    def __call__(self) -> None:
        export_env()
        worker.run(C.load_resolved_config(self.config_path))


# ---- submission -------------------------------------------------------------------------------------

def sbatch_options() -> list[str]:
    """sbatch's long option names (from `sbatch --help`), to check launcher.sbatch keys by name."""
    out = subprocess.run(["sbatch", "--help"], capture_output=True, text=True)
    return sorted(set(re.findall(r"--([a-z][a-z0-9-]+)", out.stdout)))


def check_installed() -> None:
    """launcher=slurm needs submitit, to submit and inside an allocation alike."""
    if importlib.util.find_spec("submitit") is None:
        raise C.ConfigError("launcher", "slurm", "submitit is not installed", "pip install 'launcher[slurm]', or local")


def check(cfg: C.Config) -> None:
    """Parent-side checks of a SLURM submission: sbatch is there, extra keys exist, the topology fits."""
    lc: C.SlurmLauncherConfig = cfg.launcher
    if shutil.which("sbatch") is None:
        raise C.ConfigError("launcher", "slurm", "sbatch is not on PATH (not a SLURM login node?)", "local")
    valid = sbatch_options()
    for key in lc.sbatch:
        if key.replace("_", "-") not in valid:
            raise C.ConfigError(f"launcher.sbatch.{key}", lc.sbatch[key], "not an sbatch option", ", ".join(valid))
    tpn = C.ranks_per_node(cfg.trainer)
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c|%G", *(["-p", lc.partition] if lc.partition else [])],
                         capture_output=True, text=True)
    parts = [ln.split("|") for ln in out.stdout.split() if ln.count("|") == 3]
    if lc.partition and out.returncode == 0 and not parts:
        raise C.ConfigError("launcher.partition", lc.partition, "no such partition", _partitions())
    if not parts:
        return
    if not lc.partition:
        default = [p for p in parts if p[0].endswith("*")]
        parts = default or parts[:1]
    name, nodes, cpus = parts[0][0].rstrip("*"), int(parts[0][1]), int(re.sub(r"\D.*", "", parts[0][2]) or 0)
    if cfg.trainer.nodes > nodes:
        raise C.ConfigError("trainer.nodes", cfg.trainer.nodes, f"partition {name} has {nodes} node(s)", f"1..{nodes}")
    need = tpn * (lc.cpus_per_task or 1)
    if cpus and need > cpus:
        raise C.ConfigError("trainer.nproc" if not cfg.trainer.gpus else "launcher.cpus_per_task", need,
                            f"{tpn} task(s) x {lc.cpus_per_task or 1} CPU(s) per node, but partition {name} "
                            f"nodes have {cpus} CPUs", f"at most {cpus} CPUs per node")


def _partitions() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    return ", ".join(p.rstrip("*") for p in out.stdout.split()) or "(sinfo gave none)"


def describe(cfg: C.Config) -> str:
    lc: C.SlurmLauncherConfig = cfg.launcher
    tpn, g = C.ranks_per_node(cfg.trainer), cfg.trainer.gpus
    per = f"{tpn} task(s)/node, one per GPU ({g} GPU(s)/node)" if g else f"{tpn} CPU task(s)/node"
    return (f"{cfg.trainer.nodes} node(s) x {per} = {cfg.trainer.nodes * tpn} rank(s); "
            f"partition={lc.partition or '(default)'} time={lc.time_min} min account={lc.account or '-'} "
            f"qos={lc.qos or '-'}; SIG{lc.signal} {lc.signal_delay_s} s before the limit, "
            f"at most {lc.max_requeues} requeue(s)")


def executor(cfg: C.Config, folder: Path, job_name: str = "", umask: int = 0o022) -> Any:
    """submitit's executor for cfg; `umask`: the one the job runs with (the submission's own is
    stricter, see submit())."""
    import submitit  # the [slurm] extra: imported only when a job is submitted

    lc: C.SlurmLauncherConfig = cfg.launcher
    # the tasks start with the signal blocked (GNU env >= 8.31, where the node has it), so one that
    # comes while the interpreter starts waits for signal_first.py's handler instead of killing it
    env_block = f"env --block-signal={lc.signal}"
    block = f'LAUNCHER_BLOCK=$({env_block} true 2>/dev/null && echo "{env_block}")'
    python = f"$LAUNCHER_BLOCK {shlex.quote(sys.executable)} -u {shlex.quote(str(SIGNAL_FIRST))} {lc.signal}"
    ex = submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=lc.max_requeues, python=python)
    params: dict[str, Any] = dict(
        nodes=cfg.trainer.nodes, ntasks_per_node=C.ranks_per_node(cfg.trainer), time=lc.time_min,
        job_name=lc.job_name or job_name or Path(cfg.run.dir).name,
        setup=[ATTEMPT_LINE, f"umask {umask:04o}", block, *lc.setup],
        array_parallelism=lc.array_parallelism, signal_delay_s=lc.signal_delay_s,
        # our signal and our requeue (see the module docstring); later keys override submitit's lines
        additional_parameters={"signal": f"{lc.signal}@{lc.signal_delay_s}", "requeue": True, **dict(lc.sbatch)},
        # one failed task ends the step at once: survivors would otherwise wait in a collective
        srun_args=["--kill-on-bad-exit=1"],
    )
    if cfg.trainer.gpus:
        params["gpus_per_node"] = int(cfg.trainer.gpus)
    for key in ("partition", "account", "qos", "constraint", "cpus_per_task"):
        if getattr(lc, key) is not None:
            params[key] = getattr(lc, key)
    if lc.mem_gb is not None:
        params["mem"] = f"{int(lc.mem_gb * 1024)}M"
    ex.update_parameters(**params)
    return ex


def submit(cfgs: list[C.Config], folder: Path) -> list[Any]:
    """One job per config, as one job array per distinct set of SLURM resources (a sweep over
    trainer.gpus or launcher.time_min needs several); the jobs, in the configs' order.

    The submission folder is the owner's alone (0700; the sbatch script and pickles in it 0600):
    they hold the setup lines and the whole config, which may carry secrets or commands."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    # what submitit writes is private from its first byte; sbatch hands its umask to the job,
    # so the job's setup puts the user's own back (checkpoints and metrics keep their usual modes)
    umask = os.umask(0o077)
    try:
        return _submit(cfgs, folder, umask)
    finally:
        os.umask(umask)


def _submit(cfgs: list[C.Config], folder: Path, umask: int) -> list[Any]:
    # a sweep's points are named after the sweep (their run dirs are sweep/0, sweep/1, ...)
    name = Path(cfgs[0].run.dir).parent.name if len(cfgs) > 1 else ""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(repr(sorted(executor(cfg, folder, name, umask).parameters.items())), []).append(i)
    jobs: list[Any] = [None] * len(cfgs)
    for members in groups.values():
        ex = executor(cfgs[members[0]], folder, name, umask)
        tasks = [SlurmRank(str(Path(cfgs[i].run.dir) / "config.yaml")) for i in members]
        if len(tasks) == 1:
            jobs[members[0]] = ex.submit(tasks[0])
            continue
        with ex.batch():
            for i, task in zip(members, tasks):
                jobs[i] = ex.submit(task)
    return jobs


def report(cfgs: list[C.Config], jobs: list[Any]) -> None:
    for cfg, job in zip(cfgs, jobs):
        print(f"launcher: submitted job {job.job_id}; run dir {cfg.run.dir}\n"
              f"launcher: logs {job.paths.folder}/{job.job_id}_<rank>_log.out and .err "
              f"(training log: {cfg.run.dir}/logs/rank-<rank>.log)", file=sys.stderr)


# srun's line for each task that ended badly, in the order srun learned of it, in the batch
# script's stderr: "srun: error: n1: task 1: Killed", "srun: error: n2: tasks 0-3: Exited with exit code 1"
_TASK_END = re.compile(r"(?m)^srun: error: (\S+): tasks? ([\d,-]+): (.+?)\s*$")
_SIGNALS = {signal.strsignal(s): s for s in signal.Signals if signal.strsignal(s)}  # "Killed" -> SIGKILL


def _rank_tracebacks(folder: Path, job_id: str) -> list[tuple[int, Path, str]]:
    """(rank, log file, its last traceback) for every rank whose stderr log holds one."""
    found = []
    for path in sorted(folder.glob(f"{job_id}_*_log.err")):
        rank = int(path.name[len(job_id) + 1:].split("_")[0])
        # torch prefixes an uncaught exception's lines with "[rankN]: "
        text = re.sub(r"(?m)^\[rank\d+\]: ", "", path.read_text(errors="replace"))
        start = text.rfind("Traceback (most recent call last)")
        if start >= 0:
            lines = text[start:].splitlines()
            end = next((i for i, ln in enumerate(lines) if i and not ln.startswith((" ", "Traceback"))), 0)
            found.append((rank, path, "\n".join(lines[: end + 1][-40:])))
    return found


def _task_ends(folder: Path, job_id: str) -> list[tuple[list[int], str, str]]:
    """(ranks, node, how) for each of srun's task-end lines of the job's last attempt, in order."""
    path = folder / f"{job_id}_0_log.err"  # the batch script's stderr (rank 0's too): srun writes there
    text = path.read_text(errors="replace") if path.is_file() else ""
    attempts = list(_ATTEMPT.finditer(text))
    text = text[attempts[-1].end():] if attempts else text
    ends = []
    for m in _TASK_END.finditer(text):
        ranks = [r for part in m.group(2).split(",") if part
                 for r in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]
        ends.append((ranks, m.group(1), m.group(3)))
    return ends


def _how(srun_says: str) -> str:
    """srun's "Killed" / "Exited with exit code 3" as the local launcher says it."""
    m = re.fullmatch(r"Exited with exit code (\d+)", srun_says)
    if m:
        return f"exited with code {m.group(1)}"
    sig = _SIGNALS.get(srun_says.replace(" (core dumped)", ""))
    return f"was killed by signal {int(sig)} ({sig.name})" if sig else f"ended: {srun_says}"


def failure_report(folder: Path, job_id: str, fallback: str) -> str:
    """The failed job's cause, first: the rank srun saw end first (killed by a signal, or exiting
    nonzero), skipping ranks that only lost their connection to it; then the tracebacks that are
    not such consequences."""
    tracebacks = _rank_tracebacks(folder, job_id)
    secondary = {r for r, _, tb in tracebacks if faults.lost_peer(tb)}
    ends = [(r, node, how) for ranks, node, how in _task_ends(folder, job_id) for r in ranks]
    cause = next((e for e in ends if e[0] not in secondary), ends[0] if ends else None)
    shown = [t for t in tracebacks if t[0] not in secondary] or (tracebacks if cause is None else [])
    if cause is not None:
        rank = cause[0]
        shown.sort(key=lambda t: t[0] != rank)  # the cause's own traceback first
        head = (f"launcher: job {job_id} failed: rank {rank} {_how(cause[2])} on node {cause[1]} "
                f"(srun: task {rank}: {cause[2]})")
    else:
        head = f"launcher: job {job_id} failed"
    lines = [head + ("; the ranks' errors:" if shown else "")]
    lines += [f"--- rank {r} ({path}):\n{tb}" for r, path, tb in shown]
    lost = sorted(secondary - {t[0] for t in shown})
    if lost:
        lines.append(f"(then rank{'s' * (len(lost) > 1)} {', '.join(map(str, lost))} failed on the lost "
                     f"connection: a consequence, not shown; logs in {folder})")
    elif cause is None and not shown:
        lines.append(fallback)
    return "\n".join(lines)


def _until_ended(job_id: str, poll_s: float, limit_s: float = 60) -> None:
    """submitit calls a job done once rank 0's result file exists; srun writes its task-end lines
    after that, as the step ends: wait until SLURM has the job out of its queue (bounded)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
        if out.returncode or not out.stdout.strip():  # an unknown id: ended and purged
            return
        time.sleep(poll_s)


def wait(jobs: list[Any], poll_s: float) -> int:
    """Block until the jobs end; 0 when all completed, 2 when a job failed on the user's error (one
    line), else 1 with each failure's cause and log tail."""
    from submitit.core.utils import FailedJobError, UncompletedJobError  # the [slurm] extra

    for job in jobs:
        while not job.done():
            time.sleep(poll_s)
    code = 0
    for job in jobs:
        try:
            job.results()
        except (FailedJobError, UncompletedJobError) as e:
            folder = Path(job.paths.folder)
            if said := failure_in_job_logs(folder, str(job.job_id)):  # a `launcher run` script's end
                print(f"launcher: error: job {job.job_id}: {said}", file=sys.stderr)
                code = code or 2
                continue
            tracebacks = _rank_tracebacks(folder, str(job.job_id))
            mine = [(path, m.group(1)) for _, path, tb in tracebacks
                    if (m := re.search(r"(?m)^launcher\.config(?:\.errors)?\.(?:User|Config)Error: (.*)$", tb))]
            if mine:  # the user's (recipe, data, arguments): one line, once, as a local run gives it
                print(f"launcher: error: job {job.job_id}: {mine[0][1]} (traceback: {mine[0][0]})", file=sys.stderr)
                code = code or 2
                continue
            code = 1
            _until_ended(str(job.job_id), min(poll_s, 0.5))
            print(failure_report(folder, str(job.job_id), str(e)), file=sys.stderr)
        else:
            print(f"launcher: job {job.job_id} completed", file=sys.stderr)
    return code
