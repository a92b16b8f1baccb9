"""GPU truth (issue 11, item 5): the contracts the CPU tests prove, run again on a CUDA GPU through
the real CLI. Every test needs one visible GPU at least; without CUDA the whole file skips with one
reason. With N >= 2 GPUs the same tests run unchanged, the multi-rank one on one GPU per rank (nccl).

    python -m pytest -q tests/test_gpu.py -rs

Recipes are the small ones (charlm with 40k characters: 18 steps per epoch at batch 32 on one rank;
linreg; a 2560-image MNIST slice) so each test stays well under a minute on an H100: most of the
time is interpreter start and CUDA initialisation, a few seconds per run.

Bitwise comparisons run with trainer.deterministic=true: on a GPU that is the contract (cuBLAS
workspace, deterministic kernels, no cuDNN autotuning); without it a resumed run equals an
uninterrupted one only by luck. They use charlm, not mnist: the MNIST CNN's AdaptiveMaxPool2d has
no deterministic CUDA backward (torch raises `adaptive_max_pool2d_backward_cuda does not have a
deterministic implementation`), charlm's ops all have one (cuBLAS matmuls, SDPA's deterministic
flash / memory-efficient backward, 1-D cross-entropy, embeddings).
"""

from __future__ import annotations

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
from conftest import rows as _rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

# GPUs this machine shows (0 where the file skips); counted once, like the launcher does per run
VISIBLE = torch.cuda.device_count() if torch.cuda.is_available() else 0
SHARE_GPU_ENV = "LAUNCHER_TEST_SHARE_GPU"  # the launcher's test-only override (launcher/device/dist.py)
ONE_GPU = ["trainer.gpus=1"]
DET = ["trainer.deterministic=true"]
# charlm small enough for a few seconds a run: 40k characters -> 562 training windows, 18 steps per
# epoch at batch 32 on one rank; max_steps off unless a test sets it (the recipe's own is 300)
CHARLM = ["recipe=charlm", "data.n_chars=40000", "trainer.max_steps=-1", "trainer.log_every_n_steps=0", *QUIET]
RANK_LINE = re.compile(r"rank (\d+) of (\d+) \(local rank (\d+)\) on node \S+, device (\S+), pid (\d+)")


@pytest.fixture(autouse=True)
def _no_share_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU-sharing override must reach a run only where a test passes it: a shell that exported
    it would let the refusal test pass trainer.gpus=2 and turn nccl runs into gloo ones."""
    monkeypatch.delenv(SHARE_GPU_ENV, raising=False)


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, f"exit {p.returncode}:\n{p.stderr[-4000:]}"


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True, map_location="cpu")


def _assert_bitwise(a_dir: Path, b_dir: Path) -> None:
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"final weights differ in {differ}"


def _ranks(run_dir: Path) -> dict[int, tuple[int, str]]:
    """rank -> (world size, device) as each rank's log says in its latest start."""
    out = {}
    for log in sorted((run_dir / "logs").glob("rank-*.log")):
        found = RANK_LINE.findall(log.read_text())
        assert found, f"{log} has no rank line"
        rank, world, _, device, _ = found[-1]
        out[int(rank)] = (int(world), device)
    return out


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")


def _straight_and_extended(tmp_path: Path, extra: list[str], first: int = 12, total: int = 30) -> tuple[Path, Path]:
    """One run of `total` steps, and one stopped by max_steps at `first` then continued to `total`
    in the same run dir (both ends inside an epoch of 18 steps). Returns (straight, extended)."""
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    _ok(run_cli([*CHARLM, *ONE_GPU, *DET, "trainer.max_epochs=5", f"trainer.max_steps={total}", *extra,
                 f"run.dir={straight}"], cwd=tmp_path))
    _ok(run_cli([*CHARLM, *ONE_GPU, *DET, "trainer.max_epochs=5", f"trainer.max_steps={first}", *extra,
                 f"run.dir={extended}"], cwd=tmp_path))
    assert (extended / "checkpoints" / f"step-{first:07d}" / "manifest.json").is_file()
    return straight, extended


def _extend(tmp_path: Path, extended: Path, extra: list[str], total: int = 30) -> None:
    _ok(run_cli([*CHARLM, *ONE_GPU, *DET, "trainer.max_epochs=5", f"trainer.max_steps={total}", *extra,
                 f"run.dir={extended}"], cwd=tmp_path))


# ---- devices ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", [None, 1, -1], ids=["unset", "1", "all"])
def test_trainer_gpus_picks_cuda(tmp_path: Path, gpus: int | None) -> None:
    """unset = one GPU when CUDA is there; 1 = one; -1 = every visible GPU, rank r on cuda:r.
    precision stays `auto` here: on a GPU with native bf16 (Ampere and later) it must become bf16-mixed."""
    run_dir = tmp_path / "run"
    args = ["recipe=linreg", "trainer.max_epochs=2", "trainer.progress=false", f"run.dir={run_dir}"]
    p = run_cli([*args, *([] if gpus is None else [f"trainer.gpus={gpus}"])], cwd=tmp_path)
    _ok(p)
    ranks = VISIBLE if gpus == -1 else 1
    assert _ranks(run_dir) == {r: (ranks, f"cuda:{r}") for r in range(ranks)}
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.5 has no emulation to exclude
        native = torch.cuda.is_bf16_supported()
    expected = "precision bf16-mixed (auto: " if native else "precision 32 (auto: "
    assert expected in p.stderr, p.stderr[-2000:]
    assert (run_dir / "model.pt").is_file()


def test_more_gpus_than_visible_is_refused_in_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    p = run_cli(["recipe=linreg", f"trainer.gpus={VISIBLE + 1}", *QUIET, f"run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    want = f"launcher: error: trainer.gpus={VISIBLE + 1}: this machine has {VISIBLE} visible GPU"
    assert lines[0].startswith(want), lines[0]
    assert not run_dir.exists(), "a refused run writes nothing"


def test_cpu_ranks_on_a_gpu_host_never_touch_the_gpu(tmp_path: Path) -> None:
    """trainer.gpus=0 with 2 ranks: the CPU ranks are forked from the launcher, which counted the GPUs
    first. Before the fix they died on their first CUDA call (cudaErrorInitializationError; Adam's
    capture check is one). linreg trains with Adam. Each rank's checkpointed RNG state is the
    witness from inside: it holds a "cuda" stream only when torch.cuda.is_initialized() there."""
    run_dir = tmp_path / "run"
    p = run_cli(["recipe=linreg", "trainer.gpus=0", "trainer.nproc=2", "trainer.max_epochs=2", *QUIET,
                 f"run.dir={run_dir}"], cwd=tmp_path)
    _ok(p)
    assert _ranks(run_dir) == {0: (2, "cpu"), 1: (2, "cpu")}
    ranks = _state(run_dir / "checkpoints" / "last")["ranks"]
    assert len(ranks) == 2
    assert all("cuda" not in r["rng"] for r in ranks), "a CPU rank initialised CUDA"


def test_two_ranks_on_gpus(tmp_path: Path, mnist_root: Path) -> None:
    """The multi-rank GPU launch path: fresh interpreters, local rank -> device, DDP on CUDA tensors,
    DistributedSampler, rank 0's checkpoint. With 2+ GPUs: one per rank over nccl. With one GPU the
    test-only override puts both ranks on cuda:0 over gloo (nccl refuses two ranks on one device)."""
    run_dir = tmp_path / "run"
    env = {} if VISIBLE >= 2 else {SHARE_GPU_ENV: "1"}
    p = run_cli([*mnist_small(mnist_root, 2560, 512), "trainer.gpus=2", "trainer.max_epochs=2", *QUIET,
                 f"run.dir={run_dir}"], cwd=tmp_path, **env)
    _ok(p)
    assert _ranks(run_dir) == {r: (2, f"cuda:{r % VISIBLE}") for r in range(2)}
    # the sampler split the data: 2560 images / (128 per rank x 2 ranks) = 10 steps per epoch
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == ["10", "20"]
    assert float(rows[1]["val_loss"]) < float(rows[0]["val_loss"]), rows  # it learns (2.24 -> 2.11 on 2 CPU ranks)
    last = run_dir / "checkpoints" / "last"
    assert json.loads((last / "manifest.json").read_text())["world_size"] == 2
    ranks = _state(last)["ranks"]  # rank 0 gathered both ranks' state; both worked on CUDA
    assert len(ranks) == 2 and all("cuda" in r["rng"] for r in ranks)
    assert (run_dir / "model.pt").is_file()


# ---- precision, compile ----------------------------------------------------------------------------------


def test_bf16_mixed_trains(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    p = run_cli([*CHARLM, *ONE_GPU, "trainer.max_epochs=2", "trainer.precision=bf16-mixed", f"run.dir={run_dir}"],
                cwd=tmp_path)
    _ok(p)
    assert "precision bf16-mixed (set)" in p.stderr
    rows = _rows(run_dir)
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) < 3.97  # below uniform guessing (ln 53)
    w = _weights(run_dir)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in w.values()), "weights stay float32"


def test_16_mixed_resumes_its_grad_scaler(tmp_path: Path) -> None:
    """16-mixed: 12 steps, then continued to 30, equals 30 straight steps bitwise, and the GradScaler
    goes on from its checkpointed state. A scaler reset on resume (scale 2**16, growth tracker 0)
    would end with another scale/tracker than the straight run and skip other steps."""
    extra = ["trainer.precision=16-mixed"]
    straight, extended = _straight_and_extended(tmp_path, extra)
    at12 = _state(extended / "checkpoints" / "step-0000012")["scaler"]
    assert at12 and at12["scale"] > 0
    # something to restore: not the fresh scaler's state (12 steps counted, or a backoff happened)
    assert at12["_growth_tracker"] > 0 or at12["scale"] != 2.0 ** 16, at12
    _extend(tmp_path, extended, extra)
    assert "resumed from" in (extended / "logs" / "rank-0.log").read_text()
    final = _state(extended / "checkpoints" / "last")["scaler"]
    assert final == _state(straight / "checkpoints" / "last")["scaler"]
    if final["scale"] == at12["scale"]:  # no overflow after step 12: the tracker counted on from 12
        assert final["_growth_tracker"] == at12["_growth_tracker"] + 18, (at12, final)
    _assert_bitwise(straight, extended)


def test_compile_trains_like_eager(tmp_path: Path) -> None:
    """trainer.compile=true: the compiled model learns what the eager one does (fused kernels round
    differently, so close, not bitwise) and its checkpoint keys keep their names (no _orig_mod.)."""
    runs = {}
    for compile_ in ("true", "false"):
        runs[compile_] = tmp_path / f"compile-{compile_}"
        _ok(run_cli([*CHARLM, *ONE_GPU, "trainer.max_steps=30", "trainer.max_epochs=5", f"trainer.compile={compile_}",
                     f"run.dir={runs[compile_]}"], cwd=tmp_path, timeout=400))
    a, b = _rows(runs["true"])[-1], _rows(runs["false"])[-1]
    assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=2e-2), (a, b)
    assert _weights(runs["true"]).keys() == _weights(runs["false"]).keys()


# ---- FSDP, checkpoints, resume ----------------------------------------------------------------------------


# FSDP2's memory knobs with activation checkpointing (docs/big-models.md): the CPU-offloaded shards'
# collectives go over gloo beside nccl (dist.init cpu_collectives)
KNOBS = ["trainer.fsdp_cpu_offload=true", "trainer.fsdp_reshard_after_forward=false",
         "trainer.fsdp_reduce_dtype=bfloat16", "trainer.activation_checkpointing=[Block]"]


@pytest.mark.parametrize("knobs", [[], KNOBS], ids=["plain", "memory-knobs"])
def test_fsdp_on_one_gpu_resumes_its_sharded_checkpoint(tmp_path: Path, knobs: list[str]) -> None:
    """strategy=fsdp with gpus=1: a process group of one on cuda:0, sharded (DCP) checkpoints, and a
    run stopped at step 12 continues from step-12/sharded to end bitwise where 30 straight steps do."""
    extra = ["trainer.strategy=fsdp", *knobs]
    straight, extended = _straight_and_extended(tmp_path, extra)
    assert (extended / "checkpoints" / "step-0000012" / "sharded" / ".metadata").is_file()
    _extend(tmp_path, extended, extra)
    log = (extended / "logs" / "rank-0.log").read_text()
    assert "step-0000012: step 12, epoch 1 at batch 12" in log, log[-2000:]
    assert _ranks(extended) == {0: (1, "cuda:0")}
    assert (extended / "checkpoints" / "last" / "sharded" / ".metadata").is_file()
    _assert_bitwise(straight, extended)


def test_async_checkpoints_equal_sync(tmp_path: Path) -> None:
    """checkpoint.async=true copies the state off the GPU and writes it while training goes on; the
    training must not notice: same final weights bitwise, the same checkpoints, all complete."""
    runs = {}
    for mode in ("true", "false"):
        runs[mode] = tmp_path / f"async-{mode}"
        _ok(run_cli([*CHARLM, *ONE_GPU, *DET, "trainer.max_epochs=2", "checkpoint.every_n_steps=2",
                     f"checkpoint.async={mode}", f"run.dir={runs[mode]}"], cwd=tmp_path))
    _assert_bitwise(runs["true"], runs["false"])
    assert _rows(runs["true"]) == _rows(runs["false"])
    names = [sorted(p.name for p in (runs[m] / "checkpoints").glob("step-*")) for m in ("true", "false")]
    assert names[0] == names[1] and names[0]
    from launcher.checkpoint import format as ckpt

    for name in names[0]:
        assert ckpt.verify(runs["true"] / "checkpoints" / name) is None
    assert not list((runs["true"] / "checkpoints").glob(".tmp-*")), "no save left in flight"


def test_sigkill_mid_run_then_resume_is_bitwise(tmp_path: Path) -> None:
    """The whole launcher SIGKILLed inside epoch 2, the same command resumes, and the final weights are
    bitwise an uninterrupted run's. Full charlm (88 steps per epoch, 264 in all) so that the GPU is
    still training when the kill lands; dropout 0.1 so the CUDA RNG stream must be restored too."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"

    def args(run_dir: Path) -> list[str]:
        return ["recipe=charlm", "model.dropout=0.1", "trainer.max_steps=-1", "trainer.max_epochs=3",
                "trainer.log_every_n_steps=0", "checkpoint.every_n_steps=3", *ONE_GPU, *DET, *QUIET,
                f"run.dir={run_dir}"]

    _ok(run_cli(args(ref), cwd=tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *args(cut)], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_file(cut / "checkpoints" / "step-0000090" / "manifest.json", proc)  # step 90: epoch 2, batch 2
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (cut / "model.pt").exists(), "the run must really have been cut short"

    _ok(run_cli(args(cut), cwd=tmp_path))  # the same command resumes
    resumed = [ln for ln in (cut / "logs" / "rank-0.log").read_text().splitlines() if "resumed from" in ln]
    assert resumed and "at batch 0" not in resumed[-1], resumed  # inside an epoch, not at its start
    _assert_bitwise(ref, cut)
    assert _rows(ref) == _rows(cut), "the history differs"


def test_extending_a_finished_run_by_max_steps_is_bitwise_one_straight_run(tmp_path: Path) -> None:
    """max_steps=12 ends inside epoch 1 and leaves it open; raising it to 30 continues from that batch
    and ends bitwise where 30 straight steps do, history included (dropout on: CUDA RNG resumed)."""
    extra = ["model.dropout=0.1"]
    straight, extended = _straight_and_extended(tmp_path, extra)
    assert [r["step"] for r in _rows(extended)] == ["12"], "the part trained is reported"
    _extend(tmp_path, extended, extra)
    assert "epoch 1 at batch 12" in (extended / "logs" / "rank-0.log").read_text()
    _assert_bitwise(straight, extended)
    assert (straight / "metrics.csv").read_text() == (extended / "metrics.csv").read_text()


def test_data_on_the_gpu_and_the_guard_skip_on_the_device(tmp_path: Path) -> None:
    """charlm's data.device=auto (a key charlm.yaml leaves out: hence +) puts its tensors on the GPU,
    where batches are sliced (the index goes there too); the recipe's AdamW is built fused, so the
    non-finite guard reads no flag per step."""
    run_dir = tmp_path / "run"
    p = run_cli([*CHARLM, *ONE_GPU, "+data.device=auto", "trainer.max_epochs=2", "trainer.log_every_n_steps=4",
                 f"run.dir={run_dir}"], cwd=tmp_path)
    _ok(p)
    rows = _rows(run_dir)
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) < 3.97
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert "(not fused)" not in log, "the recipe's AdamW was built fused: the guard syncs no step"


def test_gpu_health_and_device_timed_phases(tmp_path: Path) -> None:
    """Issue 28 items 1 and 6 on CUDA: the memory fields (allocator counters, no sync) and, for a fit, the
    phases of forward, backward and the optimizer as device times read late from CUDA events."""
    import functools

    from launcher import Trainer
    from launcher.observe import gpu_health

    keep = torch.ones(1 << 20, device="cuda")  # 4 MiB allocated
    f = gpu_health.fields(torch.device("cuda"))
    assert f["gpu_mem_allocated_gib"] >= 4 / 1024 and f["gpu_mem_reserved_gib"] >= f["gpu_mem_allocated_gib"]
    assert f["gpu_mem_peak_gib"] >= f["gpu_mem_allocated_gib"]
    del keep
    x = torch.randn(256, 64)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    tr = Trainer(run_dir=tmp_path / "run", progress=False, gpus=1, batch_size=16, max_epochs=2, summary=False,
                 log_every_n_steps=4)
    tr.fit(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)),
           torch.nn.MSELoss(), functools.partial(torch.optim.AdamW, lr=1e-3), data)
    ph = tr.parts.phases
    torch.cuda.synchronize()
    row = ph.row()  # every event is passed now: all of them are read
    assert ph.cuda and ph.steps == 32 and not ph.pending[1:], ph.pending
    assert ph.totals["forward"] > 0 and ph.totals["backward"] > 0 and ph.totals["optimizer"] > 0, ph.totals
    assert {"gpu_mem_allocated_gib", "gpu_mem_reserved_gib", "gpu_mem_peak_gib"} <= set(row), row
