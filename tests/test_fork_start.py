"""CPU ranks start from a fork server, never forked from the threaded launcher (issue 22, items 1
and 8): who forks them, that they end with the launcher however it ends, SIGTERM's one line, and
20 consecutive starts of 8 ranks on this machine's cores, none hung (before the fix 3 of 22 hung: 20 starts
would catch that rate 19 times in 20; 30 took 150 s of CI's 30 minutes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUIET, cli_env, wait_until

LINREG = ["recipe=linreg", "trainer.gpus=0", "trainer.summary=false", *QUIET]
INTERRUPTED = ("launcher: interrupted by SIGTERM; the run stopped (run the same command to continue it from its "
               "last checkpoint)")


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    # a session of its own: whatever is left of a run (server, ranks) can be ended as one group
    return subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _rank_pid(run_dir: Path, rank: int) -> int | None:
    """From the first line a rank writes to its log (`..., pid N`); None before it is there."""
    log = run_dir / "logs" / f"rank-{rank}.log"
    lines = [ln for ln in log.read_text().splitlines() if ", pid " in ln] if log.exists() else []
    return int(lines[-1].rsplit(", pid ", 1)[1]) if lines else None


def _status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    raise KeyError(field)


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _alive(pid: int) -> bool:
    try:
        return _status(pid, "State")[0] != "Z"  # a zombie has ended; only its exit status is left
    except (FileNotFoundError, ProcessLookupError):
        return False


def _end(proc: subprocess.Popen) -> None:
    """Whatever a failed test left running: the launcher's whole session."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _running_two_ranks(tmp_path: Path) -> tuple[subprocess.Popen, Path, list[int]]:
    run_dir = tmp_path / "r"
    proc = _start([*LINREG, "trainer.nproc=2", "trainer.max_epochs=100000", f"run.dir={run_dir}"], tmp_path)
    wait_until(lambda: None not in (_rank_pid(run_dir, 0), _rank_pid(run_dir, 1)), proc, "both ranks' first log lines")
    return proc, run_dir, [_rank_pid(run_dir, r) for r in (0, 1)]  # type: ignore[misc]


def test_cpu_ranks_are_forked_by_a_one_thread_server_not_by_the_launcher(tmp_path: Path) -> None:
    proc, _, ranks = _running_two_ranks(tmp_path)
    try:
        assert _threads(proc.pid) > 1, "the launcher runs threads (elastic's, the store's): why it must not fork"
        for pid in ranks:
            server = int(_status(pid, "PPid"))
            assert server != proc.pid, f"rank {pid} was forked by the launcher, a process with threads"
            assert int(_status(server, "PPid")) == proc.pid, "the ranks' parent is the launcher's own child"
            assert "multiprocessing.forkserver" in Path(f"/proc/{server}/cmdline").read_text()
            # one thread whenever it forks: OpenBLAS's parked worker (numpy) is stopped by its atfork
            # handler before each fork, and nothing in the server computes to start it again
            assert _threads(server) == 1, f"the fork server runs {_threads(server)} threads"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        _end(proc)


def test_sigterm_at_n_ranks_says_the_one_line_and_exits_143(tmp_path: Path) -> None:
    proc, _, ranks = _running_two_ranks(tmp_path)
    try:
        time.sleep(1.0)  # training
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        _end(proc)
    assert proc.returncode == 143, err[-3000:]
    said = [ln for ln in err.splitlines() if not ln.startswith("[launcher] ")]  # rank 0's own epoch reports
    assert said == [INTERRUPTED], err[-3000:]  # not also elastic's "Received 15 death signal"
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in ranks), "ranks left running after SIGTERM"


def test_ranks_and_server_end_when_the_launcher_is_killed_outright(tmp_path: Path) -> None:
    # SIGKILL to the launcher alone: its ranks' parent is the server, which must end with the launcher
    # (every rank closes its copy of the server's "alive" pipe), and the ranks with the server
    # (PR_SET_PDEATHSIG), or they would go on training in the run directory
    proc, _, ranks = _running_two_ranks(tmp_path)
    server = int(_status(ranks[0], "PPid"))
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in [server, *ranks]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server), "the fork server outlived the launcher"
        assert not any(_alive(p) for p in ranks), "ranks left running after the launcher was killed"
        # nothing more said once the launcher is gone (multiprocessing's resource tracker, which removes
        # the dead launcher's semaphores, would warn of them on the same stderr)
        _, err = proc.communicate(timeout=60)
        assert [ln for ln in err.splitlines() if not ln.startswith("[launcher] ")] == [], err[-3000:]
    finally:
        for pid in [server, *ranks]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


PROBE = """
import os, sys

def loaded(queue):
    # what a child of the fork server finds imported at its start, and its parent's threads
    names = ("torch", "launcher.launch.worker", "torchmetrics", "torch._dynamo", "matplotlib.pyplot")
    queue.put(({n: n in sys.modules for n in names}, len(os.listdir(f"/proc/{os.getppid()}/task"))))
"""


@pytest.mark.parametrize("env_set, dynamo", [({}, True), ({"DATA_ROOT": "/d"}, True),
                                             ({"TORCHINDUCTOR_CACHE_DIR": "/c"}, False)])
def test_the_server_preloads_what_ranks_import_and_dynamo_where_env_set_allows(tmp_path: Path, env_set: dict,
                                                                               dynamo: bool) -> None:
    # started early (the CLI's prestart) with the composed runs; hydra.job.env_set is applied to the
    # launcher only later, so dynamo, which reads TORCH* settings at import, is left to the ranks then
    (tmp_path / "probe_mod.py").write_text(PROBE)
    code = f"""
import multiprocessing as mp, sys
sys.path.insert(0, {str(tmp_path)!r})
from launcher import config as C
from launcher.launch import fork_server
import probe_mod
cfg = C.Config()
cfg.trainer.gpus, cfg.trainer.nproc = 0, 2
fork_server.prestart([(cfg, {env_set!r})])
ctx = mp.get_context(fork_server.START_METHOD)
q = ctx.SimpleQueue()
p = ctx.Process(target=probe_mod.loaded, args=(q,))
p.start(); print(q.get()); p.join()
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    loaded, server_threads = eval(p.stdout.strip())  # noqa: S307 - our own tuple's repr
    assert loaded == {"torch": True, "launcher.launch.worker": True, "torchmetrics": True, "torch._dynamo": dynamo,
                      "matplotlib.pyplot": False}, loaded  # torchmetrics without pyplot (slim_imports.py)
    assert server_threads == 1


def test_the_composition_is_not_forked_from_a_process_that_runs_threads(tmp_path: Path) -> None:
    # overlap.py forks Hydra's composition at the command's start, when the CLI has no thread yet; a
    # program that calls it with a thread running composes in-process instead (Hydra in this process)
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one usable CPU: the composition runs in-process anyway")
    args = [*LINREG, "trainer.max_epochs=1", f"run.dir={tmp_path / 'r'}"]
    code = ("import sys, threading, time\n"
            "{thread}"
            f"sys.argv = ['launcher', *{args!r}]\n"
            "from launcher.__main__ import recipe_run\nrecipe_run()\n"
            "print('hydra here:', 'hydra' in sys.modules)\n")
    for thread, expect in (("", "False"), ("threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n",
                                            "True")):
        p = subprocess.run([sys.executable, "-c", code.format(thread=thread)], cwd=tmp_path, env=cli_env(),
                           capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.strip().endswith(f"hydra here: {expect}"), p.stdout[-2000:]


# Each start of 8 ranks takes ~3 s on 2 idle cores, up to ~15 s beside other work; a start that
# hangs (issue 22) waits for trainer.dist_timeout_s (10.5 min). The starts are `launcher run` of a
# script that joins the group and all-reduces once: its ranks are forked by the same server and meet
# in the same TCPStore rendezvous as a recipe's (where the hang was), without the recipe's imports
# and training, which cost twice the time and are not what could hang here.
STARTS, START_TIMEOUT_S = 20, 90
JOIN = """import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == dist.get_world_size() == 8
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(STARTS * START_TIMEOUT_S + 60)
def test_twenty_starts_of_eight_cpu_ranks_none_hangs(tmp_path: Path) -> None:
    took = []
    (tmp_path / "join.py").write_text(JOIN)
    for i in range(STARTS):
        run_dir = tmp_path / f"r{i}"
        t0 = time.monotonic()
        proc = _start(["run", "join.py", "trainer.gpus=0", "trainer.nproc=8", f"run.dir={run_dir}"], tmp_path)
        try:
            _, err = proc.communicate(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _end(proc)  # the launcher, its server and its ranks: one session
            pytest.fail(f"start {i + 1} of {STARTS} hung (> {START_TIMEOUT_S} s; earlier starts took "
                        f"{', '.join(f'{s:.0f}' for s in took)} s)")
        took.append(time.monotonic() - t0)
        assert proc.returncode == 0, f"start {i + 1}: {err[-3000:]}"
        assert len(list((run_dir / "logs").glob("rank-*.log"))) == 8
    print(f"{STARTS} starts of 8 CPU ranks: {min(took):.1f}-{max(took):.1f} s, median {sorted(took)[STARTS // 2]:.1f} s")
