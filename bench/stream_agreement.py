"""What the epoch-end agreement of a stream costs per step (docs/your-data.md, "Uneven streams").

A stream has no length, so the ranks agree where the epoch ends: one all-reduce of one number per up
a window of optimizer steps (fit/agreement.py: doubling up to EndAgreement.WINDOW steps, within
EndAgreement.BUDGET bytes of batches read ahead). Here 2 gloo CPU ranks (one thread each) train a
stream of the same length on each rank (so the epoch's end needs no agreement and a loop can run
without it) two ways, interleaved, in the same processes:

  bare      for batch in stream.epoch(e): step(batch)          (what an even stream could do)
  agreed    the launcher's loop: group_end(b, 1) before each step, then the step (Trainer._train_step)

with the step a DDP training step of one of three jobs: the overhead job (Linear(2, 1), batch 64, Adam:
bench/hook_cost.py's), the tiny model (embedding 32 + linear head over 256 ids, 64 ids a sample, batch
32: bench/stream.py's) and the MNIST CNN (batch 128, Adadelta: the mnist recipe's). The samples are made
once and handed out again, so the step is the model's and the loop's. Reported per step: the difference
of the loops' medians (noisy: the ranks share 2 cores), and the loop's time inside the agreement's
all-reduce (EndAgreement.blocked_s, the direct measure),
each in us and as % of the bare step.

    python bench/stream_agreement.py [--rounds 5] [--lookahead 8]

--lookahead N sets EndAgreement.WINDOW (the most optimizer steps one agreement covers, 256 in the
package) for this run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as td
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402
from stream import Tiny  # noqa: E402

from launcher.device.dist import Dist  # noqa: E402
from launcher.fit import stream as stream_module  # noqa: E402
from launcher.fit.agreement import EndAgreement  # noqa: E402
from launcher.recipes.mnist import Net  # noqa: E402


def _overhead() -> tuple[nn.Module, Callable[[], tuple], Callable[[nn.Module, Any], torch.Tensor], type, int, int]:
    return nn.Linear(2, 1), lambda: (torch.randn(2), torch.randn(1)), \
        lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), torch.optim.Adam, 64, 600


def _tiny() -> tuple:
    return Tiny(), lambda: (torch.randint(0, 256, (64,)), torch.randint(0, 256, (64,))), \
        lambda m, b: nn.functional.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten()), torch.optim.Adam, 32, 300


def _mnist() -> tuple:
    return Net(), lambda: (torch.randn(1, 28, 28), torch.randint(0, 10, ())), \
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), torch.optim.Adadelta, 128, 60


JOBS = {"overhead job": _overhead, "tiny model": _tiny, "MNIST CNN": _mnist}


class Even(IterableDataset):
    """`per_stream` samples in every stream (the same few, made once, handed out again)."""

    def __init__(self, make: Callable[[], tuple], per_stream: int, distinct: int = 256) -> None:
        torch.manual_seed(0)
        self.samples, self.per_stream = [make() for _ in range(distinct)], per_stream

    def shard_stream(self, index: int, count: int) -> Iterator[tuple]:
        return (self.samples[i % len(self.samples)] for i in range(self.per_stream))

    def __iter__(self) -> Iterator[tuple]:
        return self.shard_stream(0, 1)


def _rank(rank: int, port: int, rounds: int, lookahead: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=2)
    EndAgreement.WINDOW = lookahead
    results = {}
    for name, job in JOBS.items():
        torch.manual_seed(0)
        model, make, loss_fn, opt_cls, batch, steps = job()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = opt_cls(ddp.parameters())
        data = Even(make, batch * steps)

        def step(b: Any) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(ddp, b).backward()
            opt.step()

        times: dict[str, list[float]] = {"bare": [], "agreed": []}
        reduce_s: dict[str, list[float]] = {"agreed": []}
        reduces = []
        for r in range(rounds + 1):  # round 0 warms up
            for mode in ("bare", "agreed") if r % 2 else ("agreed", "bare"):
                s = stream_module.Stream(data, Dist(rank=rank, world_size=2), batch_size=batch)
                batches, n = iter(s.epoch(r)), 0
                td.barrier()
                t0 = time.perf_counter()
                if mode == "bare":
                    for b in batches:
                        step(b)
                        n += 1
                else:
                    while s.group_end(n, 1) > n:
                        step(next(batches))
                        n += 1
                elapsed = time.perf_counter() - t0
                assert n == steps, (mode, n, steps)
                if r:
                    times[mode].append(elapsed / steps)
                    if mode != "bare":
                        reduce_s[mode].append(s.agreement.blocked_s / steps)
                        reduces.append(s.agreement.count)
        results[name] = ({m: statistics.median(v) for m, v in times.items()},
                         {m: statistics.median(v) for m, v in reduce_s.items()}, statistics.median(reduces), steps, batch)
    if rank == 0:
        out.put(results)
    td.destroy_process_group()


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lookahead", type=int, default=EndAgreement.WINDOW)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank, args=(r, port, a.rounds, a.lookahead, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = q.get(timeout=1800)
    for p in procs:
        p.join()
    rows = []
    for name, (times, inside, reduces, steps, batch) in results.items():
        bare = times["bare"]
        for mode in ("agreed",):
            diff = times[mode] - bare
            rows.append([name, f"{batch}", f"{steps}", f"{bare * 1e3:.3f}", f"{times[mode] * 1e3:.3f}",
                         f"{diff * 1e6:+.0f} ({diff / bare:+.1%})", f"{reduces} ({reduces / steps:.3f})",
                         f"{inside[mode] * 1e6:.1f} ({inside[mode] / bare:.2%})"])
    return (f"Machine: {machine()}; load before: {os.getloadavg()[0]:.2f}; 2 gloo CPU ranks, 1 thread each, "
            f"{a.rounds} interleaved rounds, medians; EndAgreement.WINDOW={a.lookahead}\n\n" + table(
                ["job", "batch", "steps an epoch", "bare step ms", "agreed step ms",
                 "agreed - bare us (% of step)", "agreements an epoch (per step)",
                 "waiting in the agreement us per step (% of step)"], rows))


if __name__ == "__main__":
    print(main())
