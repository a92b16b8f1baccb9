"""A sharded (FSDP) checkpoint save through torch.distributed.checkpoint on N gloo CPU ranks, with
DCP's planning timed apart from its writing, for the same state at several N; then rank 0's hash of
the written files, as launcher/checkpoint/format.py `commit` does it. Inputs B_rank and t_plan(N)
of docs/SCALE.md section 3.1.

    python bench/dcp_write.py                               # N = 2 4 8 16, 3 rounds, dir runs/bench-dcp
    python bench/dcp_write.py --nproc 2 --rounds 5 --dir /dev/shm/dcp   # on tmpfs instead of the disk

The state is the 48M-parameter GPT of bench/checkpoint_bench.py (launcher.recipes.charlm.GPT, 8 blocks of
704, 8 heads: `recipe=charlm model.n_layer=8 model.n_embd=704 model.n_head=8`), sharded as
launcher/device/strategy.py `wrap` does (fully_shard on each Block, then the root), with AdamW's two
moments made by one optimizer step on zero gradients, and saved as the launcher's sync FSDP save
does (launcher/checkpoint/manager.py `_write`): dcp.save({"model": get_model_state_dict(model),
"optimizer": get_optimizer_state_dict(model, opt)}) with the default FileSystemWriter (one file
per rank, fsynced). The same total state at every N: S_rank = S_total / N.

Phases, from wrapping DCP's `_DistWrapper.reduce_scatter("plan", ...)` and `all_reduce("write", ...)`
(torch/distributed/checkpoint/state_dict_saver.py `_save_state_dict`, utils.py), each after a
barrier so that every rank enters together:
  plan     rank 0's wall time of the whole reduce_scatter("plan"): every rank's local plan, the
           gather to rank 0, rank 0's global plan, the scatter back   -> t_plan(N)
  local    one rank's create_local_plan (median over ranks)
  global   rank 0's create_global_plan over the N gathered plans
  plan_B   bytes of the N local plans as gathered (pickled) on rank 0
  write    one rank's write_data: serialise + write + fsync its shard file (median over ranks)
  write step  rank 0's wall time of the whole all_reduce("write"): its write, the wait for the
           slowest rank's, the gather of write results, .metadata, the broadcast
  metadata rank 0's finish: the .metadata file
  B_rank   shard bytes / write seconds, median over ranks (each rank its own file)
  hash     rank 0's sha256 of every file of the checkpoint, 4 MiB reads (format._sha256): R_hash

All N ranks are processes on THIS machine: at N above its core count they share the cores, so
`local` and `write` there are contention, not scale; `plan_B` and the count of items are exact.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from store_scale import free_port

REPO = Path(__file__).resolve().parent.parent
GPT = {"n_layer": 8, "n_embd": 704, "n_head": 8, "block_size": 64}  # bench/checkpoint_bench.py's GPT


def _instrument(timings: dict[str, Any]) -> None:
    """Time DCP's two central steps by wrapping its _DistWrapper (one class, used by dcp.save)."""
    from torch.distributed.checkpoint import utils

    W = utils._DistWrapper
    reduce_scatter, all_reduce = W.reduce_scatter, W.all_reduce

    def timed(fun: Any, key: str) -> Any:
        def run(*a: Any) -> Any:
            t = time.perf_counter()
            out = fun(*a)
            timings[key] = time.perf_counter() - t
            return out
        return run

    def rs(self: Any, step: str, map_fun: Any, reduce_fun: Any) -> Any:
        def gathered(plans: Any) -> Any:
            timings["plan_B"] = len(pickle.dumps(plans))
            timings["items"] = sum(len(p.items) for p in plans)
            return timed(reduce_fun, "global")(plans)
        t = time.perf_counter()
        out = reduce_scatter(self, step, timed(map_fun, "local"), gathered)
        timings[step] = time.perf_counter() - t
        return out

    def ar(self: Any, step: str, map_fun: Any, reduce_fun: Any) -> Any:
        t = time.perf_counter()
        out = all_reduce(self, step, timed(map_fun, "write_data"), timed(reduce_fun, "finish_metadata"))
        timings[step] = time.perf_counter() - t
        return out

    W.reduce_scatter, W.all_reduce = rs, ar


def _rank(rank: int, n: int, port: int, out_dir: str, rounds: int, queue: Any) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, str(REPO))
    from launcher.checkpoint import format as F
    from launcher.recipes.charlm import GPT as Model, Block

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=1800))
    torch.manual_seed(0)
    model = Model(**GPT)
    for m in model.modules():
        if isinstance(m, Block):
            fully_shard(m)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # exp_avg, exp_avg_sq and step exist, as after any training step
    timings: dict[str, Any] = {}
    _instrument(timings)
    for r in range(rounds):
        folder = Path(out_dir) / f"n{n}-r{r}"
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
        dist.barrier()
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=str(folder))
        timings["save"] = time.perf_counter() - t0
        timings["shard_B"] = sum(p.stat().st_size for p in folder.glob(f"__{rank}_*.distcp"))
        if rank == 0:
            files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
            t = time.perf_counter()
            for p in files:
                F._sha256(p)
            timings["hash"] = time.perf_counter() - t
            timings["total_B"] = sum(p.stat().st_size for p in files)
        queue.put((n, r, rank, dict(timings)))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    dist.destroy_process_group()


def measure(n: int, out_dir: str, rounds: int) -> list[dict[str, Any]]:
    ctx = mp.get_context("fork")  # torch is imported once, here (as the launcher forks its CPU ranks)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, n, port, out_dir, rounds, queue)) for r in range(n)]
    for p in procs:
        p.start()
    got = [queue.get() for _ in range(n * rounds)]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"N={n}: a rank exited with {p.exitcode}")
    out = []
    for r in range(rounds):
        ranks = {rank: t for (_, rr, rank, t) in got if rr == r}
        t0 = ranks[0]
        b_rank = [t["shard_B"] / t["write_data"] for t in ranks.values() if t["write_data"] > 0]
        out.append({"plan": t0["plan"], "local": statistics.median(t["local"] for t in ranks.values()),
                    "global": t0["global"], "plan_B": t0["plan_B"], "items": t0["items"],
                    "write": statistics.median(t["write_data"] for t in ranks.values()),
                    "finish": t0["finish_metadata"], "write_all": t0["write"], "save": t0["save"],
                    "shard_B": statistics.median(t["shard_B"] for t in ranks.values()),
                    "B_rank": statistics.median(b_rank), "hash": t0["hash"], "total_B": t0["total_B"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=str(REPO / "runs" / "bench-dcp"), help="where the checkpoints are written")
    a = ap.parse_args()
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    fs = os.popen(f"df -T {a.dir} | tail -1").read().split()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"dir {a.dir} on {fs[0] if fs else '?'} ({fs[1] if len(fs) > 1 else '?'}); medians of {a.rounds} rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print("| N | items planned | plan (s) | local plan (s) | global plan (s) | plan bytes | shard MB | write (s) "
          "| B_rank GB/s | write step (s) | metadata (s) | dcp.save (s) | checkpoint MB | hash (s) | R_hash GB/s |")
    print("|" + "---|" * 15)
    for n in a.nproc:
        rows = measure(n, a.dir, a.rounds)
        m = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        r_hash = statistics.median(r["total_B"] / r["hash"] for r in rows)
        print(f"| {n} | {m['items']:.0f} | {m['plan']:.3f} | {m['local']:.3f} | {m['global']:.4f} | {m['plan_B']:,.0f} "
              f"| {m['shard_B'] / 1e6:.1f} | {m['write']:.3f} | {m['B_rank'] / 1e9:.3f} | {m['write_all']:.3f} | {m['finish']:.4f} "
              f"| {m['save']:.3f} | {m['total_B'] / 1e6:.1f} | {m['hash']:.3f} | {r_hash / 1e9:.3f} |", flush=True)
        for i, r in enumerate(rows):
            print(f"#   N={n} round {i}: plan {r['plan']:.3f} s, write {r['write']:.3f} s, B_rank {r['B_rank'] / 1e9:.3f} GB/s, "
                  f"save {r['save']:.3f} s, hash {r['hash']:.3f} s", flush=True)


if __name__ == "__main__":
    main()
