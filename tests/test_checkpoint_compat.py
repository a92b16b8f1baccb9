"""Checkpoints written before the rank-core redesign (format 1, by the launcher at 86fd24f) still
load and continue; a checkpoint of a format this launcher does not know is refused in one line.

tests/support/checkpoint-v1/step-0000010: linreg, 1 rank, mid-epoch 1 (step 10 of 14).
tests/support/checkpoint-v1-fsdp/step-0000002: charlm (1 layer, n_embd 32) under FSDP on 2 ranks,
step 2 of max_steps=4, as DCP shards.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import QUIET, SUPPORT, run_cli
from conftest import rows as _rows

# format 1 holds numpy's RNG key as a uint32 tensor, which torch's weights-only loader reads from 2.6
# on (README, Install: which torch); FSDP on CPU needs 2.9 (gloo's reduce_scatter AVG before it)
_TORCH = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
needs_2_6 = pytest.mark.skipif(_TORCH < (2, 6),
                               reason=f"format-1 checkpoints load from torch 2.6 on ({torch.__version__})")
needs_2_9 = pytest.mark.skipif(_TORCH < (2, 9), reason=f"FSDP on CPU needs torch 2.9 ({torch.__version__})")

V1 = SUPPORT / "checkpoint-v1" / "step-0000010"
V1_FSDP = SUPPORT / "checkpoint-v1-fsdp" / "step-0000002"
LINREG = ["recipe=linreg", "trainer.max_epochs=1", "checkpoint.every_n_steps=5", *QUIET]
CHARLM = ["recipe=charlm", "data.n_chars=40000", "trainer.max_steps=4", "checkpoint.every_n_steps=2",
          "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "trainer.gpus=0", "trainer.nproc=2",
          "trainer.strategy=fsdp", *QUIET]


def _close(a: Path, b: Path) -> None:
    # close, not bitwise: the fixture's first steps ran on another machine, whose CPU kernels may
    # round differently from this one's
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), k


@needs_2_6
@pytest.mark.slow
def test_a_format_1_checkpoint_resumes_mid_epoch(tmp_path: Path) -> None:
    assert json.loads((V1 / "manifest.json").read_text())["format"] == 1
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    assert run_cli([*LINREG, f"run.dir={fresh}"], cwd=tmp_path).returncode == 0
    p = run_cli([*LINREG, f"resume={V1}", f"run.dir={resumed}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {V1}: step 10, epoch 1 at batch 10" in p.stderr
    assert [r["step"] for r in _rows(resumed)] == ["14"]
    _close(fresh / "model.pt", resumed / "model.pt")


@needs_2_9
@pytest.mark.slow
def test_a_format_1_sharded_checkpoint_resumes_under_fsdp(tmp_path: Path) -> None:
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    assert run_cli([*CHARLM, f"run.dir={fresh}"], cwd=tmp_path).returncode == 0
    p = run_cli([*CHARLM, f"resume={V1_FSDP}", f"run.dir={resumed}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr and "step 2" in p.stderr
    _close(fresh / "model.pt", resumed / "model.pt")


def test_an_unknown_format_is_refused_in_one_line(tmp_path: Path) -> None:
    future = tmp_path / "future" / "step-0000010"
    shutil.copytree(V1, future)
    manifest = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    p = run_cli([*LINREG, f"resume={future}", f"run.dir={tmp_path / 'r'}"], cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint format 99; this launcher reads format 1" in lines[0], lines
    assert not (tmp_path / "r").exists()


@needs_2_6
@pytest.mark.slow
def test_a_format_1_checkpoint_from_before_the_grad_scaler_entry_loads(tmp_path: Path) -> None:
    """Checkpoints written before 944490e have no "scaler" entry: a part added later loads as absent."""
    from launcher.checkpoint import format as F

    old = tmp_path / "old" / "step-0000010"
    sd = torch.load(V1 / "state.pt", weights_only=True)
    del sd["scaler"]
    F.write(old, sd, {k: v for k, v in json.loads((V1 / "manifest.json").read_text()).items()
                      if k not in ("files", "written_at", "format")})
    p = run_cli([*LINREG, f"resume={old}", f"run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr and [r["step"] for r in _rows(tmp_path / "r")] == ["14"]


@needs_2_6
def test_export_model_reads_format_1_and_format_2(tmp_path: Path) -> None:
    """Format 2 keeps the model's weights in their own model.pt; export (and load) read both."""
    from launcher.checkpoint import format as F

    sd = torch.load(V1 / "state.pt", weights_only=True)
    exported = torch.load(F.export_model(V1, tmp_path / "v1.pt"), weights_only=True)
    assert exported.keys() == sd["model"].keys() and all(torch.equal(exported[k], sd["model"][k]) for k in exported)
    v2 = F.write(tmp_path / "v2" / "step-0000010", sd, {k: v for k, v in json.loads((V1 / "manifest.json").read_text())
                                                        .items() if k not in ("files", "written_at", "format")})
    manifest = json.loads((v2 / "manifest.json").read_text())
    assert manifest["format"] == 2 and sorted(manifest["files"]) == ["model.pt", "state.pt"]
    again = torch.load(F.export_model(v2, tmp_path / "v2.pt"), weights_only=True)
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)
    loaded = F.load(v2)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded["model"][k], sd["model"][k]) for k in sd["model"])
    sharded = torch.load(F.export_model(V1_FSDP, tmp_path / "fsdp.pt"), weights_only=True)
    assert sharded and not any(k.startswith("model.") for k in sharded)
