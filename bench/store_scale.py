"""The c10d TCPStore under the start-up traffic of N ranks, N up to 1,024: what each rank does with
the store before its first step, timed per phase, with the store's load (requests) counted.

    python bench/store_scale.py                          # N = 8 .. 1024, -> a table on stdout
    python bench/store_scale.py --ranks 64 256 --repeat 3

Per rank, in this order (the launcher's start-up, torch 2.x):
  connect  a TCPStore client connects (and is validated by the server)
  join     the rendezvous barrier: one `add` to a counter, the last to arrive
           sets the go key, everyone `wait`s for it (what init_process_group's store barrier does)
  mesh     gloo's full mesh: set this rank's address, `get` every other rank's (N-1 gets; NCCL
           instead has rank 0 publish one unique id that every rank gets: 1 get)
  barrier  a second store barrier (the launcher's first collective under gloo is a real
           all-reduce, not the store; this is the store-only equivalent, for scale)
  rollcall the launcher's only own store traffic, and only at a collective timeout: one append
           to one key and one counter add per rank, then one get (launcher/device/dist.py RollCall)

Each rank is a process with one client (forked from this one, torch already imported), all on
THIS machine, so they compete with the store's server for its cores: the times are an upper bound for a cluster where the ranks run
elsewhere; the request counts are exact. On the gVisor sandbox these figures were first taken on,
more than ~16 simultaneous connects stall in steps of 5 s (both store backends, a 4096 backlog):
the connect column holds that; the other phases are the store's own cost. The extrapolation to 1,000+ ranks fits time per phase
against requests (requests grow as N for join/barrier/rollcall and as N^2 for the gloo mesh).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import platform
import resource
import socket
import statistics
import time
from typing import Any, Callable, Optional

PHASES = ("connect", "join", "mesh", "barrier", "rollcall")


def _requests(phase: str, n: int) -> int:
    """Store requests the phase makes in all (server side), from the protocol above."""
    barrier = 2 * n + 1  # an add and a wait per rank, one set by the last
    return {"connect": n, "join": barrier, "mesh": n + barrier + n * (n - 1), "barrier": barrier,
            "rollcall": 2 * n + barrier + n}[phase]


def _barrier(store: Any, name: str, n: int) -> None:
    if store.add(f"{name}/count", 1) == n:
        store.set(f"{name}/go", "1")
    store.wait([f"{name}/go"])


def _rank(ports: Any, rank: int, n: int, out: Any) -> None:
    """One rank: one process with one client, as in a real job."""
    from torch.distributed import TCPStore

    port = ports.get()
    t: dict[str, float] = {"start": time.perf_counter()}
    store = TCPStore("127.0.0.1", port, n, is_master=False, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=600))
    t["connect"] = time.perf_counter()
    _barrier(store, "join", n)
    t["join"] = time.perf_counter()
    store.set(f"addr/{rank}", f"10.0.{rank // 256}.{rank % 256}:{40000 + rank}")
    _barrier(store, "addrs", n)  # every address is up before anyone reads (gloo waits on each key instead)
    for peer in range(n):
        if peer != rank:
            store.get(f"addr/{peer}")
    t["mesh"] = time.perf_counter()
    _barrier(store, "barrier", n)
    t["barrier"] = time.perf_counter()
    store.append("timed-out", f"{rank} ")
    store.add("timed-out-count", 1)
    _barrier(store, "rollcall", n)
    store.get("timed-out")
    t["rollcall"] = time.perf_counter()
    out.put((rank, t))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forked_clients(target: Any, n: int, args: tuple, prepare: Optional[Callable[[Any], None]] = None
                   ) -> tuple[Any, list[Any], Any]:
    """N processes running target(ports, rank, *args, out), forked BEFORE the store's server starts
    (a child forked after it would inherit the server's threads half-copied and its listening
    socket); then the server, prepare(server), and its port handed to each: (server, processes, out)."""
    from torch.distributed import TCPStore

    ctx = mp.get_context("fork")
    ports, out = ctx.Queue(), ctx.Queue()
    ps = [ctx.Process(target=target, args=(ports, r, *args, out)) for r in range(n)]
    for p in ps:
        p.start()
    port = free_port()
    server = TCPStore("127.0.0.1", port, n, is_master=True, wait_for_workers=False,
                      timeout=datetime.timedelta(seconds=600))
    if prepare is not None:
        prepare(server)
    for _ in ps:
        ports.put(port)
    return server, ps, out


def one(n: int) -> dict[str, float]:
    """Seconds per phase for N ranks: from the last rank entering it to the last rank leaving it."""
    # torch is imported once, here; each rank is a forked copy
    server, ps, out = forked_clients(_rank, n, (n,))
    marks = dict(out.get() for _ in ps)
    for p in ps:
        p.join()
    del server
    # perf_counter is CLOCK_MONOTONIC on Linux: comparable across the forked processes
    start = min(m["start"] for m in marks.values())
    ends = {ph: max(m[ph] for m in marks.values()) for ph in PHASES}
    result, prev = {}, start
    for ph in PHASES:
        result[ph] = ends[ph] - prev
        prev = ends[ph]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128, 256, 512, 1024])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the server holds one socket per client
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * max(args.ranks) + 256)), hard))
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    print(f"# c10d TCPStore, torch {torch.__version__}, {cpu}, {mp.cpu_count()} CPUs; one client process per "
          f"rank, all on this machine; median of {args.repeat}")
    print("| ranks | " + " | ".join(f"{p} s" for p in PHASES) + " | total s | requests | requests/s |")
    print("|---|" + "---|" * (len(PHASES) + 3))
    for n in args.ranks:
        runs = [one(n) for _ in range(args.repeat)]
        med = {ph: statistics.median(r[ph] for r in runs) for ph in PHASES}
        total = sum(med.values())
        reqs = sum(_requests(ph, n) for ph in PHASES)
        print(f"| {n} | " + " | ".join(f"{med[ph]:.3f}" for ph in PHASES) +
              f" | {total:.3f} | {reqs} | {reqs / total:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
