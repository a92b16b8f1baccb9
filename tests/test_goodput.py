"""Goodput across attempts (docs/observing.md "Goodput", issue 28 item 5), in-process: two fits of one run dir
through the Python API (two attempts, their records, goodput.json and the trackers), the lost-work rule on an
attempt's records (a resume further back than the last attempt, a torn line, a killed attempt's live record),
the key's check. A run SIGKILLed twice is tests/test_callbacks.py's; a SLURM requeue, tests/test_slurm.py's."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher import Trainer
from launcher.config import ConfigError, TrainerConfig, check_trainer
from launcher.observe import goodput_sums as S


def _data(n: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.tensor([[2.0], [-3.0]]) + 1)


def _fit(run_dir: Path, epochs: int) -> None:
    torch.manual_seed(0)
    Trainer(max_epochs=epochs, batch_size=8, run_dir=str(run_dir), progress=False, summary=False,
            logger="tensorboard", checkpoint_every_n_steps=3).fit(
        torch.nn.Linear(2, 1), torch.nn.MSELoss(), functools.partial(torch.optim.SGD, lr=0.01), _data(64), _data(16))


def test_two_fits_of_one_run_dir_are_two_attempts_of_one_goodput(tmp_path: Path) -> None:
    run = tmp_path / "run"
    began = time.time()
    _fit(run, 1)
    _fit(run, 2)  # the same run continued: 8 steps more
    ended = time.time()
    g = json.loads((run / "goodput.json").read_text())
    assert [(a["attempt"], a["how"], a["steps"]) for a in g["attempts"]] == [(1, "done", [0, 8]), (2, "done", [8, 16])]
    assert g["steps"] == {"trained": 16, "lost": 0, "final": 16}
    b = g["buckets_s"]
    # the Python API's first attempt began with its process (here pytest's), its last ended before fit() returned
    assert g["began"] == pytest.approx(S.process_start(), abs=0.05) and began < g["ended"] <= ended
    assert abs(sum(b.values()) - g["wall_s"]) < 0.01
    assert b["lost"] == b["queue"] == 0 and min(b["productive"], b["checkpoint"], b["validation"]) > 0, b
    assert g["attempts"][1]["began"] >= g["attempts"][0]["ended"]
    assert g == S.compute(S.read(run)), "goodput.json is what its records say"
    kinds = [json.loads(ln)["e"] for ln in (run / "goodput.jsonl").read_text().splitlines()]
    assert kinds.count("start") == kinds.count("end") == 2 and kinds.count("epoch") == 2 and "ckpt" in kinds
    log = (run / "logs" / "rank-0.log").read_text()
    assert "goodput " in log and "2 attempts" in log
    journal = (run / "goodput.jsonl").read_text()
    _fit(run, 2)  # the finished run asked again: nothing to train, not an attempt of its training
    assert (run / "goodput.jsonl").read_text() == journal
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("goodput")][-1] == pytest.approx(g["goodput"], abs=1e-4)
    assert {"goodput_lost_s", "goodput_startup_s", "goodput_checkpoint_s"} <= set(acc.Tags()["scalars"])


def _attempt(a: int, t0: float, from_step: int, to_step: int, ckpts: list[int], step_s: float = 1.0) -> list[dict]:
    """An attempt's records: started at t0 + 1 (1 s start-up), one step a second, a checkpoint record at each
    of `ckpts` (each save blocks 0.5 s after it)."""
    fit = t0 + 1.0
    out = [{"e": "start", "a": a, "t": fit, "t0": t0, "step": from_step}]
    blocked, t = 0.0, fit
    for step in range(from_step + 1, to_step + 1):
        t += step_s
        if step in ckpts:
            out.append({"e": "ckpt", "a": a, "t": t, "step": step, "ckpt": blocked, "val": 0.0})
            blocked, t = blocked + 0.5, t + 0.5
    out.append({"e": "beat", "a": a, "t": t, "step": to_step, "ckpt": blocked, "val": 0.0})
    return out


def test_lost_work_is_every_step_trained_past_the_step_a_later_attempt_resumed_at(tmp_path: Path) -> None:
    # attempt 1: steps 1..20, checkpoints at 10 and 20, killed. Its checkpoint of 20 proves damaged: attempt 2
    # resumes at 10, trains 11..25 and is killed without a checkpoint; attempt 3 resumes at 10 again, ends at 30.
    a1 = _attempt(1, 100.0, 0, 20, [10, 20])
    a2 = _attempt(2, a1[-1]["t"] + 4.0, 10, 25, [])
    a3 = _attempt(3, a2[-1]["t"] + 2.0, 10, 30, [30])
    a3.append({**a3[-1], "e": "end", "how": "done"})
    g = S.compute(a1 + a2 + a3)
    assert g["steps"] == {"trained": 20 + 15 + 20, "lost": 10 + 15, "final": 30}
    b = g["buckets_s"]
    assert b["lost"] == pytest.approx(10 + 15)  # a second a step; attempt 1's save of step 20 is a stall, not lost
    assert b["productive"] == pytest.approx(30) and b["checkpoint"] == pytest.approx(1.5)
    assert b["startup"] == pytest.approx(3) and b["between_attempts"] == pytest.approx(6)
    assert sum(b.values()) == pytest.approx(g["wall_s"]) and g["wall_s"] == pytest.approx(a3[-1]["t"] - 100.0)
    assert [a["discarded_s"] for a in g["attempts"]] == [0, 10, 15]

    # on disk: a line torn by the kill is skipped; attempt 2's live record (newer than its journal) counts
    (tmp_path / S.JOURNAL).write_text("".join(json.dumps(r) + "\n" for r in a1 + a2[:-1]) + '{"e": "ckpt", "a"')
    (tmp_path / S.LIVE).write_text(json.dumps({k: v for k, v in a2[-1].items() if k != "e"}))
    got = S.compute(S.read(tmp_path))
    assert got["steps"]["trained"] == 35 and got["attempts"][-1]["steps"] == [10, 25]
    assert S.newer_live(tmp_path, S.journal(tmp_path) + [{**a2[-1], "e": "end"}]) is None  # an ended attempt's


def test_a_slurm_jobs_queue_time_is_its_own_bucket() -> None:
    a1 = _attempt(1, 1000.0, 0, 5, [5])
    a1[0].update(submit=990.0, sched=1000.0)
    a1.append({**a1[-1], "e": "end", "how": "requeue"})
    a2 = _attempt(2, a1[-1]["t"] + 30.0, 5, 10, [10])
    a2[0].update(submit=a1[-1]["t"] + 2.0, sched=a2[0]["t0"])  # requeued 2 s after the end, queued 28 s
    g = S.compute(a1 + a2)
    assert g["buckets_s"]["queue"] == pytest.approx(10 + 28) and g["buckets_s"]["between_attempts"] == pytest.approx(2)
    assert g["began"] == 990.0 and g["steps"]["lost"] == 0
    assert S.line(g).startswith("goodput ") and "queued" in S.line(g)


def test_the_key_is_checked_once_with_its_schema() -> None:
    with pytest.raises(ConfigError, match=r"trainer\.goodput_every_s=-1.0: must be >= 0 seconds"):
        check_trainer(TrainerConfig(goodput_every_s=-1.0))
    check_trainer(TrainerConfig(goodput_every_s=0.0))
