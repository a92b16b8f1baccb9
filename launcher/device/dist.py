"""The one place that initialises torch.distributed, and the few collectives the loop uses.

Without the torch env vars (RANK, WORLD_SIZE, ...) everything degrades to a world of one: no
process group, collectives are identities. That is what lets the Python API run in a notebook
and the CLI run one rank in-process with no spawn at all.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as td


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# what an srun task's own set-up reads as integers (submitit's JobEnvironment, launch/slurm.py's
# export_env) before the torch variables exist: a malformed one must be named, not its int() traceback
SLURM_ENV = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_NODEID",
             "SLURM_JOB_NUM_NODES", "SLURM_JOB_ID")


def _not_count(value: str) -> Optional[str]:
    """Why an env value is no integer >= 0 (the problem's words), or None when it is one."""
    try:
        return "negative" if int(value) < 0 else None
    except ValueError:
        return "not an integer"


def env_problem(slurm: bool = False) -> Optional[tuple[str, str, str, str]]:
    """(variable, value, problem, valid) for an inconsistent torchrun-style env, else None.

    Checked before anything reads these variables: a library may read one at import (torchmetrics
    reads LOCAL_RANK with int()), and its error would blame whatever imported it. slurm: this
    process is an srun task about to export its torch env from SLURM's, which is checked instead
    (the torch variables the submitting shell left behind are overwritten, but may be read first)."""
    env = os.environ
    if slurm:
        for k in (*SLURM_ENV, *TORCH_ENV):
            problem = _not_count(env[k]) if k in env else None
            if problem:
                return k, env[k], problem, "an integer >= 0" + (" (as srun sets it)" if k in SLURM_ENV else "")
        return None
    if not any(k in env for k in TORCH_ENV):
        return None
    values: dict[str, int] = {}
    for k in TORCH_ENV:  # a malformed value first: it is named even in a partial environment
        if k in env:
            problem = _not_count(env[k])
            if problem:
                return k, env[k], problem, "an integer >= 0"
            values[k] = int(env[k])
    if "RANK" not in env and "WORLD_SIZE" not in env:
        k = next(k for k in TORCH_ENV if k in env)
        return k, env[k], "set without RANK and WORLD_SIZE (a partial torchrun environment)", \
            "RANK and WORLD_SIZE with it, or none of them"
    for k in ("RANK", "WORLD_SIZE"):
        if k not in env:
            other = "WORLD_SIZE" if k == "RANK" else "RANK"
            return k, "", f"{other} is set but {k} is not (a partial torchrun environment)", "both, or neither"
    rank, world = values["RANK"], values["WORLD_SIZE"]
    if world < 1:
        return "WORLD_SIZE", env["WORLD_SIZE"], "must be >= 1", "the number of ranks"
    if rank >= world:
        return "RANK", env["RANK"], f"not below WORLD_SIZE={world}", f"0..{world - 1}"
    local_world = values.get("LOCAL_WORLD_SIZE", world)
    if local_world > world or local_world < 1:
        return "LOCAL_WORLD_SIZE", str(local_world), f"must be 1..WORLD_SIZE={world}", f"1..{world}"
    if values.get("LOCAL_RANK", 0) >= local_world:
        return "LOCAL_RANK", env["LOCAL_RANK"], f"not below LOCAL_WORLD_SIZE={local_world}", f"0..{local_world - 1}"
    if world > 1:
        if not env.get("MASTER_ADDR"):
            return "MASTER_ADDR", "", f"WORLD_SIZE={world} needs the rendezvous host", "a hostname or address"
        port = env.get("MASTER_PORT", "")
        if not port.isdigit() or not 0 < int(port) < 65536:
            return "MASTER_PORT", port, "not a TCP port", "1..65535"
    return None


def env_rank() -> Optional[tuple[int, int, int, int]]:
    """(rank, local_rank, world_size, local_world_size) from torchrun/elastic env vars, or None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return rank, local, world, local_world


# tests only: ranks sharing one GPU (local rank r on cuda:r % visible) talk over gloo, which NCCL
# refuses (one rank per device); the multi-rank GPU launch path then runs on a 1-GPU machine
SHARE_GPU_ENV = "LAUNCHER_TEST_SHARE_GPU"


def init(gpus: int = 0, timeout_s: float = 600.0, group_of_one: bool = False,
         join_timeout_s: Optional[float] = None, arrived: Optional[Callable[[], None]] = None,
         cpu_collectives: bool = False) -> Dist:
    """Join the process group the env describes (gloo on CPU, nccl on CUDA), or a world of one.
    group_of_one: a world of one gets a process group too (FSDP shards over one, and its DCP
    checkpoints are collectives): in memory, no rendezvous, no port. join_timeout_s: the bound on
    joining (JoinTimeout naming the ranks that did not), timeout_s the collectives' after it;
    arrived() is called when this rank reaches the rendezvous (what follows is a wait for the others);
    cpu_collectives: on CUDA, collectives of CPU tensors go over gloo beside nccl (FSDP's CPU offload:
    its shards' grad norm and full weights are CPU DTensors, which nccl refuses; torchtitan does the same)."""
    env = env_rank()
    rank, local, world, local_world = env or (0, 0, 1, 1)
    if gpus > 0:
        device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world > 1 or group_of_one) and not td.is_initialized():
        backend = "nccl" if device.type == "cuda" and not os.environ.get(SHARE_GPU_ENV) else "gloo"
        if backend == "nccl" and cpu_collectives:
            backend = "cpu:gloo,cuda:nccl"
        timeout = datetime.timedelta(seconds=timeout_s)
        if world == 1:
            td.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout,
                                  store=td.HashStore(), device_id=device if backend == "nccl" else None)
        else:
            _join(backend, rank, world, device, timeout, join_timeout_s or timeout_s, arrived)
    return Dist(rank, local, world, local_world, device)


class JoinTimeout(RuntimeError):
    """Ranks that did not join the process group within trainer.join_timeout_s, named (`missing`)."""

    def __init__(self, text: str, missing: list[int]) -> None:
        super().__init__(text)
        self.missing = missing


_joins = itertools.count(1)  # the process groups this process joins: each its own roll call in a reused store


def _join(backend: str, rank: int, world: int, device: torch.device, timeout: datetime.timedelta,
          join_s: float, arrived: Optional[Callable[[], None]]) -> None:
    """init_process_group with every wait of the joining bounded by join_s instead of the
    collectives' timeout: a rank that never comes would otherwise hold the others for 10 minutes.
    Joined = every rank checked in on the store (the roll call names those that did not) and
    init_process_group returned; only then do the collectives get their own timeout."""
    if arrived is not None:  # at the rendezvous: from here this rank waits for the others
        arrived()
    join = datetime.timedelta(seconds=join_s)
    store = attempt_store(rank, world, join)
    _roll_call(store, rank, world, join_s)
    # private in torch 2.13: without it, init_process_group waits as long as a collective would
    set_timeout = getattr(td.distributed_c10d, "_set_pg_timeout", None)
    try:
        td.init_process_group(backend=backend, rank=rank, world_size=world, timeout=join if set_timeout else timeout,
                              store=store, device_id=device if backend == "nccl" else None)
    except RuntimeError as e:
        if not is_timeout(e):
            raise
        raise JoinTimeout(f"init_process_group did not complete within trainer.join_timeout_s={join_s:g} s on "
                          f"rank {rank}, though all {world} ranks had checked in (one is stuck inside it)", []) from e
    if set_timeout:
        set_timeout(timeout)
    store.set_timeout(timeout)


def attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> td.Store:
    """The store the process group is built on, as torch's env:// would make it, but reached within
    the join's bound and with each elastic attempt's keys under a prefix of its own.

    Under elastic (torchrun, the local launcher) the agent hosts it; elsewhere (srun) rank 0 does.
    torch.distributed.elastic keeps its store across restarts, and in torch 2.13 the restarted ranks
    read the previous attempt's peer addresses from it and wait forever on dead sockets
    (pytorch/pytorch#167288)."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        # wait_for_workers=False: rank 0 does not wait for the others here, the roll call does, naming them
        client = td.TCPStore(addr, port, world, is_master=rank == 0 and not agent, timeout=timeout,
                             wait_for_workers=False, multi_tenant=True)
    except RuntimeError as e:
        if not is_timeout(e):
            raise
        host = "the launcher's elastic agent" if agent else "rank 0"
        raise JoinTimeout(f"rank {rank} could not reach the rendezvous store at {addr}:{port} (hosted by {host}) "
                          f"within trainer.join_timeout_s={timeout.total_seconds():g} s",
                          [] if agent else [0]) from e
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    return td.PrefixStore(f"launcher/attempt_{attempt}", client)


def _roll_call(store: td.Store, rank: int, world: int, timeout_s: float) -> None:
    """Every rank checks in and waits for all; after timeout_s, JoinTimeout naming those that did
    not. One append and one counter per rank, one key that all look for: O(world) at any scale.

    Looked for, not waited on: a store.wait that times out has c10d print two lines of its own on
    stderr, and the run's report must stay one line. The pause between lookups doubles up to 50 ms
    (what the join may take longer than the last rank's arrival), more beyond 256 ranks: the store
    then answers at most ~5,000 lookups a second per 256 ranks, 16,000 at 8,192."""
    key = f"launcher/join_{next(_joins)}"
    store.append(f"{key}/ranks", f"{rank} ")
    if store.add(f"{key}/count", 1) == world:
        store.set(f"{key}/all", "1")
    deadline, pause, longest = time.monotonic() + timeout_s, 0.005, min(0.5, 0.05 * max(1.0, world / 256))
    while not store.check([f"{key}/all"]):
        if time.monotonic() > deadline:
            present = {int(r) for r in store.get(f"{key}/ranks").decode().split()}
            missing = [r for r in range(world) if r not in present]
            names = ", ".join(str(r) for r in missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            raise JoinTimeout(f"rank{'s' if len(missing) > 1 else ''} {names} did not join the process group within "
                              f"trainer.join_timeout_s={timeout_s:g} s (the other {len(present)} joined and waited)",
                              missing)
        time.sleep(pause)
        pause = min(2 * pause, longest)


def current() -> Dist:
    """The Dist of an already-initialised process (or a world of one)."""
    if not td.is_initialized():
        return Dist()
    env = env_rank() or (td.get_rank(), td.get_rank(), td.get_world_size(), td.get_world_size())
    nccl = "nccl" in str(td.get_backend())  # "cpu:gloo,cuda:nccl" too (init's cpu_collectives)
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return Dist(td.get_rank(), env[1], td.get_world_size(), env[3], device)


def cleanup() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; identity in a world of one."""
    if td.is_initialized() and td.get_world_size() > 1:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Minimum over ranks, in place; identity in a world of one."""
    if td.is_initialized() and td.get_world_size() > 1:
        td.all_reduce(t, op=td.ReduceOp.MIN)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's obj on every rank."""
    if not (td.is_initialized() and td.get_world_size() > 1):
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank; obj holds tensors, containers, primitives."""
    if not (td.is_initialized() and td.get_world_size() > 1):
        return [obj]
    # torch.save bytes rather than pickled tensors: all_gather_object's own tensor pickling fails to
    # load back in torch 2.13 ("UntypedStorage has no attribute dtype"), and bytes keep the loading
    # side on weights_only=True.
    buf = io.BytesIO()
    torch.save(obj, buf)
    out: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]


def barrier() -> None:
    if td.is_initialized() and td.get_world_size() > 1:
        td.barrier()


class RollCall:
    """When a collective times out, the ranks that did not arrive, named.

    Neither gloo's nor NCCL's timeout says which rank is missing. Every rank that times out adds
    itself to one list in the process group's store; the ranks absent from it after a short grace
    are the ones that never reached the collective (hung in their own code, or stuck in another
    collective that has not timed out yet). A per-second heartbeat could not tell them apart: the
    ranks waiting in the collective stop beating as surely as the hung one. Costs nothing until a
    timeout, then O(1) store calls per rank (one append, a few counter reads), at any world size.
    """

    KEY, COUNT = "launcher/timed-out", "launcher/timed-out-count"

    def __init__(self, grace_s: float = 10.0, settle_s: float = 2.0) -> None:
        # grace_s: the longest wait for the others to time out too (they entered the collective up
        # to a step later); settle_s: the list is complete once it has not grown for this long
        self.grace_s, self.settle_s = grace_s, settle_s
        self.store = None
        if td.is_initialized() and td.get_world_size() > 1:
            try:
                self.store = td.distributed_c10d._get_default_store()
            except (AttributeError, RuntimeError):  # a private API: without it, no diagnosis
                self.store = None

    def absent(self, step: int) -> str:
        """"rank 3 did not arrive (the other 7 waited there)"; "" when nothing can be said."""
        if self.store is None:
            return ""
        world = td.get_world_size()
        try:
            self.store.append(self.KEY, f"{td.get_rank()} ")
            count, changed, deadline = self.store.add(self.COUNT, 1), time.monotonic(), time.monotonic() + self.grace_s
            while count < world - 1 and time.monotonic() < min(deadline, changed + self.settle_s):
                time.sleep(0.1)
                now_count = self.store.add(self.COUNT, 0)
                if now_count != count:
                    count, changed = now_count, time.monotonic()
            present = {int(r) for r in self.store.get(self.KEY).decode().split()}
        except (RuntimeError, ValueError):  # the store is gone too (its host lost): the timeout says enough
            return ""
        missing = [r for r in range(world) if r not in present]
        if not missing:
            return ""
        names = ", ".join(str(r) for r in missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        return f"rank{'s' if len(missing) > 1 else ''} {names} did not arrive (the other {len(present)} waited there)"

    @contextlib.contextmanager
    def naming_late_ranks(self, step: Callable[[], int], timeout_s: float) -> Iterator[None]:
        """A collective that times out inside is re-raised naming the step and the ranks that did not arrive."""
        try:
            yield
        except RuntimeError as e:
            if not is_timeout(e):
                raise
            late = self.absent(step())
            rank = td.get_rank() if td.is_initialized() else 0
            raise RuntimeError(f"a collective timed out after trainer.dist_timeout_s={timeout_s:g} s at step {step()} "
                               f"on rank {rank}: {late or 'the other ranks did not arrive'}"
                               ) from e


def is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)
