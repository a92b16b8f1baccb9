"""Exact resume: a run SIGKILLed mid-epoch and resumed ends with weights bitwise equal to an
uninterrupted run's (CPU, same world size). MNIST's CNN has Dropout2d, so the RNG streams matter."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUIET, cli_env, mnist_small, run_cli, wait_for_file

# name -> (ranks, optimizer steps per epoch, overrides besides the run dir)
CASES = {
    "1-rank": (1, 20, []),  # MNIST: 2560 samples, batch 128 per rank, Dropout2d
    # 2 DDP ranks (no separate plain case: this one's every step is the plain one's plus no_sync)
    "2-ranks-accumulate-2": (2, 5, ["trainer.accumulate_grad_batches=2"]),
    # FSDP at the same world size: charlm, 40k characters -> 9 steps per epoch on 2 ranks
    "2-ranks-fsdp": (2, 9, ["recipe=charlm", "data.n_chars=40000", "trainer.max_steps=-1", "trainer.strategy=fsdp",
                            "trainer.log_every_n_steps=0"]),
}


def _args(root: Path, run_dir: Path, case: str) -> list[str]:
    nproc, _, extra = CASES[case]
    data = [] if "recipe=charlm" in extra else mnist_small(root, 2560, 512)
    return [*data, f"trainer.nproc={nproc}", "trainer.gpus=0", "trainer.max_epochs=3", "checkpoint.every_n_steps=3",
            *extra, *QUIET, f"run.dir={run_dir}"]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_killed_mid_epoch_then_resumed_is_bitwise_equal(tmp_path: Path, mnist_root: Path, case: str) -> None:
    """Bitwise: on CPU at the same world size every case is deterministic, sharded (FSDP) included."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = run_cli(_args(mnist_root, ref, case), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]

    # Kill the whole launcher (parent and ranks) once a checkpoint inside epoch 2 exists.
    kill_after = (CASES[case][1] // 3 + 1) * 3  # the first checkpoint inside epoch 2
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *_args(mnist_root, cut, case)], cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_file(cut / "checkpoints" / f"step-{kill_after:07d}" / "manifest.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (cut / "model.pt").exists(), "the run must really have been cut short"

    again = run_cli(_args(mnist_root, cut, case), cwd=tmp_path)  # the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    log = (cut / "logs" / "rank-0.log").read_text()
    assert "resumed from" in log
    resumed_at = [ln for ln in log.splitlines() if "resumed from" in ln][-1]
    assert "epoch 2 at batch" in resumed_at and "at batch 0" not in resumed_at, resumed_at  # inside epoch 2

    a = torch.load(ref / "model.pt", weights_only=True)
    b = torch.load(cut / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    with open(ref / "metrics.csv") as f1, open(cut / "metrics.csv") as f2:
        assert list(csv.DictReader(f1)) == list(csv.DictReader(f2)), "history (incl. epoch-2 train metrics) differs"
    # the coverage ledger across the kill (FSDP's sharded checkpoints and accumulation included): the same
    # counts, hash included, as the run that never stopped
    ledgers = [[json.loads(ln) for ln in (r / "ledger.jsonl").read_text().splitlines()] for r in (ref, cut)]
    assert ledgers[0] == ledgers[1] and len(ledgers[0]) == 3, ledgers
    assert all(e["complete"] and not e["partial"] and e["times"]["0"] == 0 for e in ledgers[0]), ledgers[0]


@pytest.mark.slow
def test_finished_run_rerun_does_nothing_more(tmp_path: Path) -> None:
    run_dir = tmp_path / "done"
    args = ["recipe=linreg", "trainer.max_epochs=2", *QUIET, f"run.dir={run_dir}"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    before = (run_dir / "metrics.csv").read_text()
    p = run_cli(args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (run_dir / "metrics.csv").read_text() == before
    assert "resumed from" in (run_dir / "logs" / "rank-0.log").read_text()
    assert "run complete at epoch 2, step 28 (trainer.max_epochs=2); raise trainer.max_epochs to continue it" \
        in p.stderr


def test_resume_from_explicit_path_and_more_epochs(tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert run_cli(["recipe=linreg", "trainer.max_epochs=2", *QUIET, f"run.dir={first}"], cwd=tmp_path).returncode == 0
    second = tmp_path / "second"
    p = run_cli(["recipe=linreg", "trainer.max_epochs=4", *QUIET, f"run.dir={second}",
                 f"resume={first / 'checkpoints' / 'last'}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    with open(second / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [14, 28, 42, 56]


@pytest.mark.slow
def test_resume_path_past_the_limit_says_so(tmp_path: Path) -> None:
    src = tmp_path / "src"
    assert run_cli(["recipe=linreg", "trainer.max_epochs=2", *QUIET, f"run.dir={src}"], cwd=tmp_path).returncode == 0
    p = run_cli(["recipe=linreg", "trainer.max_epochs=1", *QUIET, f"resume={src}", f"run.dir={tmp_path / 'dst'}"],
                cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert ("run complete at epoch 2, step 28 (trainer.max_epochs=1); raise trainer.max_epochs to continue it"
            in p.stderr), p.stderr[-2000:]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_extending_a_finished_run_by_max_steps_is_bitwise_one_straight_run(tmp_path: Path, mnist_root: Path) -> None:
    """max_steps ends the run inside an epoch: raising it continues from that very batch (the epoch
    is not closed there), so 12 + 18 steps end bitwise where 30 straight steps do, history included."""
    def args(run_dir: Path, steps: int) -> list[str]:
        # 20 steps per epoch: 12 and 30 both end inside one; deterministic: no CPU op of the CNN refuses it
        return [*mnist_small(mnist_root, 2560, 512), "trainer.max_epochs=5", f"trainer.max_steps={steps}",
                "trainer.deterministic=true", *QUIET, f"run.dir={run_dir}"]

    straight, extended = tmp_path / "straight", tmp_path / "extended"
    assert run_cli(args(straight, 30), cwd=tmp_path).returncode == 0
    p = run_cli(args(extended, 12), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(extended / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [12], "the part trained is reported"
    p = run_cli(args(extended, 30), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "epoch 1 at batch 12" in (extended / "logs" / "rank-0.log").read_text()
    a, b = _weights(straight / "model.pt"), _weights(extended / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ from one straight run"
    assert (straight / "metrics.csv").read_text() == (extended / "metrics.csv").read_text()  # rows 20, 30

    p = run_cli(args(extended, 30), cwd=tmp_path)  # complete: says so, trains nothing
    assert p.returncode == 0, p.stderr[-3000:]
    # inside epoch 2 (20 steps per epoch): the epoch the bar showed, not the last one completed
    assert "run complete at step 30, in epoch 2 of 5 (trainer.max_steps=30); raise trainer.max_steps to continue it" \
        in p.stderr


@pytest.mark.slow
def test_3_ddp_ranks_continued_is_bitwise_one_straight_run(tmp_path: Path, mnist_root: Path) -> None:
    """From 3 ranks on, the gradient all-reduce sums each element in an order that depends on its
    place in DDP's bucket, and DDP rebuilds its buckets after a process's first iteration: a
    continued process must train its first step in the rebuilt layout too (Stepper.settle_buckets),
    or its weights are off in the last bits (16 SLURM ranks were). At 2 ranks a + b == b + a, so the
    2-rank cases cannot see it. 3 + 3 steps end bitwise where 6 straight steps do."""
    def args(run_dir: Path, steps: int) -> list[str]:
        # 1536 samples, 3 ranks x 128 per batch: 4 steps per epoch; step 3 is inside epoch 1
        return [*mnist_small(mnist_root, 1536, 256), "trainer.nproc=3", "trainer.gpus=0", "trainer.max_epochs=2",
                f"trainer.max_steps={steps}", "trainer.summary=false", *QUIET, f"run.dir={run_dir}"]

    straight, continued = tmp_path / "straight", tmp_path / "continued"
    p = run_cli(args(straight, 6), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    for steps in (3, 6):
        p = run_cli(args(continued, steps), cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in (continued / "logs" / "rank-0.log").read_text()
    a, b = _weights(straight / "model.pt"), _weights(continued / "model.pt")
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], "weights differ from one straight run"
    assert (straight / "metrics.csv").read_text() == (continued / "metrics.csv").read_text()


@pytest.mark.slow
def test_fsdp_on_one_rank_checkpoints_and_resumes_at_2_ranks_and_back(tmp_path: Path) -> None:
    """strategy=fsdp with one rank: a process group of one, sharded checkpoints, which load at 2
    ranks and back at 1 (before: fully_shard called init_process_group with no RANK and crashed)."""
    run_dir = tmp_path / "fsdp1"
    base = ["recipe=linreg", "trainer.gpus=0", "trainer.strategy=fsdp", *QUIET, f"run.dir={run_dir}"]
    for nproc, steps, resumed in ((1, 20, None), (2, 27, 20), (1, 40, 27)):  # linreg: 14 steps/epoch at 1 rank
        p = run_cli([*base, f"trainer.nproc={nproc}", f"trainer.max_steps={steps}"], cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        last = run_dir / "checkpoints" / "last"
        assert (last / "sharded" / ".metadata").is_file()
        assert json.loads((last / "manifest.json").read_text())["step"] == steps
        log = (run_dir / "logs" / "rank-0.log").read_text()
        assert re.findall(r"rank 0 of (\d+)", log)[-1] == str(nproc)  # this segment's world
        if resumed is not None:
            assert f"step-{resumed:07d}: step {resumed}," in log
    assert (run_dir / "model.pt").is_file()
