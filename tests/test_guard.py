"""The non-finite guard without a per-step host sync (fused optimizers skip the bad step on the
device; the host hears of it at its next read), the fused optimizer the launcher builds by
default, and the throughput meter's recent window and steady epoch rate."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from launcher import Trainer
from launcher.fit import guard as G
from launcher.observe import progress as P


class NanAt(nn.Module):
    """Linear(2, 1) whose output is NaN at the training forward calls listed (1-based)."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.lin, self.bad, self.calls = nn.Linear(2, 1), bad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls in self.bad:
                return self.lin(x) * float("nan")
        return self.lin(x)


def _data(n: int = 200) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    return TensorDataset(x, x @ torch.tensor([[2.0], [-3.0]]) + 1)


def _fit(tmp: Path, net: nn.Module, optimizer, reads: list[int], monkeypatch, **kw):
    real = G.Guard.read

    def counted(self):  # every host read of the guard's flags, by the steps completed before it
        reads.append(trainer.progress.step)
        return real(self)

    monkeypatch.setattr(G.Guard, "read", counted)
    trainer = Trainer(batch_size=10, progress=False, logger="none", run_dir=tmp, summary=False, monitor="train_loss",
                      **kw)
    trainer.fit(net, nn.MSELoss(), optimizer, _data())
    return trainer


def test_fused_skip_never_applies_the_bad_step_and_reads_the_flags_rarely(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    net = NanAt({5, 33})
    reads: list[int] = []
    tr = _fit(tmp_path / "r", net, functools.partial(torch.optim.Adam, lr=0.01), reads, monkeypatch,
              max_epochs=3, nonfinite="skip", log_every_n_steps=8)
    opt = tr.parts.optimizer
    assert G.skips_on_device(opt), "the recipe-style partial was built fused"
    assert all(torch.isfinite(p).all() for p in net.parameters()), "no NaN reached the weights"
    # 3 epochs x 20 steps, two skipped on the device: Adam's own step count never saw them
    assert int(opt.state[next(iter(net.parameters()))]["step"]) == 58
    text = (tmp_path / "r" / "logs" / "rank-0.log").read_text()
    assert "non-finite loss or gradient norm at step 5: rank(s) [0] (loss [nan]); step skipped (1 so far)" in text
    assert "at step 33: rank(s) [0] (loss [nan]); step skipped (2 so far)" in text
    # read every 8 steps and at each epoch's end (its checkpoint reads nothing new): never per step
    assert len(reads) <= 60 // 8 + 3 * 2 + 2, reads
    assert 5 not in reads, "step 5's flag was read later, with the other steps of its window"


def test_fused_error_names_the_step_it_happened_at(tmp_path: Path, monkeypatch) -> None:
    net = NanAt({3})
    reads: list[int] = []
    with pytest.raises(FloatingPointError, match=r"at step 3: rank\(s\) \[0\] \(loss \[nan\]\); the optimizer did not"):
        _fit(tmp_path / "e", net, functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9), reads, monkeypatch,
             max_epochs=1, log_every_n_steps=10)
    assert reads == [9], "heard of at the first read (inside step 10), not at step 3"
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_an_optimizer_without_fused_kernel_is_checked_at_every_step(tmp_path: Path, monkeypatch) -> None:
    net = NanAt({4})
    reads: list[int] = []
    tr = _fit(tmp_path / "n", net, functools.partial(torch.optim.RMSprop, lr=0.01), reads, monkeypatch,
              max_epochs=1, nonfinite="skip")
    assert not G.skips_on_device(tr.parts.optimizer)
    text = (tmp_path / "n" / "logs" / "rank-0.log").read_text()
    # read at every step, but on a CPU that is no device->host sync: no advice about fused kernels there
    assert "fused" not in text and "sync per step" not in text
    assert reads[:5] == [0, 1, 2, 3, 4], "read before each optimizer step"
    assert "at step 4:" in text and all(torch.isfinite(p).all() for p in net.parameters())


def test_the_recipes_own_choice_of_implementation_is_kept(tmp_path: Path, monkeypatch) -> None:
    tr = _fit(tmp_path / "f", nn.Linear(2, 1), functools.partial(torch.optim.AdamW, lr=0.01, foreach=True), [],
              monkeypatch, max_epochs=1)
    assert not tr.parts.optimizer.param_groups[0]["fused"]
    tr = _fit(tmp_path / "g", nn.Linear(2, 1), functools.partial(torch.optim.AdamW, lr=0.01), [], monkeypatch,
              max_epochs=1)
    assert tr.parts.optimizer.param_groups[0]["fused"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_speed_shows_the_recent_rate_and_the_epochs_steady_rate(monkeypatch) -> None:
    clock = Clock()
    monkeypatch.setattr(P.time, "perf_counter", clock)
    s = P.Speed(samples_per_step=10, tokens_per_sample=4, flops_per_sample=1e9, peak_flops=1e12)
    s.start_epoch(0, 200)
    clock.now += 30.0  # the first step: compilation
    s.tick(1)
    for step in range(2, 101):  # then 1 step/s
        clock.now += 1.0
        s.tick(step)
    for step in range(101, 201):  # then 10 steps/s
        clock.now += 0.1
        s.tick(step)
    assert s.recent()["samples_per_s"] == pytest.approx(100.0, rel=0.06), "the last seconds, not the average"
    assert s.recent()["mfu"] == pytest.approx(0.1, rel=0.06) and s.recent()["tokens_per_s"] == pytest.approx(400, rel=0.06)
    with s.paused():  # a validation inside the epoch is not training time
        clock.now += 50.0
    steady = s.end_epoch(200)
    # warm-up: 10% of 200 steps = 20 steps; steps 20..200 took 80 + 10 s
    assert steady["samples_per_s"] == pytest.approx(180 / 90 * 10, rel=1e-6)
