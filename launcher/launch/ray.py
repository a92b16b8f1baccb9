"""Ranks as Ray actors: one actor per rank, placed by a placement group, each running the worker.

    python -m launcher recipe=mnist launcher=ray trainer.gpus=0 trainer.nproc=2     # a Ray instance for this run
    export RAY_AUTH_MODE=token; ray get-auth-token --generate   # on every machine, the head's token (docs/ray.md)
    ray start --head    # then, on every other node: ray start --address=HEAD:6379
    python -m launcher recipe=mnist launcher=ray launcher.address=auto trainer.gpus=8 trainer.nodes=4
    ray job submit --address http://HEAD:8265 -- python -m launcher recipe=mnist launcher=ray trainer.nodes=4

Actors and a placement group rather than Ray Train's TorchTrainer: TorchTrainer initialises the
process group itself, checkpoints through its own storage (train.report / get_checkpoint) and
restarts through FailureConfig into its own trial directories. The launcher's contracts put all
three elsewhere: dist.py is the one caller of init_process_group, the run directory holds the
checkpoints and decides the resume point, and worker.run is the same entry on every backend. So,
like launch/local.py and launch/slurm.py, this module only makes the rank processes and their
torch env, with Ray's own pieces: a placement group reserves one bundle per node (STRICT_SPREAD:
each on its own Ray node), one actor per rank is scheduled into its node's bundle, `ray.wait`
watches them, `ray.kill` stops a group. A rank lost (its actor died: killed, out of memory, its
node preempted) or failed ends the group's attempt; up to launcher.max_restarts new groups start
in the same placement group (Ray re-places the bundles of a lost node on another) and resume from
the latest complete checkpoint, as elastic's restarts do. Ray's per-actor max_restarts is not used:
one restarted actor cannot rejoin a process group whose peers wait in a collective.

This process (the Ray driver) owns the run directory as for a local run: it locks it, writes the
resolved config and hands that to the ranks. The run directory must be on a filesystem every node
sees. `ray` is imported inside functions only: the other launchers never load it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from .. import config as C
from ..config import faults
from ..config.launchers import RayLauncherConfig
from ..rundir.lock import LOCK_ENV
from .ray_cluster import Topology, join_error, misfit, native_stderr_held, probe

# after a rank's error that only says it lost a peer: how long the others get to report the cause
LOST_PEER_GRACE_S = 3.0
SCRIPT_MARK = "launcher-script: "  # before a script rank's failure line, as an actor returns it


class Session:
    """The Ray cluster the runs of one command use: joined, or a local instance started here and
    stopped by close()."""

    def __init__(self, lc: RayLauncherConfig) -> None:
        import ray

        # unset: $RAY_ADDRESS (how `ray job submit` hands its driver the cluster), else a new instance
        # ("local": never a `ray start` cluster that happens to run on this machine; that is `auto`)
        self.field = "launcher.address" if lc.address or not os.environ.get("RAY_ADDRESS") else "env RAY_ADDRESS"
        self.address = lc.address or os.environ.get("RAY_ADDRESS") or "local"
        self.started = self.address == "local"
        probe(self.field, self.address)
        # ray.init installs its own SIGTERM handler: the CLI's (SIGTERM as an exception) must stay
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        extra = {"include_dashboard": False} if self.started else {}  # a run's own instance: ~1 s less
        if not sys.stderr.isatty():  # the ranks' lines Ray forwards: no colour codes in a log file
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        try:
            # Ray's own notices (token auth, temp dirs...) at ERROR only: a user's error stays one line; the
            # session's logs (/tmp/ray/session_latest/logs) keep everything. The ranks' lines still come through.
            with contextlib.nullcontext() if self.started else native_stderr_held():
                ray.init(address=self.address, logging_level=logging.ERROR, log_to_driver=True, **extra)
        except Exception as e:  # noqa: BLE001 - joining: whatever refuses us (nobody there, a token, versions)
            if self.started:  # starting our own: not the user's doing, keep the traceback
                raise
            raise join_error(self.field, self.address, e) from None
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)

    def close(self) -> None:
        import ray

        ray.shutdown()  # a local instance stops with its driver; a joined cluster goes on

    def check(self, cfg: C.Config) -> None:
        """The cluster can hold the ranks: one line naming the field to change, before anything starts."""
        import ray

        if cfg.trainer.accelerator == "xla":
            raise C.ConfigError("launcher", "ray", "XLA processes start through torch_xla.launch", "local")
        if not cfg.launcher.check_resources:
            return
        problem = misfit(Topology.of(cfg), [n["Resources"] for n in ray.nodes() if n["Alive"]])
        if problem is not None:
            raise problem

    def launch(self, cfg: C.Config) -> int:
        """Run the ranks of the prepared run in cfg.run.dir; returns the exit code (a user's error raises)."""
        from ray.util.placement_group import placement_group, remove_placement_group

        t = Topology.of(cfg)
        pg = placement_group([t.bundle()] * t.nodes, strategy=t.strategy, name=f"launcher-{cfg.run.id}")
        # A joined cluster's ranks start from their node's env: launcher.env says what they take from
        # this one. A Ray instance started here has this whole env already (its raylet inherited it),
        # and actors with no runtime_env of their own start sooner (Ray's prestarted workers, no agent).
        env = None if self.started else \
            {k: v for k, v in os.environ.items() if any(fnmatch.fnmatchcase(k, p) for p in cfg.launcher.env)}
        try:
            with _signal_named():
                return _attempts(cfg, t, pg, env)
        finally:
            remove_placement_group(pg)


def _attempts(cfg: C.Config, t: Topology, pg: Any, env: Optional[dict[str, str]]) -> int:
    """Up to 1 + launcher.max_restarts groups of ranks, each from the latest checkpoint; the exit code."""
    lc = cfg.launcher
    for attempt in range(lc.max_restarts + 1):
        started = _start(t, pg, env, lc.placement_timeout_s)
        if isinstance(started, str):  # the ranks' processes cannot start: the same on every attempt
            print(f"launcher: the ranks could not start: {started}", file=sys.stderr)
            return 1
        if started is None:
            if attempt == 0:
                raise C.ConfigError("launcher.placement_timeout_s", lc.placement_timeout_s,
                                    f"the Ray cluster did not place {t.describe()} in time (other work "
                                    "holds its resources? see `ray status`)", "a longer wait, or free nodes")
            print(f"launcher: the Ray cluster did not re-place the ranks within launcher.placement_timeout_s="
                  f"{lc.placement_timeout_s:g} s; run the same command to resume", file=sys.stderr)
            return 1
        failures = _run(cfg, t, started, attempt)
        if not failures:
            return 0
        cause = _cause(failures)
        if cause.user:
            log = Path(cfg.run.dir) / "logs" / f"rank-{cause.rank}.log"
            raise C.UserError(f"{cause.text} (traceback: {log})")
        what = f"rank {cause.rank} was lost ({cause.text})" if cause.died else \
            cause.text.split(" (its log")[0] if cause.script else f"rank {cause.rank} failed"
        if attempt < lc.max_restarts:
            print(f"launcher: {what}; restarting the ranks from the latest checkpoint (restart {attempt + 1} "
                  f"of launcher.max_restarts={lc.max_restarts})", file=sys.stderr)
            continue
        if cause.script:
            print(f"launcher: error: {cause.text}", file=sys.stderr)
            return 2
        print(f"launcher: {what}" + ("" if cause.died else f"; its error:\n{cause.text}"), file=sys.stderr)
        return 1
    return 1


@contextlib.contextmanager
def _signal_named() -> Iterator[None]:
    """SIGTERM as faults.Interrupted(SIGTERM), as everywhere in the CLI: a signal whose handler raises
    inside Ray's blocking calls (ray.wait) comes out of them as a bare KeyboardInterrupt."""
    seen: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise faults.Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt as e:
        if seen and not isinstance(e, faults.Interrupted):
            raise faults.Interrupted(seen[-1]) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait(refs: list[Any], deadline: float) -> bool:
    """All of refs are ready before the deadline; short waits, so that Ctrl-C and SIGTERM get through."""
    import ray

    while time.monotonic() < deadline:
        if len(ray.wait(refs, num_returns=len(refs), timeout=min(1.0, deadline - time.monotonic()))[0]) == len(refs):
            return True
    return False


Started = tuple[list[Any], str, int]  # the rank actors, rank 0's address and a free port there


def _start(t: Topology, pg: Any, env: Optional[dict[str, str]], timeout_s: float) -> Started | str | None:
    """One actor per rank in its node's bundle, each with the worker imported; None when the cluster
    does not place them within timeout_s, Ray's account when their processes cannot start.

    After a node is lost, Ray goes on placing its bundle there until its health checks declare it
    dead (seconds); actors sent there die unstarted. That is no attempt: they are placed again."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    deadline = time.monotonic() + timeout_s
    while _wait([pg.ready()], deadline):
        actor = ray.remote(_Rank)
        actors = [actor.options(num_cpus=t.cpus, num_gpus=t.gpus, runtime_env={"env_vars": env} if env else None,
                                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=node))
                  .remote(node * t.per_node + local, os.getcwd())
                  for node in range(t.nodes) for local in range(t.per_node)]
        refs = [a.address.remote() for a in actors]
        try:
            if _wait(refs, deadline):
                addr, port = ray.get(refs)[0]  # (every rank's: one that died unstarted raises)
                return actors, addr, port
        except RayActorError as e:
            if e.actor_init_failed:  # the rank's own code failed to load there (e.g. launcher not importable)
                _kill(actors)
                return str(e)
        _kill(actors)
        time.sleep(0.5)
    return None


def _kill(actors: list[Any]) -> None:
    import ray

    for a in actors:
        ray.kill(a, no_restart=True)


@dataclass
class _Failure:
    rank: int
    text: str  # the rank's traceback, a user's error line, or why its actor died
    died: bool = False  # the actor is gone (its process killed, its node lost)
    user: bool = False  # a UserError: the same on every attempt, so never restarted
    script: bool = False  # a `launcher run` script's end (text: its line): restarted as a failure, said as the user's


def _run(cfg: C.Config, t: Topology, started: Started, attempt: int) -> list[_Failure]:
    """One attempt of the started ranks, to its end; the failures seen (none: the run is done). The
    actors are killed on the way out, whatever happened (a hung peer of a lost rank included)."""
    actors, addr, port = started
    try:
        config, world, refs = C.to_dict(cfg), len(actors), {}
        for rank, a in enumerate(actors):
            node, local = divmod(rank, t.per_node)
            torch_env = {"MASTER_ADDR": addr, "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
                         "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(t.per_node), "GROUP_RANK": str(node),
                         "GROUP_WORLD_SIZE": str(t.nodes),
                         # run.restarted() reads the restart count by torchelastic's name (a restart resumes
                         # the run's own checkpoint whatever `resume` says); torch itself reads it only with
                         # TORCHELASTIC_USE_AGENT_STORE, which these ranks never have
                         "TORCHELASTIC_RESTART_COUNT": str(attempt),
                         # start.py holds the run dir's lock for these ranks: rank 0 must not take it again
                         **({LOCK_ENV: os.environ[LOCK_ENV]} if os.environ.get(LOCK_ENV) else {})}
            refs[a.run.remote(torch_env, config)] = rank
        return _watch(refs)
    finally:
        _kill(actors)


def _watch(refs: dict[Any, int]) -> list[_Failure]:
    """Wait for every rank; after the first failure, stop waiting as soon as its cause is known."""
    import ray
    from ray.exceptions import RayActorError, RayError, RayTaskError

    failures: list[_Failure] = []
    pending, deadline = list(refs), float("inf")
    while pending and time.monotonic() < deadline:
        # short waits: Ctrl-C and SIGTERM reach this process between them
        done, pending = ray.wait(pending, num_returns=1, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        for ref in done:
            try:
                error = ray.get(ref)
            except RayActorError as e:
                failures.append(_Failure(refs[ref], _death(e), died=True))
            except RayTaskError as e:  # Ray's header (the rank's pid and node), then its traceback; no colours
                failures.append(_Failure(refs[ref], re.sub(r"\x1b\[[0-9;]*m", "", str(e))))
            except RayError as e:  # e.g. the task cancelled, its result lost with its node
                failures.append(_Failure(refs[ref], C.one_line(e), died=True))
            else:
                if error:
                    script = error.startswith(SCRIPT_MARK)
                    failures.append(_Failure(refs[ref], error.removeprefix(SCRIPT_MARK), user=not script, script=script))
        if failures and deadline == float("inf"):
            known = any(f.died or f.user or not faults.lost_peer(f.text) for f in failures)
            deadline = time.monotonic() + (0.0 if known else LOST_PEER_GRACE_S)
    return failures


def _cause(failures: list[_Failure]) -> _Failure:
    """The failure to report: a user's error, else the first that is not just a lost peer."""
    user = [f for f in failures if f.user]
    real = [f for f in failures if f.died or not faults.lost_peer(f.text)]
    return (user or real or failures)[0]


def _death(e: BaseException) -> str:
    """Ray's many-line account of a dead actor as one line."""
    from ray.exceptions import ActorUnavailableError

    if isinstance(e, ActorUnavailableError):  # its connection dropped: the process or its node is gone
        return "its Ray actor stopped answering: its process or its node is gone"
    lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip() and not ln.startswith("\t")]
    # "The actor is dead because its worker process has died. Worker exit type: ..." -> the reason
    m = re.match(r"(?:The actor (?:is dead|died) because )?([^.]*)", lines[0]) if lines else None
    return f"its Ray actor died: {m.group(1) if m else C.one_line(e)}"


class _Rank:
    """One rank, as a Ray actor (made one by ray.remote in _start): its process runs worker.run."""

    def __init__(self, rank: int, cwd: str) -> None:
        self.rank = rank
        if os.path.isdir(cwd):  # as a local rank: the recipe's relative paths mean the command's directory
            os.chdir(cwd)
        from . import worker  # noqa: F401 - torch and the worker load now, while the other ranks start

    def __repr__(self) -> str:  # Ray prefixes the lines a rank prints with this: "(rank 0 pid=..., ip=...)"
        return f"rank {self.rank}"

    def address(self) -> tuple[str, int]:
        """This node's address and a free port on it, for rank 0's rendezvous store (free when asked, as
        torchrun --standalone picks one; the store binds it a moment later)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def run(self, torch_env: dict[str, str], config: dict[str, Any]) -> str:
        """worker.run on the parent's resolved config: "" when done, a user's error as its one line."""
        import ray

        from . import worker
        from .local import _interface_of
        from .script_rank import ScriptFailed

        os.environ.update(torch_env)
        # gloo and NCCL on the interface of the address Ray reaches this node by (left to themselves they
        # take the hostname's, a loopback on many hosts); the user's own choice (launcher.env) stands
        iface = _interface_of(ray.util.get_node_ip_address())
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if iface:
                os.environ.setdefault(var, iface)
        ray_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            worker.run(C.from_dict(config))
        except C.UserError as e:
            return str(e) or type(e).__name__
        except ScriptFailed as e:  # returned, not raised: a line for the launcher, not Ray's traceback
            return SCRIPT_MARK + str(e)
        finally:  # the rank's handler (SIGTERM as an exception) would print a traceback when Ray ends the
            signal.signal(signal.SIGTERM, ray_sigterm)  # finished actor's process with SIGTERM
        return ""
