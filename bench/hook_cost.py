"""The per-step cost of the loop's extension points, measured in one process as the minimum of many
repeats (robust on a shared machine, where whole-run rates swing 2x), beside the step it is added to:

  10 no-op callbacks   Callbacks.fire("on_step_end") with 10 callbacks overriding it with `pass`, against
                       one optimizer step of the overhead job (Linear(2, 1), batch 64, Adam, forward +
                       backward + step, no loader)
  EMA (decay 0.999)    EMA.on_step_end (one foreach lerp over the parameters) on the MNIST CNN, against one
                       fp32 training step of it at batch 128
  spike guard          SpikeGuard.begin + judge (the loss-sum snapshot and the median; one rank: no
                       all-reduce) on the overhead job's step
  phase clock          what observe/phases.py adds to every step on a CPU (on by default): the timed
                       next() of the batch generator (less a bare next()) and the forward, backward and
                       optimizer laps; plus one tracker row's fractions every log_every_n_steps=50, and
                       one straggler window's arithmetic every straggler_every=100 (the all_gather
                       itself exists only at 2 ranks or more)
Whole-run rates, interleaved: bench/callbacks.py (on an idle machine).
    python bench/hook_cost.py [--repeat 2000]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from common import machine, table


def best(fn: Callable[[], None], repeat: int, inner: int = 10) -> float:
    """Seconds per call: the minimum over `repeat` timings of `inner` calls."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


class View:
    """The RunView fields the measured hooks read (bench/goodput_cost.py too)."""
    step, world_size, rank, is_main = 1, 1, 0, True


def overhead_step() -> Callable[[], None]:
    """One optimizer step of the overhead job (Linear(2, 1), batch 64, Adam: forward, backward, step, no
    loader): the step a per-step cost is set beside (bench/goodput_cost.py too)."""
    lin = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    x, y = torch.randn(64, 2), torch.randn(64, 1)

    def tiny_step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(lin(x), y).backward()
        opt.step()

    return tiny_step


def main() -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import launcher
    from launcher.config import TrainerConfig
    from launcher.device.dist import Dist
    from launcher.fit.callbacks import Callbacks
    from launcher.fit.ema import EMA
    from launcher.fit.metrics import Accumulator
    from launcher.fit.spike import SpikeGuard
    from launcher.fit.steps import StepOutput
    from launcher.observe.phases import Phases
    from launcher.observe.stragglers import own_times
    from launcher.recipes.mnist import Net

    class NoOp(launcher.Callback):
        def on_step_end(self, run) -> None:  # noqa: D102
            pass

    tiny_step = overhead_step()
    cbs = Callbacks([NoOp() for _ in range(10)], View())  # type: ignore[arg-type]
    step_s = best(tiny_step, args.repeat)
    fire_s = best(lambda: cbs.fire("on_step_end"), args.repeat)

    t = TrainerConfig(spike_factor=3.0)
    acc = Accumulator({}, torch.device("cpu"))

    class Data:
        n = 100

    guard = SpikeGuard(t, Dist(), acc, Data())
    loss = torch.tensor(0.5)

    def guarded() -> None:
        guard.begin(0)
        acc.add(StepOutput(loss=loss), 64)
        guard.judge(1, 0, 1)

    spike_s = best(guarded, args.repeat) - best(lambda: acc.add(StepOutput(loss=loss), 64), args.repeat)

    # the MNIST CNN's step and its EMA update
    net = Net()
    mopt = torch.optim.Adam(net.parameters(), lr=1e-3)
    images, labels = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def mnist_step() -> None:
        mopt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(images), labels).backward()
        mopt.step()

    ema = EMA(0.999)

    class MnistView(View):
        model = net

    ema.on_fit_start(MnistView())  # type: ignore[arg-type]
    ema.on_step_end(MnistView())  # type: ignore[arg-type]  # the first update copies; the others lerp
    mnist_s = best(mnist_step, max(args.repeat // 100, 10), inner=2)
    ema_s = best(lambda: ema.on_step_end(MnistView()), args.repeat // 10)  # type: ignore[arg-type]
    # the phase clock: the timed next() and three laps per step; a row every 50 steps, a straggler window every 100
    import itertools

    ph = Phases(torch.device("cpu"))
    batch = (torch.randn(64, 2), torch.randn(64, 1))  # the overhead job's batch shapes
    timed = ph.batches(itertools.repeat(batch))
    bare = itertools.repeat(batch)

    def clocked() -> None:
        next(timed)
        ph.lap("forward")
        ph.lap("backward")
        ph.lap("optimizer")

    def windows() -> None:
        ph.lap("optimizer")  # a window holds a step at least
        ph.row()
        own_times(*ph.since("stragglers"))

    phase_s = best(clocked, args.repeat) - best(lambda: next(bare), args.repeat)
    phase_s += best(windows, args.repeat // 10) / 50
    rows = [["10 no-op callbacks (on_step_end)", f"{fire_s * 1e6:.2f} us", f"{step_s * 1e6:.0f} us (overhead job)",
             f"{fire_s / step_s:.2%}"],
            ["spike guard (1 rank)", f"{spike_s * 1e6:.2f} us", f"{step_s * 1e6:.0f} us (overhead job)",
             f"{spike_s / step_s:.2%}"],
            ["EMA 0.999 update", f"{ema_s * 1e6:.0f} us", f"{mnist_s * 1e3:.1f} ms (MNIST CNN, batch 128)",
             f"{ema_s / mnist_s:.2%}"],
            ["phase clock (on by default)", f"{phase_s * 1e6:.2f} us", f"{step_s * 1e6:.0f} us (overhead job)",
             f"{phase_s / step_s:.2%}"],
            ["phase clock (on by default)", f"{phase_s * 1e6:.2f} us", f"{mnist_s * 1e3:.1f} ms (MNIST CNN, batch 128)",
             f"{phase_s / mnist_s:.3%}"]]
    return f"{machine()}, torch threads 1\n\n" + table(["added per step", "cost", "the step", "share"], rows)


if __name__ == "__main__":
    print(main())
