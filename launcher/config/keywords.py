"""The Python API's keywords, Trainer(max_epochs=.., checkpoint_async=.., run_dir=..) -> Config,
and its checks: Trainer(...) has no parent process that checked its config.

Trainer fields go by their own names, every other section's as <section>_<field>
(checkpoint_every_n_steps, ...), a tracker's as logger_<tracker>_<field> (logger_wandb_project);
`logger` takes the trackers' names ("csv", ["csv", "tensorboard"], "none"); a few short names
are kept for the common ones.
"""

from __future__ import annotations

import difflib
import os
import time
from typing import Any

from .. import config as C
from . import FIELD_ALIASES, SECTIONS, Config


def kwarg_names() -> dict[str, tuple[str, str]]:
    """Trainer keyword -> (section, field); sections may be dotted (logger.wandb)."""
    names = {"run_dir": ("run", "dir"), "run_id": ("run", "id"), "run_name": ("run", "name")}
    for tracker, cls in C.LOGGER_SCHEMAS.items():
        for f in cls.__dataclass_fields__:
            names[f"logger_{tracker}_{f}"] = (f"logger.{tracker}", f)
    for section, cls in SECTIONS.items():
        if section == "logger":  # its fields are the trackers: `logger=` selects them
            continue
        for f in cls.__dataclass_fields__:
            names.setdefault(f if section == "trainer" else f"{section}_{f}", (section, f))
    for (section, alias), f in FIELD_ALIASES.items():
        names[f"{section}_{alias}"] = (section, f)
    return names


def from_kwargs(kwargs: dict[str, Any]) -> Config:
    cfg = Config()
    cfg.logger = C.select_loggers(kwargs.get("logger", "csv"))
    names = kwarg_names()
    for key, value in kwargs.items():
        if key == "resume":
            cfg.resume = str(value)
        elif key == "logger":
            pass
        elif key in names:
            section, name = names[key]
            parent, _, tracker = section.partition(".")
            target = getattr(cfg.logger, tracker) if tracker else getattr(cfg, section)
            if target is None:  # logger_wandb_project=... without "wandb" in logger=
                raise C.ConfigError(f"logger.{tracker}.{name}", value, f"logger={kwargs.get('logger', 'csv')!r} "
                                    f"does not include {tracker}", f"logger=[..., {tracker!r}] to set it")
            setattr(target, name, value)
        else:
            close = difflib.get_close_matches(key, [*names, "resume", "logger"], n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"Trainer got an unknown argument {key!r}{hint}; "
                            f"valid: logger, resume, {', '.join(sorted(names))}")
    if "run_dir" not in kwargs:
        cfg.run.dir = time.strftime("runs/%Y-%m-%d_%H-%M-%S")
    if "monitor" not in kwargs:  # follows the data fit() gets: val_loss, or train_loss with no validation data
        cfg.trainer.monitor = ""
    return cfg


def check(cfg: Config) -> None:
    """What Trainer(...) checks: the Python API has no parent process to have done it."""
    C.check_trainer(cfg.trainer)
    C.check_checkpoint(cfg.checkpoint)
    C.check_logger(cfg.logger)
    C.check_resume(cfg.resume)
    t = cfg.trainer
    # more ranks than this process: it starts them itself (launch/api_world.py), on this node only
    if "RANK" not in os.environ and "SLURM_STEP_NUM_TASKS" not in os.environ and t.nodes > 1:
        raise C.ConfigError("trainer.nodes", t.nodes, "Trainer(...) starts its other ranks on this node only",
                            "1; for more nodes run the script under srun or torchrun on each, or "
                            "`launcher run train.py trainer.nodes=N launcher=slurm`")
