"""2-D device meshes (issue 29): trainer.strategy=hsdp, trainer.tensor_parallel, what each rank holds.

Fast tier: the parent's mesh checks (one line, exit 2, before any process or run dir), the mesh
arithmetic, the built-in tensor-parallel plans' names, the per-rank bytes. Slow tier: real gloo ranks
on CPU train charlm on 2x2 meshes like one rank, resume across meshes through DCP, and resume
bitwise after a SIGKILL.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import QUIET, cli_env, run_cli, wait_for_file
from launcher.config import ConfigError
from launcher.config.mesh import check_mesh, sizes
from launcher.observe.holdings import describe, holdings, state_tensors

# charlm at a size where 20 steps take seconds: 256 training windows of 32 characters, so 4 steps of
# 64 samples per epoch whatever the mesh (no padded duplicates: every layout trains the same batches)
SMALL = ["recipe=charlm", "data.n_chars=9120", "data.block_size=32", "model.n_embd=32", "trainer.gpus=0",
         "trainer.log_every_n_steps=0", "checkpoint.every_n_steps=4", "checkpoint.keep_last=5", *QUIET]


def _t(**kw) -> SimpleNamespace:
    base = dict(strategy="fsdp", hsdp_replicas=0, tensor_parallel=1, nodes=1, tp_plan=None, accelerator="auto")
    return SimpleNamespace(**{**base, **kw})


def test_mesh_sizes_shard_inside_nodes_and_tp_innermost() -> None:
    assert sizes(_t(strategy="hsdp", nodes=4), 32) == (s := sizes(_t(strategy="hsdp", hsdp_replicas=4), 32))
    assert (s.replicate, s.shard, s.tp, s.dp) == (4, 8, 1, 32)
    m = sizes(_t(strategy="hsdp", hsdp_replicas=2, tensor_parallel=2), 8)
    assert (m.replicate, m.shard, m.tp, m.dp) == (2, 2, 2, 4)
    assert sizes(_t(tensor_parallel=4), 8).shard == 2 and sizes(_t(strategy="auto", tensor_parallel=2), 4).tp == 2


@pytest.mark.parametrize("kw, world, model, key", [
    (dict(tensor_parallel=3), 4, None, "trainer.tensor_parallel=3: does not divide the world of 4 ranks"),
    (dict(strategy="hsdp", hsdp_replicas=3), 4, None, "trainer.hsdp_replicas=3: HSDP replicas do not divide"),
    (dict(strategy="hsdp", nodes=3), 6 * 4, None, None),  # 24 ranks on 3 nodes: 3 replicas of 8, fine
    (dict(hsdp_replicas=2), 4, None, "only trainer.strategy=hsdp replicates"),
    (dict(strategy="ddp", tensor_parallel=2), 4, None, "trainer.strategy='ddp': with trainer.tensor_parallel=2"),
    (dict(tensor_parallel=4), 8, {"n_head": 6}, "trainer.tensor_parallel=4: does not divide model.n_head=6"),
    (dict(tensor_parallel=2), 4, {"config": {"num_key_value_heads": 1}}, "model.config.num_key_value_heads=1"),
    (dict(tensor_parallel=2, tp_plan={"blocks.*.qkv": "sideways"}), 4, None, "trainer.tp_plan.blocks.*.qkv"),
])
def test_mesh_errors_name_the_key(kw, world, model, key) -> None:
    if key is None:
        assert check_mesh(_t(**kw), world, model).shard == 8
        return
    with pytest.raises(ConfigError) as e:
        check_mesh(_t(**kw), world, model)
    assert key in str(e.value) and "valid:" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, needle", [
    (["trainer.nproc=4", "trainer.tensor_parallel=3"], "trainer.tensor_parallel=3: does not divide the world of 4 "
                                                       "ranks; valid: 1, 2, 4"),
    (["trainer.nproc=8", "trainer.tensor_parallel=8"], "trainer.tensor_parallel=8: does not divide model.n_head=4"),
])
def test_cli_refuses_a_mesh_in_one_line_before_any_process(tmp_path: Path, args: list[str], needle: str) -> None:
    run_dir = tmp_path / "run"
    p = run_cli(["recipe=charlm", "trainer.gpus=0", *args, f"run.dir={run_dir}"], cwd=tmp_path, timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not run_dir.exists()


def test_built_in_plans_find_charlm_gpt2_and_llama_blocks() -> None:
    from launcher.device.tensor_parallel import plan_for
    from launcher.recipes.charlm import GPT

    plan = plan_for(GPT(n_layer=2), None)
    assert plan["blocks.1.qkv"] == "colwise_qkv" and plan["blocks.1.mlp.2"] == "rowwise" and len(plan) == 8
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=64))
    assert plan_for(gpt2, None) == {f"transformer.h.{i}.{n}": s for i in range(2) for n, s in (
        ("attn.c_attn", "colwise_qkv"), ("attn.c_proj", "rowwise"), ("mlp.c_fc", "colwise"), ("mlp.c_proj", "rowwise"))}
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
        vocab_size=64))
    assert plan_for(llama, None)["model.layers.0.self_attn.o_proj"] == "rowwise"
    assert plan_for(llama, {"model.layers.*.mlp.up_proj": "colwise"}) == {"model.layers.0.mlp.up_proj": "colwise"}


def test_holdings_count_parameters_gradients_and_optimizer_state() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    model[1].weight.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters())
    h = holdings(model, opt, "none", 1, [])
    params = sum(p.numel() * 4 for p in model.parameters())
    trainable = params - model[1].weight.numel() * 4
    assert (h["params"], h["grads"], h["optimizer"], h["gathered"]) == (params, trainable, 2 * trainable, 0)
    assert state_tensors(torch.optim.SGD(model.parameters(), lr=0.1)) == 0
    assert state_tensors(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) == 1
    assert "optimizer state" in describe(h) and "(AdamW: 2 per parameter)" in describe(h)


# ---- real ranks ----------------------------------------------------------------------------------


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _close(rows: list[dict[str, str]], ref: list[dict[str, str]], what: str) -> None:
    by_step = {r["step"]: r for r in ref}
    assert rows, what
    for r in rows:
        for k in ("train_loss", "val_loss"):
            assert abs(float(r[k]) - float(by_step[r["step"]][k])) < 2e-4, (what, r["step"], k, r[k], by_step[r["step"]][k])


def _held(run_dir: Path) -> float:
    line = next(ln for ln in (run_dir / "logs" / "rank-0.log").read_text().splitlines() if "each rank holds" in ln)
    number, unit = re.search(r"parameters ([\d.,]+) (KiB|MiB)", line).groups()  # type: ignore[union-attr]
    return float(number.replace(",", "")) * (1024 if unit == "KiB" else 2**20)


@pytest.mark.slow
def test_tp_and_hsdp_meshes_train_like_one_rank_resume_across_meshes_and_after_a_kill(tmp_path: Path) -> None:
    """One rank at batch 64 is the reference. FSDP x TP 2x2 (batch 32 per data rank) and HSDP 2x2
    (batch 16) each train 20 steps alongside it; TP's step-8 DCP checkpoint resumes at 1 rank, that
    one's at 2-rank FSDP, that one's at HSDP 2x2 (and so back on a 2-D mesh): every run's and
    segment's losses within 2e-4 of the reference's. The same TP command SIGKILLed after its step-4
    checkpoint resumes bitwise. Every run keeps an EMA of the weights: each rank averages its own shards,
    sharded checkpoints hold them through DCP, and the chain's last model-ema.pt (TP 2x2 -> 1 rank -> FSDP
    -> HSDP) is the reference's within float rounding, as is TP's own (its packed q|k|v made whole)."""
    one, tp, cut = tmp_path / "one", tmp_path / "tp", tmp_path / "cut"
    SMALL = [*globals()["SMALL"], "trainer.ema_decay=0.9"]
    p = run_cli([*SMALL, "trainer.max_steps=20", "trainer.batch_size=64", f"run.dir={one}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ref = _rows(one)
    tp_args = [*SMALL, "trainer.max_steps=20", "trainer.nproc=4", "trainer.tensor_parallel=2", "trainer.batch_size=32"]
    p = run_cli([*tp_args, f"run.dir={tp}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    _close(_rows(tp), ref, "fsdp x tp 2x2")
    # tensor-parallel peers read the same batches: the coverage ledger counts each sample once per epoch
    ledgers = [[{k: v for k, v in json.loads(ln).items() if k != "world_size"}
                for ln in (r / "ledger.jsonl").read_text().splitlines()] for r in (one, tp)]
    assert ledgers[0] == ledgers[1] and all(e["complete"] and e["times"]["1"] == 256 for e in ledgers[1]), ledgers
    # the weights made whole from 2x2 shards (the packed qkv too) are one rank's, to float rounding
    w1, w4 = (torch.load(r / "model.pt", weights_only=True) for r in (one, tp))
    assert w1.keys() == w4.keys() and all(torch.allclose(w1[k], w4[k], atol=1e-4) for k in w1)
    assert len(_rows(tp)) == 5
    # the summary says what each rank holds: TP'd block matmuls in quarters, the rest in halves
    assert _held(tp) < _held(one) / 2 and "dp_shard 2 x tp 2" in (tp / "logs" / "rank-0.log").read_text()
    hsdp = tmp_path / "hsdp"
    p = run_cli([*SMALL, "trainer.max_steps=20", "trainer.nproc=4", "trainer.strategy=hsdp", "trainer.hsdp_replicas=2",
                 "trainer.batch_size=16", f"run.dir={hsdp}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    _close(_rows(hsdp), ref, "hsdp 2x2")
    assert "dp_replicate 2 x dp_shard 2 x tp 1" in (hsdp / "logs" / "rank-0.log").read_text()

    chain = [("1 rank", ["trainer.nproc=1", "trainer.batch_size=64"], 12),
             ("2-rank fsdp", ["trainer.nproc=2", "trainer.batch_size=32", "trainer.strategy=fsdp"], 16),
             ("hsdp 2x2", ["trainer.nproc=4", "trainer.batch_size=16", "trainer.strategy=hsdp",
                           "trainer.hsdp_replicas=2"], 20)]
    start = tp / "checkpoints" / "step-0000008"
    for i, (what, args, steps) in enumerate(chain):
        run_dir = tmp_path / f"seg{i}"
        p = run_cli([*SMALL, *args, f"trainer.max_steps={steps}", f"resume={start}", f"run.dir={run_dir}"], cwd=tmp_path)
        assert p.returncode == 0, (what, p.stderr[-3000:])
        rows = _rows(run_dir)
        assert rows[-1]["step"] == str(steps), (what, rows)
        _close(rows, ref, what)
        start = run_dir / "checkpoints" / f"step-{steps:07d}"
    assert abs(_held(tmp_path / "seg2") * 2 - _held(one)) < 0.01 * _held(one)  # HSDP 2x2: each rank half
    e1, e4, e_chain = (torch.load(r / "model-ema.pt", weights_only=True) for r in (one, tp, tmp_path / "seg2"))
    for what, e in (("fsdp x tp 2x2", e4), ("tp -> 1 -> fsdp -> hsdp", e_chain)):
        assert e.keys() == w1.keys() and all(torch.allclose(e1[k], e[k], atol=1e-4) for k in e1), what
    assert not all(torch.equal(e1[k], w1[k]) for k in w1)  # (an average, not the weights)

    proc = subprocess.Popen([sys.executable, "-m", "launcher", *tp_args, f"run.dir={cut}"], cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_file(cut / "checkpoints" / "step-0000004" / "manifest.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (cut / "model.pt").exists(), "the run must really have been cut short"
    p = run_cli([*tp_args, f"run.dir={cut}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in (cut / "logs" / "rank-0.log").read_text()
    for f in ("model.pt", "model-ema.pt"):
        a, b = (torch.load(r / f, weights_only=True) for r in (tp, cut))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert _rows(tp) == _rows(cut)


@pytest.mark.slow
def test_built_in_tp_plans_split_gpt2_llama_and_charlm_exactly(tmp_path: Path) -> None:
    """2 gloo ranks: each model split by its built-in plan (and charlm by a user's plan function, as
    trainer.tp_plan="module:function" names it) gives the unsplit model's loss and gradients."""
    pytest.importorskip("transformers")
    p = subprocess.run([sys.executable, str(Path(__file__).parent / "support" / "tp_models.py"), str(tmp_path / "init")],
                       env=cli_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    for name, n in (("gpt2", 8), ("llama", 14), ("charlm", 8), ("charlm, the user's function", 8)):
        assert p.stdout.count(f"{name}: loss") == 2 and f"{name}: loss" in p.stdout, p.stdout
        assert re.search(rf"{re.escape(name)}: loss [\d.]+ equal, {n} modules split", p.stdout), p.stdout
