"""Scale features on 2 CPU gloo ranks: FSDP2 vs DDP, sharded checkpoints at another world size,
async saves, accumulation, clipping under FSDP, mixed precision, the non-finite guard, throughput."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import QUIET, cli_env, run_cli
from conftest import rows as _rows

TWO = ["trainer.gpus=0", "trainer.nproc=2"]
# charlm small enough for CI: 40k characters -> 9 optimizer steps per epoch on 2 ranks
CHARLM = ["recipe=charlm", "data.n_chars=40000", "trainer.max_steps=-1", "trainer.log_every_n_steps=0", *QUIET]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def fsdp_and_ddp(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("charlm")
    dirs = {}
    for strategy in ("ddp", "fsdp"):
        dirs[strategy] = root / strategy
        # DDP with every block checkpointed (docs/big-models.md): the same curve, the same weight names
        ac = ["trainer.activation_checkpointing=[Block]"] if strategy == "ddp" else []
        p = run_cli([*CHARLM, *TWO, "trainer.max_epochs=3", f"trainer.strategy={strategy}", *ac,
                     f"run.dir={dirs[strategy]}"], cwd=root)
        assert p.returncode == 0, p.stderr[-3000:]
    return dirs


@pytest.mark.slow
def test_fsdp_and_ddp_give_the_same_loss_curve(fsdp_and_ddp: dict[str, Path]) -> None:
    ddp, fsdp = _rows(fsdp_and_ddp["ddp"]), _rows(fsdp_and_ddp["fsdp"])
    assert [r["step"] for r in ddp] == [r["step"] for r in fsdp] == ["9", "18", "27"]
    for a, b in zip(ddp, fsdp):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key
    assert float(fsdp[-1]["val_loss"]) < float(fsdp[0]["val_loss"])
    _assert_same_weights(_weights(fsdp_and_ddp["ddp"] / "model.pt"), _weights(fsdp_and_ddp["fsdp"] / "model.pt"),
                         atol=1e-5)


@pytest.mark.slow
def test_sharded_checkpoint_loads_at_world_size_1_and_2_and_exports(fsdp_and_ddp: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    src = fsdp_and_ddp["fsdp"] / "checkpoints" / "last"
    assert (src / "sharded" / ".metadata").exists() and len(list((src / "sharded").glob("*.distcp"))) == 2
    out = tmp_path / "full.pt"
    e = subprocess.run([sys.executable, "-m", "launcher.export", str(fsdp_and_ddp["fsdp"]), str(out)],
                       env=cli_env(), capture_output=True, text=True, timeout=120)
    assert e.returncode == 0, e.stderr
    exported = _weights(out)
    _assert_same_weights(exported, _weights(fsdp_and_ddp["fsdp"] / "model.pt"))
    # resume the sharded checkpoint where no step is left to train: the loaded weights are written out
    for name, extra in (("ws1", ["trainer.nproc=1", "trainer.strategy=none"]),
                        ("ws2", [*TWO, "trainer.strategy=fsdp"])):
        d = tmp_path / name
        p = run_cli([*CHARLM, *extra, "trainer.max_epochs=3", f"resume={src}", f"run.dir={d}"], cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        _assert_same_weights(exported, _weights(d / "model.pt"))
    # and training goes on from it at world size 2 (same data order: same world size)
    d = tmp_path / "more"
    p = run_cli([*CHARLM, *TWO, "trainer.strategy=fsdp", "trainer.max_epochs=4", f"resume={src}", f"run.dir={d}"],
                cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in _rows(d)] == ["9", "18", "27", "36"]


@pytest.mark.parametrize("recipe", [["recipe=linreg", "trainer.max_epochs=3", *QUIET],
                                    [*CHARLM, "trainer.max_epochs=2", "trainer.strategy=fsdp"]],
                         ids=["ddp", "fsdp"])
@pytest.mark.slow
def test_async_save_is_equivalent_to_sync(tmp_path: Path, recipe: list[str]) -> None:
    runs = {}
    for mode in ("true", "false"):
        runs[mode] = tmp_path / f"async-{mode}"
        p = run_cli([*recipe, *TWO, "checkpoint.every_n_steps=2", f"checkpoint.async={mode}",
                     f"run.dir={runs[mode]}"], cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    for a, b in zip(_rows(runs["true"]), _rows(runs["false"])):
        for key in a:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), key
    # equal within float noise: a background write can perturb CPU thread scheduling (see test_faults)
    _assert_same_weights(_weights(runs["true"] / "model.pt"), _weights(runs["false"] / "model.pt"), atol=1e-5)
    a, b = (sorted(p.name for p in (runs[m] / "checkpoints").glob("step-*")) for m in ("true", "false"))
    assert a == b and a, "the same checkpoints, all committed"
    from launcher.checkpoint import format as ckpt

    for name in a:
        assert ckpt.verify(runs["true"] / "checkpoints" / name) is None
    assert not list((runs["true"] / "checkpoints").glob(".tmp-*")), "no save left in flight"


@pytest.mark.slow
def test_accumulating_4_micro_batches_equals_one_4x_batch(tmp_path: Path) -> None:
    out = {}
    for name, extra in (("accum", ["trainer.batch_size=5", "trainer.accumulate_grad_batches=4"]),
                        ("big", ["trainer.batch_size=20"])):
        out[name] = tmp_path / name
        p = run_cli(["recipe=linreg", *TWO, "trainer.max_epochs=3", *extra, *QUIET, f"run.dir={out[name]}"],
                    cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = _rows(out["accum"]), _rows(out["big"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == ["7", "14", "21"], "loss reported per optimizer step"
    for ra, rb in zip(a, b):
        assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), rel=1e-5)
    _assert_same_weights(_weights(out["accum"] / "model.pt"), _weights(out["big"] / "model.pt"), atol=1e-4)


class RecordingAdamW(torch.optim.AdamW):
    """Records the total gradient norm (over every rank's shards) that each step sees."""

    norms: list[float] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        RecordingAdamW.norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        return super().step(closure)


def _clip_worker(run_dir: str, clip: float) -> list[float]:
    from launcher import Trainer
    from launcher.recipes import charlm

    train, val = charlm.datasets(n_chars=20000)
    torch.manual_seed(0)
    tr = Trainer(run_dir=run_dir, strategy="fsdp", fsdp_wrap=["Block"], gradient_clip_val=clip, max_epochs=1,
                 batch_size=16, progress=False, logger="none", checkpoint_enabled=False)
    tr.fit(charlm.GPT(), charlm.SeqCrossEntropy(), functools.partial(RecordingAdamW, lr=3e-3), train, val)
    return RecordingAdamW.norms


@pytest.mark.slow
def test_clipping_bounds_the_global_gradient_norm_under_fsdp(tmp_path: Path) -> None:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, rdzv_backend="c10d", rdzv_endpoint="localhost:0",
                      run_id="clip", max_restarts=0, monitor_interval=0.1)
    clip = 0.05
    results = elastic_launch(lc, _clip_worker)(str(tmp_path), clip)
    norms = results[0]
    assert len(norms) > 5 and results[0] == results[1], "both ranks see the same global norm"
    assert max(norms) <= clip * (1 + 1e-4), max(norms)
    assert sum(n > clip * 0.99 for n in norms) >= len(norms) // 2, "the bound was active (norms were larger)"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_mixed_precision_trains_on_cpu(tmp_path: Path, precision: str) -> None:
    d = tmp_path / precision
    p = run_cli(["recipe=circles", "trainer.max_epochs=4", *QUIET, f"trainer.precision={precision}", f"run.dir={d}"],
                cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(d)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert all(float(r["val_loss"]) == float(r["val_loss"]) for r in rows), "finite"
    state = torch.load(d / "checkpoints" / "last" / "state.pt", weights_only=True)
    if precision == "16-mixed":
        assert state["scaler"]["scale"] > 0, "the GradScaler's state is in the checkpoint"
    if precision == "bf16-true":
        assert all(v.dtype == torch.bfloat16 for v in _weights(d / "model.pt").values())


NAN = ["recipe=linreg", "model._target_=faulty.FaultyLinear", *TWO, "trainer.max_epochs=3", *QUIET]


def test_nonfinite_guard_stops_naming_step_and_rank(tmp_path: Path) -> None:
    p = run_cli([*NAN, f"run.dir={tmp_path / 'r'}"], cwd=tmp_path, FAULT_MODE="nan", FAULT_RANK="1", FAULT_STEP="5")
    assert p.returncode == 1
    assert "non-finite loss or gradient norm at step 5: rank(s) [1] (loss [nan])" in p.stderr
    assert "the optimizer did not step" in p.stderr


@pytest.mark.slow
def test_nonfinite_guard_skip_mode_skips_the_step(tmp_path: Path) -> None:
    d = tmp_path / "r"
    p = run_cli([*NAN, "trainer.nonfinite=skip", f"run.dir={d}"], cwd=tmp_path,
                FAULT_MODE="nan", FAULT_RANK="1", FAULT_STEP="5")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step skipped (1 so far)" in (d / "logs" / "rank-0.log").read_text()
    assert all(torch.isfinite(v).all() for v in _weights(d / "model.pt").values()), "no NaN reached the weights"


@pytest.mark.slow
def test_throughput_tokens_and_mfu_in_the_logs(tmp_path: Path) -> None:
    d = tmp_path / "r"
    p = run_cli([*CHARLM, "trainer.max_epochs=1", "trainer.peak_tflops=0.01", f"run.dir={d}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(ln for ln in (d / "logs" / "rank-0.log").read_text().splitlines() if "epoch 1:" in ln)
    assert "samples_per_s=" in line and "tokens_per_s=" in line and "mfu=" in line
    assert "samples_per_s" not in _rows(d)[0], "the history stays deterministic"


@pytest.mark.slow
def test_compile_and_channels_last_train(tmp_path: Path, mnist_root: Path) -> None:
    d = tmp_path / "r"
    # 1290 samples: 10 full batches of 128 and a last one of 10, which must not recompile (nor make
    # dynamo compile a dynamic-shape graph for every later batch); validation's own partial batch too
    p = run_cli(["recipe=mnist", f"data.root={mnist_root}", "data.train_limit=1290", "data.val_limit=300",
                 "trainer.max_epochs=2", "trainer.compile=true", "trainer.channels_last=true", *QUIET,
                 "trainer.activation_checkpointing={Conv2d:2}",  # the 2nd conv recomputed, inside the compiled graph
                 f"run.dir={d}"], cwd=tmp_path, timeout=600, TORCH_LOGS="recompiles")
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in _rows(d)] == ["11", "22"]
    recompiles = [ln for ln in p.stderr.splitlines() if "size mismatch" in ln or "Recompiling" in ln]
    assert not [ln for ln in recompiles if "size mismatch" in ln], recompiles
    assert len([ln for ln in recompiles if "Recompiling" in ln]) <= 1, "at most validation's (grad mode)"
    names = list(_weights(d / "model.pt"))
    assert names and all(k.startswith("net.") for k in names), "compile keeps plain parameter names"
    assert "_checkpoint_wrapped_module" not in "".join(names), "so does activation checkpointing"
    assert "activation checkpointing on 1 block(s)" in (d / "logs" / "rank-0.log").read_text()
