"""The c10d TCPStore's throughput X (ops/s) and round-trip time under K concurrent clients doing
set / get / compare_set / multi_get: step 1 of docs/SCALE.md section 5.4.

    python bench/store_ops.py                        # K = 1 2 4 8 16 32 64, 3 s each, 3 rounds
    python bench/store_ops.py --clients 1 16 --seconds 5 --rounds 5

One server (torch's default backend, libuv since 2.4) in this process; K client processes forked
from it before the server starts (as bench/store_scale.py does), each with one TCPStore client.
Once all K have connected and met at a store barrier, each runs a closed loop for --seconds:
set(own key), get(own key), compare_set(own key), multi_get(8 keys), round after round, timing
every call. X = all calls / the window; p50 / p99 of the calls' round trips, all kinds together.
Server and clients share this machine's cores: X here is a lower bound on a dedicated store host's.
"""

from __future__ import annotations

import argparse
import os
import datetime
import platform
import statistics
import time
from typing import Any

from store_scale import forked_clients

KEYS = [f"shared/{i}" for i in range(8)]


def _client(ports: Any, rank: int, k: int, seconds: float, out: Any) -> None:
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", ports.get(), k, is_master=False, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=600))
    if store.add("ready", 1) == k:
        store.set("go", "1")
    store.wait(["go"])
    me = f"rank/{rank}"
    store.set(me, "0")
    lat: list[float] = []
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    i = 0
    while time.perf_counter() < end:
        for op in (lambda: store.set(me, str(i)), lambda: store.get(me),
                   lambda: store.compare_set(me, str(i), str(i + 1)), lambda: store.multi_get(KEYS)):
            t = time.perf_counter()
            op()
            lat.append(time.perf_counter() - t)
        i += 1
    out.put((len(lat), time.perf_counter() - start, sorted(lat)[:: max(1, len(lat) // 2000)]))


def one(k: int, seconds: float) -> tuple[float, float, float]:
    def keys(server: Any) -> None:
        for key in KEYS:
            server.set(key, "x" * 16)

    server, ps, out = forked_clients(_client, k, (k, seconds), keys)
    got = [out.get() for _ in ps]
    for p in ps:
        p.join()
    del server
    ops = sum(g[0] for g in got)
    window = statistics.median(g[1] for g in got)
    lat = sorted(x for g in got for x in g[2])  # an equal-weight sample of each client's calls
    return ops / window, lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    print(f"# c10d TCPStore (libuv server), torch {torch.__version__}, {cpu}, {os.cpu_count()} CPUs; K client "
          f"processes on this machine, {a.seconds:g} s closed loop each; medians of {a.rounds} rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print("| K clients | X ops/s | p50 RTT ms | p99 RTT ms |")
    print("|---|---|---|---|")
    for k in a.clients:
        runs = [one(k, a.seconds) for _ in range(a.rounds)]
        x, p50, p99 = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"| {k} | {x:,.0f} | {p50 * 1e3:.3f} | {p99 * 1e3:.3f} |", flush=True)


if __name__ == "__main__":
    main()
