"""Callbacks (launcher/fit/callbacks.py, issue 27): the hooks in order, a resumable callback's state across a
SIGKILL exactly as an uninterrupted run's, attempt hooks that leave the training RNG alone, a raising hook
in one line, rank 0 only as a helper."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import launcher
from conftest import QUIET, SUPPORT, cli_env, run_cli
from launcher import Trainer
from launcher.checkpoint import format as F
from launcher.config import UserError


def _data(n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.tensor([[2.0], [-3.0]]) + 1)


class Events(launcher.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_fit_start(self, run) -> None:
        self.seen.append(("fit_start", run.step))

    def on_checkpoint_restored(self, run, path) -> None:
        self.seen.append((f"restored {path.name}", run.step))

    def on_step_end(self, run) -> None:
        self.seen.append(("step_end", run.step))

    def on_validation_start(self, run) -> None:
        self.seen.append(("validation_start", run.step))

    def on_validation_end(self, run, metrics) -> None:
        self.seen.append((f"validation_end {sorted(metrics)}", run.step))

    def on_epoch_end(self, run, row) -> None:
        self.seen.append((f"epoch_end {row['epoch']} {run.metrics is not None}", run.step))

    def on_checkpoint(self, run, path) -> None:
        self.seen.append((f"checkpoint {path.name}", run.step))

    def on_checkpoint_saved(self, run, path) -> None:
        # complete: committed under its own name, its manifest's checksums match what is on disk
        self.seen.append((f"saved {path.name} {'complete' if F.verify(path) is None else F.verify(path)}", run.step))

    def on_fit_end(self, run) -> None:
        self.seen.append((f"fit_end {run.ending}", run.step))


def _fit(tmp_path: Path, callbacks: list, **kw) -> Trainer:
    import callback_samples

    torch.manual_seed(0)
    tr = Trainer(run_dir=tmp_path / "run", progress=False, logger="none", gpus=0, batch_size=16,
                 **{"max_epochs": 2, **kw})
    tr.fit(callback_samples.Dropped(), torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.01), _data(),
           _data(32), callbacks=callbacks)
    return tr


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_the_hooks_in_order(tmp_path: Path, async_save: bool) -> None:
    events = Events()
    _fit(tmp_path, [events], checkpoint_every_n_steps=3, checkpoint_async=async_save)
    # 64 samples, batch 16: 4 steps an epoch; checkpoints at steps 3, 4 (epoch end), 6, 8 (epoch end and the run's).
    # on_checkpoint_saved: a sync save right after it; an async one where the loop next waits for it (the next
    # save, the fit's end); either way the folder is complete when the hook reads it
    val = [("validation_start", 4), ("validation_end ['val_loss']", 4)]
    saved = {n: ("saved step-000000%d complete" % n,) for n in (3, 4, 6, 8)}
    sync = [("fit_start", 0), ("step_end", 1), ("step_end", 2), ("step_end", 3), ("checkpoint step-0000003", 3),
            (*saved[3], 3), ("step_end", 4), *val, ("epoch_end 1 True", 4), ("checkpoint step-0000004", 4),
            (*saved[4], 4), ("step_end", 5), ("step_end", 6), ("checkpoint step-0000006", 6), (*saved[6], 6),
            ("step_end", 7), ("step_end", 8), *[(v, 8) for v, _ in val], ("epoch_end 2 True", 8),
            ("checkpoint step-0000008", 8), (*saved[8], 8), ("fit_end done", 8)]
    asynchronous = [("fit_start", 0), ("step_end", 1), ("step_end", 2), ("step_end", 3), ("checkpoint step-0000003", 3),
                    ("step_end", 4), *val, ("epoch_end 1 True", 4), (*saved[3], 4), ("checkpoint step-0000004", 4),
                    ("step_end", 5), ("step_end", 6), (*saved[4], 6), ("checkpoint step-0000006", 6),
                    ("step_end", 7), ("step_end", 8), *[(v, 8) for v, _ in val], ("epoch_end 2 True", 8),
                    (*saved[6], 8), ("checkpoint step-0000008", 8), (*saved[8], 8), ("fit_end done", 8)]
    assert events.seen == (asynchronous if async_save else sync)
    ok = "complete"
    # the same command with one epoch more: restored, the restored checkpoint's on_checkpoint_saved again (its
    # state is from before it), then on as the uninterrupted run
    again = Events()
    _fit(tmp_path, [again], max_epochs=3, checkpoint_every_n_steps=0, checkpoint_async=async_save)
    assert again.seen[:4] == [("restored step-0000008", 8), (f"saved step-0000008 {ok}", 8), ("fit_start", 8),
                              ("step_end", 9)]
    assert again.seen[-3:] == [("checkpoint step-0000012", 12), (f"saved step-0000012 {ok}", 12), ("fit_end done", 12)]


def test_attempt_hooks_leave_the_training_rng_alone(tmp_path: Path) -> None:
    """Counter draws from torch's RNG in on_fit_start (an attempt hook: put back) and after every step (a
    training hook: part of the stream, as a user's own code in the loop would be)."""
    import callback_samples

    plain = _fit(tmp_path / "a", [], max_epochs=1).state_dict()
    drawn = _fit(tmp_path / "b", [callback_samples.Counter()], max_epochs=1).state_dict()

    class FitStartOnly(launcher.Callback):
        def on_fit_start(self, run) -> None:
            torch.rand(10)

    started = _fit(tmp_path / "c", [FitStartOnly()], max_epochs=1).state_dict()
    assert all(torch.equal(plain[k], started[k]) for k in plain), "on_fit_start's draws reached the training"
    assert not all(torch.equal(plain[k], drawn[k]) for k in plain), "on_step_end's draws are in the stream"


def test_a_raising_hook_is_one_line_naming_it(tmp_path: Path) -> None:
    class Boom(launcher.Callback):
        def on_step_end(self, run) -> None:
            if run.step == 3:
                raise ValueError("no good")

    class Heard(launcher.Callback):  # on_error: the step and the error that ends the fit
        def __init__(self) -> None:
            self.heard: list[tuple[int, BaseException]] = []

        def on_error(self, run, error) -> None:
            self.heard.append((run.step, error))

    class Clumsy(launcher.Callback):
        def on_error(self, run, error) -> None:
            raise RuntimeError("clumsy too")

    heard = Heard()
    with pytest.raises(UserError, match=r"^callbacks\[1\] \(Boom\)\.on_step_end raised at step 3: ValueError: no good$") as e:
        _fit(tmp_path, [Events(), Boom(), Clumsy(), heard])
    # the raising on_error hid neither the error nor the hooks after it
    assert heard.heard == [(3, e.value)] and isinstance(e.value.__cause__, ValueError)
    log = (tmp_path / "run" / "logs" / "rank-0.log").read_text()
    assert "Traceback" in log and "callbacks[2] (Clumsy).on_error raised: RuntimeError: clumsy too" in log
    with pytest.raises(UserError, match=r"callbacks\[0\] \(int\): defines none of the hooks"):
        _fit(tmp_path / "b", [3])


def test_the_view_is_read_only_and_a_try_to_write_leaves_the_run_alone(tmp_path: Path) -> None:
    class Meddler(launcher.Callback):
        def __init__(self) -> None:
            self.refused: list[str] = []

        def _try(self, what: str, write: Any) -> None:
            try:
                write()
            except (AttributeError, TypeError):
                self.refused.append(what)

        def on_step_end(self, run) -> None:
            self._try("max_epochs", lambda: setattr(run.config.trainer, "max_epochs", 1))
            self._try("trainer", lambda: setattr(run.config, "trainer", None))
            run.config.trainer.fsdp_wrap.append("Linear")  # a list field: the callback's own copy

        def on_validation_end(self, run, metrics) -> None:
            self._try("metrics", lambda: setattr(run, "metrics", {}))
            self._try("metrics[key]", lambda: run.metrics.__setitem__("val_loss", 0.0))

    m = Meddler()
    tr = _fit(tmp_path, [m], max_epochs=2)
    assert set(m.refused) == {"max_epochs", "trainer", "metrics", "metrics[key]"}
    assert len(tr.history) == 2 and tr.cfg.trainer.max_epochs == 2 and tr.cfg.trainer.fsdp_wrap == []
    assert tr.callbacks.view.metrics["epoch"] == 2  # the epoch row, as the run reported it


ARGS = ["--config-dir", str(SUPPORT / "callback_conf"), "recipe=counted", "trainer.gpus=0", "checkpoint.every_n_steps=4",
        "trainer.ema_decay=0.9", *QUIET]


def _killed(tmp: Path, args: list[str], kills: str, attempts: int) -> tuple[Path, Path, float, str]:
    """The same command run uninterrupted (ref) and SIGKILLed without warning at the steps `kills` names, 0.5 s
    after each (cut), then run again until done: (ref, cut, the wall clock of cut's attempts, its last stderr)."""
    ref, cut = tmp / "ref", tmp / "cut"
    p = run_cli([*args, f"run.dir={ref}"], cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    began = time.time()
    for attempt in range(attempts):
        proc = subprocess.Popen([sys.executable, "-m", "launcher", *args, f"run.dir={cut}"], cwd=tmp,
                                env=cli_env(KILL_AT_STEPS=kills, KILL_AFTER_S="0.5"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        _, err = proc.communicate(timeout=240)
        last = attempt == attempts - 1
        assert proc.returncode == (0 if last else -signal.SIGKILL), f"attempt {attempt + 1}: {err[-3000:]}"
        assert (cut / "model.pt").exists() == last
    return ref, cut, time.time() - began, err


def _as_if_never_stopped(ref: Path, cut: Path, ranks: int, steps: int, attempts: int) -> None:
    """Each rank's Counter ends with the counts and the RNG draws of the uninterrupted run; the weights and
    their EMA (trainer.ema_decay, a callback) are bitwise equal."""
    for rank in range(ranks):
        a, b = (json.loads((r / f"counter-rank{rank}.json").read_text()) for r in (ref, cut))
        assert a["steps"] == b["steps"] == list(range(1, steps + 1))
        assert a["draws"] == b["draws"] and a["counts"]["on_step_end"] == steps
        # the training hooks, and on_checkpoint_saved (said again for the checkpoint a run resumes from)
        for hook in ("on_step_end", "on_validation_start", "on_validation_end", "on_epoch_end", "on_checkpoint",
                     "on_checkpoint_saved"):
            assert a["counts"][hook] == b["counts"][hook] > 0, hook
        # attempt hooks: once per process that ran the fit
        assert (a["counts"]["on_fit_start"], b["counts"]["on_fit_start"]) == (1, attempts)
        assert (a["counts"]["on_checkpoint_restored"], b["counts"]["on_checkpoint_restored"]) == (0, attempts - 1)
        assert a["counts"]["on_fit_end"] == b["counts"]["on_fit_end"] == 1 and a["counts"]["on_error"] == 0
    for name in ("model.pt", "model-ema.pt"):
        w = [torch.load(r / name, weights_only=True) for r in (ref, cut)]
        assert all(torch.equal(w[0][k], w[1][k]) for k in w[0]), name


def test_one_rank_killed_resumes_its_callbacks_and_the_ema_bitwise(tmp_path: Path) -> None:
    """1 rank, one epoch (280 samples / 8: 35 steps), SIGKILLed at step 10 (2 past the checkpoint of step 8)."""
    ref, cut, _, _ = _killed(tmp_path, [*ARGS, "trainer.nproc=1", "trainer.max_epochs=1"], "10", attempts=2)
    _as_if_never_stopped(ref, cut, ranks=1, steps=35, attempts=2)


@pytest.fixture(scope="module")
def killed_twice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float, str]:
    """2 ranks, 4 epochs of 18 steps (280 samples / 2 ranks / 8): SIGKILLed at step 15, 3 steps past the
    checkpoint of step 12, then at step 31, 3 past step 28's; the 3rd attempt passes both kills. One run for
    two claims: the callbacks' (below) and goodput's (a timing failure there is goodput's, not the callbacks')."""
    return _killed(tmp_path_factory.mktemp("killed"), [*ARGS, "trainer.nproc=2", "trainer.goodput_every_s=0.1"],
                   "15,31", attempts=3)


@pytest.mark.slow
def test_a_callbacks_state_survives_a_sigkill_as_if_never_stopped(killed_twice: tuple[Path, Path, float, str]) -> None:
    """2 ranks, a recipe's callbacks, killed twice: as if never stopped, per rank; MainOnly wrote on rank 0 only."""
    ref, cut, _, _ = killed_twice
    _as_if_never_stopped(ref, cut, ranks=2, steps=72, attempts=3)
    draws = [json.loads((ref / f"counter-rank{r}.json").read_text())["draws"] for r in (0, 1)]
    assert draws[0] != draws[1], "each rank's own stream"
    assert (ref / "epochs.txt").read_text() == "1 rank 0\n2 rank 0\n3 rank 0\n4 rank 0\n"


@pytest.mark.slow
def test_goodput_counts_the_kills(killed_twice: tuple[Path, Path, float, str]) -> None:
    """Goodput across the three attempts (RUN_DIR/goodput.json): its buckets sum to the wall clock the test
    measured, and its lost work is the steps trained twice (the Killer callback's own journal)."""
    _, cut, wall, err = killed_twice
    _goodput_counts_the_kills(cut, wall, err)


def _goodput_counts_the_kills(cut: Path, wall: float, last_stderr: str) -> None:
    """RUN_DIR/goodput.json of the run killed at steps 15 and 31 (resumed from 12 and 28), against the Killer's
    journal: `step time` after each step trained, in the order trained, all attempts."""
    g = json.loads((cut / "goodput.json").read_text())
    lines = (cut / "steps-trained.txt").read_text().splitlines()
    trained = [(int(s), float(t)) for s, t in (ln.split() for ln in lines)]
    twice = len(trained) - len({s for s, _ in trained})
    assert twice == 6 and g["steps"] == {"trained": len(trained), "lost": twice, "final": 72}, (g["steps"], twice)
    assert [(a["how"], a["steps"]) for a in g["attempts"]] == [("killed", [0, 15]), ("killed", [12, 31]),
                                                              ("done", [28, 72])]
    total = sum(g["buckets_s"].values())
    assert abs(total - g["wall_s"]) < 0.01, (total, g["wall_s"])
    # goodput's clock runs from the first CLI process's start to the last attempt's last record: inside the
    # test's, which adds the fork before it and the last attempt's exit after it (the ranks' teardown, the
    # interpreter's exit: up to a second on a loaded 2-core machine), so the margin is one-sided
    assert -0.05 <= wall - g["wall_s"] <= 0.02 * wall + 1.0, (g["wall_s"], wall)
    # the lost seconds: from each killed attempt's step R (the next one's resume) to its last step, by the journal
    # (less the checkpoint of R, in its own bucket), to within, per kill, the live record's period (0.1 s) and
    # as much again for a record written late on a loaded machine
    first = {}
    for s, t in trained:
        first.setdefault(s, t)
    lost = first[15] - first[12] + first[31] - first[28]
    assert 0 < g["buckets_s"]["lost"] and abs(g["buckets_s"]["lost"] - lost) < 2 * (0.1 + 0.1), (g["buckets_s"], lost)
    assert g["buckets_s"]["between_attempts"] >= 2 * 0.5 - 0.2  # each kill came 0.5 s after its last step
    assert g["buckets_s"]["startup"] > 0 and g["buckets_s"]["checkpoint"] > 0 and g["buckets_s"]["validation"] > 0
    assert "; goodput " in last_stderr.splitlines()[-1] and "lost" in last_stderr.splitlines()[-1], last_stderr[-500:]
