"""Config composition, and every bad input caught in the parent: one line, exit 2, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO, run_cli
from launcher import config as C
from launcher.launch import recipe


@pytest.fixture(scope="module")
def compose_cfg():
    C.register()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(REPO / "launcher" / "conf"), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    return _compose


def test_defaults_compose_mnist(compose_cfg) -> None:
    cfg = compose_cfg()
    assert cfg.model._target_ == "launcher.recipes.mnist.Net"
    assert cfg.trainer.batch_size == 128 and cfg.optimizer.lr == 0.001
    assert cfg.launcher.name == "local" and cfg.logger.csv is not None and cfg.logger.wandb is None and cfg.resume == "auto"


@pytest.mark.parametrize("recipe,target,monitor", [("circles", "launcher.recipes.circles.Net", "val_acc"),
                                                    ("linreg", "launcher.recipes.linreg.Net", "val_mae")])
def test_recipe_group(compose_cfg, recipe: str, target: str, monitor: str) -> None:
    cfg = compose_cfg(f"recipe={recipe}", "trainer.max_epochs=3", "optimizer.lr=0.5")
    assert cfg.model._target_ == target and cfg.trainer.monitor == monitor
    assert cfg.trainer.max_epochs == 3 and cfg.optimizer.lr == 0.5


def test_to_object_gives_typed_config_that_passes_checks(compose_cfg) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose_cfg("recipe=linreg", "logger=[csv,wandb,tensorboard,mlflow]"))
    assert isinstance(cfg, C.Config) and isinstance(cfg.trainer, C.TrainerConfig)
    assert cfg.logger.selected() == ["csv", "wandb", "tensorboard", "mlflow"]
    assert isinstance(cfg.logger.mlflow, C.LOGGER_SCHEMAS["mlflow"])
    C.check(cfg)
    recipe.check(cfg)
    round_trip = C.from_dict(C.to_dict(cfg))
    assert round_trip == cfg


RECIPES = ", ".join(sorted(p.stem for p in (REPO / "launcher" / "conf" / "recipe").glob("*.yaml")))

# (overrides, text the one line must contain)
BAD = [
    (["recipe=nope"], f"recipe='nope': unknown option; valid: {RECIPES}"),
    (["logger=nope"], "logger='nope': unknown option; valid: csv, mlflow, none, tensorboard, wandb"),
    (["logger=[csv,nope]"], "logger='nope': unknown option; valid: csv, mlflow, none, tensorboard, wandb"),
    (["logger=wandb", "logger.wandb.modee=x"], "logger.wandb.modee: unknown key (did you mean logger.wandb.mode?)"),
    (["logger=mlflow", "logger.mlflow.tracking_uri=ftp://x"], "logger.mlflow.tracking_uri='ftp://x': not a tracking URI"),
    (["logger=tensorboard", "logger.tensorboard.flush_s=0"], "logger.tensorboard.flush_s=0.0: must be > 0 seconds"),
    (["launcher=nope"], "launcher='nope': unknown option; valid: local, ray, slurm"),
    (["trainer.nope=1"], "trainer.nope: unknown key; valid: trainer.max_epochs"),
    (["nope=1"], "nope: unknown key"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs='abc'"),
    (["trainer.progress=maybe"], "trainer.progress='maybe'"),
    (["trainer.batch_size=0"], "trainer.batch_size=0: must be a positive integer"),
    (["trainer.batch_size=-4"], "trainer.batch_size=-4: must be a positive integer"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0: must be a positive integer"),
    (["trainer.nproc=0"], "trainer.nproc=0: must be a positive integer"),
    (["trainer.nodes=0"], "trainer.nodes=0: must be a positive integer"),
    (["trainer.max_steps=0"], "trainer.max_steps=0: must be a positive integer"),
    (["trainer.gpus=1"], "trainer.gpus=1: this machine has 0 visible GPU(s)"),
    (["trainer.gpus=-1"], "trainer.gpus=-1: asks for all visible GPUs but CUDA sees none"),
    (["trainer.mode=up"], "trainer.mode='up': unknown choice; valid: min, max"),
    (["trainer.scheduler_interval=batch"], "trainer.scheduler_interval='batch': unknown choice; valid: epoch, step"),
    (["logger=wandb", "logger.wandb.mode=loud"], "logger.wandb.mode='loud': unknown choice; valid: auto, online, "
                                                 "offline, disabled"),
    (["resume=/does/not/exist"], "resume='/does/not/exist': no such checkpoint path"),
    (["trainer.monitor=val_f1"], "trainer.monitor='val_f1': not a metric this run produces; valid: train_loss, "
                                 "train_acc, val_loss, val_acc"),
    (["model._target_=launcher.recipes.mnist.Nope"], "model._target_='launcher.recipes.mnist.Nope': cannot be imported"),
    (["trainer.nodes=2"], "launcher.rdzv_endpoint='': trainer.nodes=2 on the local launcher"),
    (["checkpoint.every_n_steps=-1"], "checkpoint.every_n_steps=-1: must be an integer >= 0"),
    (["trainer.max_epochs="], "trainer.max_epochs"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, overrides: list[str], expected: str) -> None:
    run_dir = tmp_path / "run"
    p = run_cli([*overrides, f"run.dir={run_dir}"], cwd=tmp_path, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("launcher: error: ") and expected in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "a bad input must not create any file or directory"


def test_resume_never_refuses_a_run_dir_with_checkpoints(tmp_path: Path) -> None:
    ok = run_cli(["recipe=linreg", "trainer.max_epochs=1", "trainer.progress=false", f"run.dir={tmp_path / 'r'}"],
                 cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    p = run_cli(["recipe=linreg", "resume=never", f"run.dir={tmp_path / 'r'}"], cwd=tmp_path, timeout=60)
    assert p.returncode == 2 and "resume='never'" in p.stderr and "already holds checkpoints" in p.stderr


def test_help_and_cfg_are_hydras(tmp_path: Path) -> None:
    h = run_cli(["--help"], cwd=tmp_path, timeout=60)
    assert h.returncode == 0 and f"recipe: {RECIPES}" in h.stdout
    groups = h.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert sorted(ln.split(":")[0] for ln in groups.splitlines() if ": " in ln) == ["launcher", "logger", "recipe"]
    c = run_cli(["recipe=circles", "--cfg", "job"], cwd=tmp_path, timeout=60)
    assert c.returncode == 0 and "_target_: launcher.recipes.circles.Net" in c.stdout
    assert list(tmp_path.iterdir()) == []


def test_python_api_rejects_bad_arguments_by_name() -> None:
    from launcher import Trainer

    with pytest.raises(TypeError, match="unknown argument 'max_epoch'.*max_epochs"):
        Trainer(max_epoch=3)
    with pytest.raises(C.ConfigError, match="trainer.batch_size=0: must be a positive integer"):
        Trainer(batch_size=0)
