"""launcher=ray against a real Ray cluster on this machine: a head and a second node
(ray.cluster_utils.Cluster, one CPU each, so two one-CPU ranks cannot share a node), the real CLI
in a subprocess. Two ranks on two Ray nodes train exactly as two local ranks do; a killed rank
and a lost node restart the group, which resumes bitwise; a run without an address starts its own
Ray instance and stops it; a cluster too small is one line and exit 2 with nothing written.

The ranks run FaultyLinear (tests/support/faulty.py): with FAULT_STEP=5, rank 1 sleeps forever at
the 5th training forward of its process, so a kill after the checkpoint of step 3 (then of step 6)
never races the end of the run; the last attempt, from step 6 or 7, reaches step 10 in 4 steps or
fewer. Without FAULT_STEP set low the fault never fires.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import QUIET, cli_env, wait_for_file
from conftest import rows as _rows

pytest.importorskip("ray", reason="ray is not installed: pip install 'launcher[ray]' (or '.[dev]')")

NEVER = str(10**9)
HANG_AT = "5"  # each attempt's 5th step (7 steps an epoch: 280 samples / (2 ranks x 20))
COMMON = ["recipe=linreg", "model._target_=faulty.FaultyLinear", "trainer.gpus=0", "trainer.max_steps=10",
          "checkpoint.every_n_steps=3", *QUIET]
# the test's FAULT_* variables reach the ranks through launcher.env, as a user's own would
RAY = ["launcher=ray", "launcher.env=[PYTHONPATH,OMP_NUM_THREADS,FAULT_*]"]


def _env(fault_step: str = NEVER) -> dict[str, str]:
    env = cli_env(OMP_NUM_THREADS="1", FAULT_MODE="hang", FAULT_RANK="1", FAULT_STEP=fault_step)
    env.pop("RAY_ADDRESS", None)  # "no address" must mean a Ray instance of the run's own
    return env


def _cli(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _popen(args: list[str], cwd: Path, fault_step: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=cwd, env=_env(fault_step),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _same_run(ref: Path, run_dir: Path) -> None:
    """Bitwise: the final weights and every metrics row."""
    wa, wb = torch.load(ref / "model.pt", weights_only=True), torch.load(run_dir / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"
    assert _rows(run_dir) == _rows(ref)


def _rank_pid(run_dir: Path, rank: int) -> int:
    lines = [ln for ln in (run_dir / "logs" / f"rank-{rank}.log").read_text().splitlines() if ", pid " in ln]
    return int(lines[-1].rsplit(", pid ", 1)[1])


def _raylets() -> set[int]:
    """Pids of the raylets on this machine (one per Ray node)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"/raylet/raylet" in (entry / "cmdline").read_bytes().split(b"\0")[0]:
                found.add(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def cluster() -> Any:
    """A head and a second node, one CPU each, shared by the module's tests."""
    from ray.cluster_utils import Cluster

    # a lost node declared dead in about a second (Ray's default: 15 s), so that its bundle moves soon
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_timeout_ms": 500,
              "health_check_failure_threshold": 2}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "_system_config": health})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same training on 2 local ranks (elastic), uninterrupted."""
    tmp = tmp_path_factory.mktemp("local")
    p = _cli([*COMMON, "trainer.nproc=2", f"run.dir={tmp / 'ref'}"], cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "ref"


@pytest.mark.slow
def test_two_ranks_on_two_ray_nodes_match_two_local_ranks_bitwise(cluster: Any, reference: Path,
                                                                  tmp_path: Path) -> None:
    run_dir = tmp_path / "ray"
    p = _cli([*COMMON, *RAY, f"launcher.address={cluster.address}", "trainer.nodes=2", "trainer.nproc=1",
              f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    _same_run(reference, run_dir)
    for rank in (0, 1):  # one rank per node (STRICT_SPREAD; one CPU per node cannot hold two anyway)
        assert f"rank {rank} of 2 (local rank 0)" in (run_dir / "logs" / f"rank-{rank}.log").read_text()


def _rank_nodes(cluster: Any, run_dir: Path) -> dict[int, Any]:
    """rank -> the worker node (not the head) whose raylet started that rank's process."""
    import ray._private.ray_constants as rc

    raylets = {n.all_processes[rc.PROCESS_TYPE_RAYLET][0].process.pid: n for n in cluster.worker_nodes}
    parents = {r: int((Path("/proc") / str(_rank_pid(run_dir, r)) / "stat").read_text().rsplit(")", 1)[1].split()[1])
               for r in (0, 1)}
    return {r: raylets[p] for r, p in parents.items() if p in raylets}


@pytest.mark.slow
def test_a_killed_rank_then_a_lost_node_restart_the_group_which_resumes_bitwise(cluster: Any, reference: Path,
                                                                                 tmp_path: Path) -> None:
    cluster.add_node(num_cpus=1)  # where the lost node's rank goes: the module keeps two nodes after
    run_dir = tmp_path / "faults"
    proc = _popen([*COMMON, *RAY, f"launcher.address={cluster.address}", "trainer.nodes=2", "trainer.nproc=1",
                   "launcher.max_restarts=2", f"run.dir={run_dir}"], tmp_path, fault_step=HANG_AT)
    # attempt 1: rank 1 sleeps at step 5; rank 0 dies, and rank 1 would never notice: the launcher stops it
    wait_for_file(run_dir / "checkpoints" / "step-0000003" / "manifest.json", proc)
    os.kill(_rank_pid(run_dir, 0), signal.SIGKILL)
    # attempt 2 resumes from step 3; rank 1 sleeps at step 8; a node holding a rank goes, as a preempted one would
    wait_for_file(run_dir / "checkpoints" / "step-0000006" / "manifest.json", proc)
    lost, node = next(iter(_rank_nodes(cluster, run_dir).items()))
    cluster.remove_node(node, allow_graceful=False)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]  # attempt 3: from step 6 (or 7) to 10
    err = proc.stderr.read()
    assert "rank 0 was lost (its Ray actor died: its worker process has died); restarting" in err, err
    assert "restart 1 of launcher.max_restarts=2" in err and "restart 2 of launcher.max_restarts=2" in err, err
    assert f"rank {lost} was lost (its Ray actor" in err.split("restart 1 of")[1], err
    assert (run_dir / "logs" / "rank-0.log").read_text().count("resumed from") == 2
    _same_run(reference, run_dir)


@pytest.mark.slow
def test_without_an_address_the_run_starts_its_own_ray_instance_and_stops_it(cluster: Any, reference: Path,
                                                                             tmp_path: Path) -> None:
    before = _raylets()
    run_dir = tmp_path / "own"
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *COMMON, *RAY, "trainer.nproc=2", f"run.dir={run_dir}"], cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    while proc.poll() is None:
        seen |= _raylets() - before
        time.sleep(0.2)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    assert len(seen) == 1, f"raylets started by the run: {seen} (the module's cluster: {before})"
    deadline = time.monotonic() + 10
    while _raylets() & seen and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _raylets() & seen, "the run's Ray instance was left running"
    assert _raylets() >= before, "the cluster the run did not start was stopped"
    _same_run(reference, run_dir)


@pytest.mark.slow
def test_a_script_on_two_ray_nodes_equals_two_local_ranks_and_its_stop_restarts_it(cluster: Any,
                                                                                    tmp_path: Path) -> None:
    """`launcher run train.py` (tests/test_script.py's plain DDP script) as 2 Ray actors on 2 nodes,
    with a stop on the first attempt (the script exits 75 after step 4, as on its stop signal): the
    group restarts (launcher.max_restarts=1), attempt 1 resumes from the script's own checkpoint, and
    the weights equal 2 local ranks' uninterrupted."""
    from conftest import same_weights
    from test_script import LOCAL, TRAIN, launcher_run

    script, ref, run_dir = tmp_path / "train.py", tmp_path / "ref", tmp_path / "ray"
    script.write_text(TRAIN)
    p = launcher_run([str(script), *LOCAL, f"run.dir={ref}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "launcher", "run", str(script), *RAY, f"launcher.address={cluster.address}",
                        "trainer.gpus=0", "trainer.nodes=2", "trainer.nproc=1", "launcher.max_restarts=1",
                        f"run.dir={run_dir}", "--", "--stop-at", "4"], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    log = (run_dir / "logs" / "rank-1.log").read_text()
    assert "rank 1 of 2, attempt 0" in log and "stopped at step 4" in log and "rank 1 of 2, attempt 1" in log, log
    assert "resumed from step 4" in (run_dir / "logs" / "rank-0.log").read_text()
    same_weights(ref / "final.pt", run_dir / "final.pt")


def test_a_cluster_too_small_is_one_line_exit_2_and_writes_nothing(cluster: Any, tmp_path: Path) -> None:
    # address=auto: the cluster `ray start` (here: the fixture's Cluster) recorded on this machine
    p = _cli([*COMMON, *RAY, "launcher.address=auto", "trainer.nodes=2", "trainer.nproc=1", "launcher.cpus_per_rank=2",
              f"run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=60)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0] == ("launcher: error: launcher.cpus_per_rank=2.0: 2 node(s) x 1 rank(s), 2 CPU per node, "
                        "STRICT_SPREAD: the Ray cluster's 2 node(s) have 1 CPU; 1 CPU; valid: <= 1, fewer ranks "
                        "(trainer.nproc, trainer.nodes), or a bigger cluster"), lines[0]
    assert list(tmp_path.iterdir()) == [], "nothing may be written"


def _topology(nodes: int, per_node: int, cpus: float = 1.0, gpus: int = 0, strategy: str = "STRICT_SPREAD") -> Any:
    from launcher.launch.ray_cluster import Topology

    return Topology(nodes, per_node, cpus, gpus, strategy)


@pytest.mark.parametrize("t,nodes,field,valid", [
    (_topology(2, 1), [{"CPU": 1}, {"CPU": 1}], None, ""),
    (_topology(3, 1), [{"CPU": 8}, {"CPU": 8}], "trainer.nodes", "valid: 1..2"),
    (_topology(2, 4, cpus=1, gpus=1), [{"CPU": 8, "GPU": 8}, {"CPU": 8, "GPU": 2}], "trainer.gpus", "fewer GPU ranks"),
    (_topology(2, 2, cpus=2), [{"CPU": 3}, {"CPU": 8}], "launcher.cpus_per_rank", "valid: <= 1.5,"),
    (_topology(2, 2, cpus=2, strategy="PACK"), [{"CPU": 8}, {"CPU": 2}], None, ""),  # both bundles on one node
    (_topology(2, 2, cpus=2, strategy="STRICT_PACK"), [{"CPU": 6}, {"CPU": 6}], "launcher.cpus_per_rank", "<= 1.5"),
])
def test_the_topology_check_names_the_field_to_change(t: Any, nodes: list[dict[str, float]], field: str,
                                                      valid: str) -> None:
    from launcher.launch.ray_cluster import misfit

    problem = misfit(t, nodes)
    assert (problem is None) == (field is None), problem
    if problem is not None:
        assert problem.key == field and valid in str(problem), str(problem)


@pytest.mark.parametrize("field,value,expected", [
    ("address", "http://head:8265", "launcher.address='http://head:8265': not a Ray address; valid: unset"),
    ("cpus_per_rank", 0, "launcher.cpus_per_rank=0: must be > 0"),
    ("placement_strategy", "spread", "launcher.placement_strategy='spread': unknown choice; valid: auto, STRICT_SPREAD"),
    ("placement_timeout_s", 0, "launcher.placement_timeout_s=0: must be > 0 seconds"),
    ("max_restarts", -1, "launcher.max_restarts=-1: must be an integer >= 0"),
])
def test_bad_ray_settings_name_the_field(field: str, value: Any, expected: str) -> None:
    import dataclasses

    from launcher.config import ConfigError, check_launcher
    from launcher.config.launchers import RayLauncherConfig

    check_launcher(RayLauncherConfig(), nodes=2)  # the defaults pass
    with pytest.raises(ConfigError) as e:
        check_launcher(dataclasses.replace(RayLauncherConfig(), **{field: value}), nodes=2)
    assert expected in str(e.value)


def test_an_address_where_no_cluster_answers_is_one_line_at_once() -> None:
    from launcher.config import ConfigError
    from launcher.config.launchers import RayLauncherConfig
    from launcher.launch.ray import Session

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"launcher.address='127.0.0.1:9': nothing answers there"):
        Session(RayLauncherConfig(address="127.0.0.1:9"))  # (Ray itself would retry for minutes)
    assert time.monotonic() - t0 < 10


def test_the_other_launchers_never_import_ray() -> None:
    # launch/ray.py itself too: only starting the ranks imports ray (without it: one line from the CLI's checks)
    code = ("import sys, launcher.__main__, launcher.launch.start, launcher.launch.local, launcher.launch.slurm, "
            "launcher.launch.worker, launcher.launch.ray_cluster, launcher.launch.ray; from launcher import config; "
            "config.check_launcher(config.LAUNCHER_SCHEMAS['ray'](), 1); assert 'ray' not in sys.modules, 'ray imported'")
    p = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_readme_cluster_commands_work_with_token_authentication(tmp_path: Path) -> None:
    """docs/ray.md's cluster commands as a user types them, on a machine where a run's own Ray instance left
    ~/.ray/auth_token (so `ray start --head` turns token authentication on): without RAY_AUTH_MODE=token
    a join by address is one line naming it, exit 2, nothing written; with it the run trains."""
    import ray

    ray_cli = str(Path(sys.executable).parent / "ray")
    home = tmp_path / "home"
    home.mkdir()
    short = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must fit in 107 bytes
    env = {**_env(), "HOME": str(home), "RAY_TMPDIR": str(short)}  # this test's own ~/.ray and /tmp/ray
    token = {**env, "RAY_AUTH_MODE": "token"}
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=token, capture_output=True, check=True, timeout=60)
    port = _free_port()
    with open(tmp_path / "head.log", "w") as log:  # `ray start --block`: ends (with its processes) on SIGTERM
        head = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                                 f"--ray-client-server-port={_free_port()}", "--disable-usage-stats", "--block"],
                                env=token, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.2)
        address = f"{ray.util.get_node_ip_address()}:{port}"
        args = [sys.executable, "-m", "launcher", *COMMON, *RAY, f"launcher.address={address}", "trainer.nproc=2"]

        p = subprocess.run([*args, f"run.dir={tmp_path / 'refused'}"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
        assert lines[0] == (f"launcher: error: launcher.address='{address}': the Ray cluster there uses token "
                            "authentication and refused this process (RAY_AUTH_MODE is unset); valid: RAY_AUTH_MODE=token "
                            "with the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN) where this runs; or a "
                            "cluster started with RAY_AUTH_MODE=disabled (docs/ray.md)"), lines[0]
        assert not (tmp_path / "refused").exists()

        p = subprocess.run([*args, f"run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=token, capture_output=True,
                           text=True, timeout=180)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        assert [int(r["step"]) for r in _rows(tmp_path / "run")][-1] == 10
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # its session: the Ray processes this test started
            head.wait()
        shutil.rmtree(short, ignore_errors=True)
