"""What launcher=ray asks of a Ray cluster, checked before anything starts: ray installed, an
address that answers (and, joining, why it refused), nodes that can hold the placement group.

The placement group has one bundle per node (trainer.nodes of them) holding that node's ranks:
their CPUs (launcher.cpus_per_rank each) and one GPU per rank on GPU nodes. It is checked against
the alive nodes' total resources, so that a cluster too small is one line naming the field to
change (trainer.nodes, trainer.gpus, launcher.cpus_per_rank), not a placement group that waits
forever. No Ray import here (the CLI's checks use this module): the check is arithmetic on what
ray.nodes() reported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

from .. import config as C
from ..config.launchers import RAY_ADDRESSES

INSTALL = "pip install 'launcher[ray]'"
PROBE_TIMEOUT_S = 5.0  # a GCS address that does not answer: Ray itself would retry for minutes


def check_installed() -> None:
    """launcher=ray needs ray (the [ray] extra); found without importing it (seconds)."""
    if importlib.util.find_spec("ray") is None:
        raise C.ConfigError("launcher", "ray", "ray is not installed", f"{INSTALL}, or local")


def probe(field: str, address: str) -> None:
    """An explicit address that does not answer: one line at once, not Ray's minutes of retries."""
    m = re.fullmatch(r"(?:ray://)?([^\s:/]+):(\d+)", address)
    if m is None:
        return
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise C.ConfigError(field, address, f"nothing answers there ({e.strerror or e})",
                            "the address of a running Ray cluster (`ray status` on its head), auto, or unset") from None


# Ray's token authentication: any `ray.init()` that starts a local instance (this launcher's own,
# without launcher.address) writes ~/.ray/auth_token, and a later `ray start --head` on that machine
# turns token authentication on. Joining it by an explicit address (HOST:PORT, ray://) sends the token
# only with RAY_AUTH_MODE=token (Ray never sends it unasked); `auto` on the head sends it by itself.
TOKEN = "RAY_AUTH_MODE=token with the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN) where this runs"


def join_error(field: str, address: str, e: BaseException) -> C.ConfigError:
    """Why joining failed as one line; a refused token named as such. A GCS address refused says so in
    the error's cause (AuthenticationError: InvalidAuthToken); Ray Client only times out."""
    chain: list[str] = []
    cause: Optional[BaseException] = e
    while cause is not None and len(chain) < 10:
        chain.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__ or cause.__context__
    mode = os.environ.get("RAY_AUTH_MODE") or "unset"
    if any("InvalidAuthToken" in text or "AuthenticationError" in text for text in chain):
        return C.ConfigError(field, address, f"the Ray cluster there uses token authentication and refused this "
                             f"process (RAY_AUTH_MODE is {mode})", f"{TOKEN}; or a cluster started with "
                             "RAY_AUTH_MODE=disabled (docs/ray.md)")
    hint = "" if mode == "token" else f"; a cluster with token authentication also needs {TOKEN}"
    return C.ConfigError(field, address, f"cannot join a Ray cluster there ({C.one_line(e)})", RAY_ADDRESSES + hint)


@contextlib.contextmanager
def native_stderr_held() -> Iterator[None]:
    """Joining: what is written to fd 2 meanwhile, shown only if it succeeds. Ray's C++ GCS client
    writes a warning per connection retry straight to fd 2 (20 lines in 20 s for a refused token)
    before ray.init raises; join_error's one line says the same."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        joined = False
        try:
            yield
            joined = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if joined:
                held.seek(0)
                os.write(2, held.read())


@dataclass(frozen=True)
class Topology:
    """What the placement group asks for: one bundle per node, holding that node's ranks."""

    nodes: int
    per_node: int  # ranks per node
    cpus: float  # Ray CPUs per rank
    gpus: int  # GPUs per rank: 1 on GPU nodes, else 0
    strategy: str

    @classmethod
    def of(cls, cfg: C.Config) -> "Topology":
        lc, nodes = cfg.launcher, cfg.trainer.nodes
        strategy = lc.placement_strategy if lc.placement_strategy != "auto" else \
            "STRICT_SPREAD" if nodes > 1 else "PACK"
        return cls(nodes, C.ranks_per_node(cfg.trainer), float(lc.cpus_per_rank), 1 if cfg.trainer.gpus else 0,
                   strategy)

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.per_node * self.cpus, **({"GPU": self.per_node * self.gpus} if self.gpus else {})}

    def describe(self) -> str:
        need = ", ".join(f"{v:g} {k}" for k, v in self.bundle().items())
        return f"{self.nodes} node(s) x {self.per_node} rank(s), {need} per node, {self.strategy}"


def _capacity(resources: dict[str, float], t: Topology, cpus: float) -> int:
    """How many of the run's node bundles one Ray node holds (its total resources)."""
    fits = [int(resources.get("CPU", 0) // (t.per_node * cpus)) if cpus else t.nodes]
    if t.gpus:
        fits.append(int(resources.get("GPU", 0) // (t.per_node * t.gpus)))
    return min(fits)


def _fits(t: Topology, nodes: list[dict[str, float]], cpus: float) -> bool:
    caps = [_capacity(r, t, cpus) for r in nodes]
    if t.strategy == "STRICT_SPREAD":
        return sum(c >= 1 for c in caps) >= t.nodes
    if t.strategy == "STRICT_PACK":
        return any(c >= t.nodes for c in caps)
    return sum(caps) >= t.nodes


def misfit(t: Topology, nodes: list[dict[str, float]]) -> Optional[C.ConfigError]:
    """Why the cluster's alive nodes (their total resources) cannot hold the ranks, naming the field
    to change; None when they can."""
    if _fits(t, nodes, t.cpus):
        return None
    have = "; ".join(", ".join(f"{r.get(k, 0):g} {k}" for k in ("CPU", "GPU") if k == "CPU" or t.gpus) for r in nodes)
    where = f"the Ray cluster's {len(nodes)} node(s) have {have or 'nothing'}"
    if t.strategy == "STRICT_SPREAD" and len(nodes) < t.nodes:
        return C.ConfigError("trainer.nodes", t.nodes, f"STRICT_SPREAD puts each node's ranks on its own Ray node; "
                             f"{where}", f"1..{len(nodes)}, or a cluster with more nodes")
    if t.gpus and not _fits(t, nodes, 0):
        return C.ConfigError("trainer.gpus", t.per_node, f"{t.describe()}: {where}",
                             "fewer GPU ranks per node or nodes, or a cluster with more GPUs")
    # the largest cpus_per_rank that fits: some node's CPUs split between k bundles' ranks
    options = sorted({r.get("CPU", 0) / (k * t.per_node) for r in nodes for k in range(1, t.nodes + 1)}, reverse=True)
    best = next((c for c in options if c > 0 and _fits(t, nodes, c)), 0.0)
    valid = f"<= {best:g}, fewer ranks (trainer.nproc, trainer.nodes)" if best else "fewer ranks"
    return C.ConfigError("launcher.cpus_per_rank", t.cpus, f"{t.describe()}: {where}",
                         f"{valid}, or a bigger cluster")
