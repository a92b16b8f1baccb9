"""Input throughput of the launcher's data paths against a hand-written DataLoader loop (issue 25).

The data: 8 shard files of uint16 tokens (2 MB each, written to a temporary folder), windows of 64
tokens and their next-token targets, batch 32, 2 loader workers, one CPU rank (the streams' epoch-end
agreement is an all-reduce per up to 8 steps at more than one rank: none at one).

  stream     an IterableDataset with shard_stream(index, count) (files[index::count], read in order)
             launcher: Trainer.fit(train_data=dataset, num_workers=2) (and with seed_per_sample=False)
             hand:     DataLoader(the same dataset, each worker reading shard_stream(worker id, 2))
  map        tokenshards.TokenWindows (np.memmap windows, random access), shuffled
             launcher: Trainer.fit(train_data=dataset, num_workers=2, persistent_workers=True)
                       (and with seed_per_sample=False: no per-sample seeding in the workers)
             hand:     DataLoader(dataset, sampler=the launcher's order, num_workers=2, persistent_workers=True)

Two kinds of step, the same in both contenders: `input` (a 1-parameter probe: forward, backward and
optimizer step on the batch's mean; what is measured is the input path and the loop), and `tiny` (an
embedding of 32 and a linear head over 256 ids, cross-entropy: ~1 ms a step). Each optimizer step is
timestamped by a post hook on the optimizer; samples/s counts steps warmup+1..steps, so worker start,
set-up and tear-down are out; over the same steps, the CPU time of the rank and its loader workers
(process_time and /proc/PID/task/*/schedstat) per sample, which other jobs on a shared machine disturb far less than wall
time (the rate is the input path's limit when the cores are saturated, as here: 2 workers + the rank). Rounds alternate the contenders (each first in every other round);
the table gives medians, the spread (min-max) and the ratio of medians to the hand loop.

    python bench/stream.py [--steps 600] [--warmup 60] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, get_worker_info  # noqa: E402

from common import cpu_flags, machine, table  # noqa: E402
from launcher.recipes.tokenshards import TokenWindows  # noqa: E402

BATCH, BLOCK, WORKERS, SEED = 32, 64, 2, 0
SHARDS, SHARD_TOKENS = 8, 1 << 20


class ShardStream(IterableDataset):
    """Windows of the shard files in order; stream `index` of `count` reads files[index::count]."""

    def __init__(self, files: list[str]) -> None:
        self.files = files

    def shard_stream(self, index: int, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for f in self.files[index::count]:
            tokens = np.memmap(f, dtype="<u2", mode="r")
            for lo in range(0, len(tokens) - BLOCK, BLOCK):
                ids = torch.from_numpy(tokens[lo: lo + BLOCK + 1].astype(np.int64))
                yield ids[:-1], ids[1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()  # the hand-written loop's own sharding: one stream per worker
        return self.shard_stream(info.id, info.num_workers) if info is not None else self.shard_stream(0, 1)


class Probe(nn.Module):
    """One parameter: the step's own cost is a forward, a backward and an optimizer step on a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x.float().mean()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(256, 32), nn.Linear(32, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


def probe_step(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(batch[0])


def tiny_step(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


STEPS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module, Any], torch.Tensor]]] = {
    "input": (Probe, probe_step), "tiny": (Tiny, tiny_step)}


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its living children (the loader workers, all
    their threads: the scheduler's nanosecond run time, not the 10 ms ticks of /proc/PID/stat)."""
    total = time.process_time()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            for pid in f.read().split():
                try:
                    for thread in os.listdir(f"/proc/{pid}/task"):
                        with open(f"/proc/{pid}/task/{thread}/schedstat") as st:
                            total += int(st.read().split()[0]) / 1e9
                except OSError:  # a child that just ended
                    pass
    return total


class Clock:
    """perf_counter at the end of each optimizer step (a post hook: the same for both contenders), and
    the CPU seconds of the rank and its workers at the end of step `warmup` and of the last step: on a
    shared machine the CPU a sample costs is steadier than the wall time it takes."""

    def __init__(self, opt: torch.optim.Optimizer, warmup: int, steps: int) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.warmup, self.steps = warmup, steps
        opt.register_step_post_hook(lambda *_: self._tick())

    def _tick(self) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) in (self.warmup, self.steps):
            self.cpu.append(cpu_seconds())

    def rate(self) -> tuple[float, float]:
        """(samples/s, CPU microseconds per sample) over steps warmup+1..steps."""
        samples = BATCH * (len(self.times) - self.warmup)
        return samples / (self.times[-1] - self.times[self.warmup - 1]), 1e6 * (self.cpu[1] - self.cpu[0]) / samples


def fresh(kind: str, steps: int, warmup: int) -> tuple[nn.Module, torch.optim.Optimizer, Clock]:
    torch.manual_seed(SEED)
    net = STEPS[kind][0]()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return net, opt, Clock(opt, warmup, steps)


def launcher_run(data: Any, kind: str, steps: int, warmup: int, **trainer: Any) -> tuple[tuple[float, float], nn.Module]:
    from launcher import Trainer

    net, opt, clock = fresh(kind, steps, warmup)
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(max_steps=steps, max_epochs=1, batch_size=BATCH, precision="32", progress=False, logger="none",
                summary=False, checkpoint_enabled=False, seed=SEED, num_workers=WORKERS, run_dir=run_dir,
                **trainer).fit(net, optimizer=lambda _: opt, train_data=data, step=STEPS[kind][1])
    assert len(clock.times) == steps, len(clock.times)
    return clock.rate(), net


def hand_run(loader: DataLoader, kind: str, steps: int, warmup: int) -> tuple[tuple[float, float], nn.Module]:
    net, opt, clock = fresh(kind, steps, warmup)
    step = STEPS[kind][1]
    net.train()
    batches = iter(loader)
    for i, batch in enumerate(batches):
        if i == steps:
            break
        step(net, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    # the workers end here, as the launcher's do at fit()'s end: left to the garbage collector, later
    # contenders' workers would be forked holding a live iterator
    batches._shutdown_workers()  # type: ignore[attr-defined]
    return clock.rate(), net


def write_shards(folder: Path) -> list[str]:
    rng = np.random.default_rng(SEED)
    files = []
    for s in range(SHARDS):
        path = folder / f"train-{s:05d}.bin"
        rng.integers(0, 256, SHARD_TOKENS, dtype=np.uint16).astype("<u2").tofile(path)
        files.append(str(path))
    return files


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per contender (one epoch holds 4096)")
    ap.add_argument("--warmup", type=int, default=60, help="steps left out of the rate")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the training process")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # 2 threads on 2 shared cores stall at random (bench/README.md)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_shards(Path(tmp))
        stream, windows = ShardStream(files), TokenWindows(files, BLOCK)
        order = DistributedSampler(windows, num_replicas=1, rank=0, shuffle=True, seed=SEED)
        order.set_epoch(0)  # the launcher's first epoch on one rank (fit/data.py Batches.indices)
        def hand_map() -> DataLoader:
            return DataLoader(windows, batch_size=BATCH, sampler=list(order), num_workers=WORKERS,
                              persistent_workers=True)

        contenders: dict[str, Callable[[str], tuple[tuple[float, float], nn.Module]]] = {
            "stream: hand loop": lambda k: hand_run(DataLoader(stream, batch_size=BATCH, num_workers=WORKERS), k,
                                                    args.steps, args.warmup),
            "stream: launcher": lambda k: launcher_run(stream, k, args.steps, args.warmup),
            "stream: launcher, seed_per_sample=false": lambda k: launcher_run(stream, k, args.steps, args.warmup,
                                                                              seed_per_sample=False),
            "map: hand loop (persistent workers)": lambda k: hand_run(hand_map(), k, args.steps, args.warmup),
            "map: launcher (persistent workers)": lambda k: launcher_run(windows, k, args.steps, args.warmup,
                                                                         persistent_workers=True),
            "map: launcher, seed_per_sample=false": lambda k: launcher_run(
                windows, k, args.steps, args.warmup, persistent_workers=True, seed_per_sample=False),
        }
        rates: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        drift: dict[tuple[str, str], float] = {}
        for kind in STEPS:
            for r in range(args.rounds):
                names = list(contenders) if r % 2 == 0 else list(contenders)[::-1]  # each first as often
                nets = {}
                for name in names:
                    (rate, us), nets[name] = contenders[name](kind)
                    rates.setdefault((kind, name), []).append(rate)
                    cpu.setdefault((kind, name), []).append(us)
                for name in names:  # the same batches in the same order: the same weights as its hand loop
                    hand = nets[name.split(":")[0] + (": hand loop" if name.startswith("stream") else
                                                      ": hand loop (persistent workers)")]
                    drift[(kind, name)] = max((a - b).abs().max().item() for a, b in
                                              zip(hand.parameters(), nets[name].parameters()))
    rows = []
    for (kind, name), values in rates.items():
        hand = (kind, "stream: hand loop" if name.startswith("stream") else "map: hand loop (persistent workers)")
        med, ref = statistics.median(values), statistics.median(rates[hand])
        us, us_ref = statistics.median(cpu[(kind, name)]), statistics.median(cpu[hand])
        rows.append([kind, name, f"{med:,.0f}", f"{min(values):,.0f}-{max(values):,.0f}", f"{med / ref:.3f}x",
                     f"{us:.1f}", f"{us_ref / us:.3f}x", f"{drift[(kind, name)]:.1e}"])
    return (f"Machine: {machine()}; {cpu_flags()}; {args.threads} thread(s) in the rank, {WORKERS} loader workers\n"
            f"{args.steps} steps of {BATCH} windows of {BLOCK} tokens per contender, the first {args.warmup} "
            f"left out; {args.rounds} rounds, interleaved\n\n"
            + table(["step", "contender", "samples/s (median)", "min-max", "vs hand loop",
                     "CPU us per sample (median)", "hand loop's CPU / this", "weights vs hand"], rows))


if __name__ == "__main__":
    print(main())
