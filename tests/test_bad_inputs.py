"""The catalogue of bad inputs: CLI overrides, config files, recipes, environments. Each must give
ONE line naming the field, the value and what is valid, exit code 2, before any rank starts or any
file is written. The table below is the catalogue (tests/test_config.py's CLI cases are part of it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SUPPORT, run_cli
from test_config import BAD as CLI_CASES

BAD_CONF = str(SUPPORT / "bad_conf")
TORCHRUN = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}

# (what, overrides, environment, text the one line must contain)
CATALOGUE: list[tuple[str, list[str], dict[str, str], str]] = [
    *[(f"CLI: {' '.join(o)}", o, {}, e) for o, e in CLI_CASES],
    ("CLI: two recipes' keys mixed up", ["recipe=linreg", "trainer.monitor=val_acc"], {},
     "trainer.monitor='val_acc': not a metric this run produces; valid: train_loss, train_mae, val_loss, val_mae"),
    ("CLI: eval batch size negative", ["trainer.eval_batch_size=-1"], {}, "trainer.eval_batch_size=-1"),
    ("CLI: unknown precision", ["trainer.precision=fp8"], {}, "trainer.precision='fp8': unknown choice"),
    ("CLI: unknown strategy", ["trainer.strategy=zero3"], {}, "trainer.strategy='zero3': unknown choice; valid: auto"),
    ("CLI: accumulate 0", ["trainer.accumulate_grad_batches=0"], {}, "trainer.accumulate_grad_batches=0"),
    ("CLI: negative clip", ["trainer.gradient_clip_val=-1"], {}, "trainer.gradient_clip_val=-1"),
    ("CLI: keep_last 0", ["checkpoint.keep_last=0"], {}, "checkpoint.keep_last=0: must be a positive integer"),
    ("CLI: run.id of another run", None, {}, "run.id='other1': "),
    ("CLI: a key added with + that no schema has", ["+trainer.no_such_key=1"], {},
     "trainer.no_such_key=1: unknown key; valid: trainer.max_epochs"),
    ("CLI: a top-level key added with +", ["+foo=1"], {}, "foo=1: unknown key; valid: trainer, checkpoint"),
    ("CLI: a trainer key under checkpoint", ["checkpoint.monitor=val_acc"], {},
     "checkpoint.monitor: unknown key (did you mean trainer.monitor?); valid: checkpoint.enabled"),
    ("CLI: a trainer key under the recipe's data", ["data.batch_size=0"], {},
     "data.batch_size: unknown key (did you mean trainer.batch_size?)"),
    ("CLI: a section that does not exist", ["early_stopping.patience=3"], {},
     "early_stopping: unknown key (did you mean trainer.patience?)"),
    ("CLI: a misspelt trainer key", ["trainer.epochs=3"], {},
     "trainer.epochs: unknown key (did you mean trainer.max_epochs?)"),
    ("CLI: channels_last neither auto nor a bool", ["trainer.channels_last=yes"], {},
     "trainer.channels_last='yes': unknown choice; valid: auto, true, false"),  # filled in by the test (needs a run dir)
    ("config file: broken YAML recipe", ["--config-dir", BAD_CONF, "recipe=broken_yaml"], {},
     "recipe/broken_yaml.yaml line 3: not valid YAML (expected ',' or '}', but got '<stream end>')"),
    ("config file: recipe without a model", ["--config-dir", BAD_CONF, "recipe=no_model"], {},
     "model=None: the recipe does not define it"),
    ("config file: recipe with an unknown trainer key", ["--config-dir", BAD_CONF, "recipe=unknown_key"], {},
     "trainer.epochs: unknown key (in recipe/unknown_key.yaml) (did you mean trainer.max_epochs?); valid: "
     "trainer.max_epochs"),
    ("config file: recipe without its package line", ["--config-dir", BAD_CONF, "recipe=no_package"], {},
     "recipe: unknown key (in recipe/no_package.yaml) (a recipe file must begin with `# @package _global_`"),
    ("recipe: metrics not a mapping", ["--config-dir", BAD_CONF, "recipe=bad_metrics"], {},
     "metrics=['mae']: must map names to torchmetrics _target_ nodes"),
    ("recipe: optimizer class misspelt", ["--config-dir", BAD_CONF, "recipe=bad_optimizer"], {},
     "optimizer._target_='torch.optim.Adamm': cannot be imported"),
    ("recipe: a target whose import raises RuntimeError (a broken build of a library it imports)",
     ["recipe=linreg", "model._target_=broken_build.Net"], {},
     "model._target_='broken_build.Net': cannot be imported (RuntimeError: operator torchvision::nms does not exist)"),
    ("env: torchrun RANK beyond WORLD_SIZE", [], {"RANK": "2", "WORLD_SIZE": "2", **TORCHRUN},
     "env RANK='2': not below WORLD_SIZE=2"),
    ("env: torchrun WORLD_SIZE not a number", [], {"RANK": "0", "WORLD_SIZE": "two", **TORCHRUN},
     "env WORLD_SIZE='two': not an integer"),
    ("env: torchrun WORLD_SIZE without RANK", [], {"WORLD_SIZE": "2", **TORCHRUN},
     "env RANK='': WORLD_SIZE is set but RANK is not"),
    ("env: torchrun without MASTER_ADDR", [], {"RANK": "0", "WORLD_SIZE": "2"},
     "env MASTER_ADDR='': WORLD_SIZE=2 needs the rendezvous host"),
    ("env: torchrun LOCAL_RANK beyond LOCAL_WORLD_SIZE", [],
     {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", **TORCHRUN},
     "env LOCAL_RANK='2': not below LOCAL_WORLD_SIZE=2"),
    ("env: torchrun MASTER_PORT not a port", [], {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x",
                                                  "MASTER_PORT": "99999"}, "env MASTER_PORT='99999': not a TCP port"),
]


@pytest.mark.slow
@pytest.mark.parametrize("what,overrides,env,expected", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(tmp_path: Path, what: str, overrides: list[str], env: dict[str, str], expected: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    if overrides is None:  # run.id that contradicts the run directory's own
        run_dir = tmp_path / "existing"
        ok = run_cli(["recipe=linreg", "trainer.max_epochs=1", "trainer.progress=false", f"run.dir={run_dir}"],
                     cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr
        overrides = [f"run.dir={run_dir}", "run.id=other1"]
        before = sorted(p.name for p in run_dir.rglob("*"))
    p = run_cli([*overrides] + ([] if any(o.startswith("run.dir") for o in overrides)
                                else [f"run.dir={work / 'run'}"]), cwd=work, timeout=60, **env)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("launcher: error: "), p.stderr
    assert expected in lines[0], lines[0]
    assert list(work.iterdir()) == [], "nothing may be written"
    if what.startswith("CLI: run.id"):
        assert sorted(p.name for p in (tmp_path / "existing").rglob("*")) == before
