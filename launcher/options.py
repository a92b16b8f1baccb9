"""The Python API's keywords: Trainer(max_epochs=.., checkpoint_async=.., run_dir=..) -> Config.

Trainer fields go by their own names, every other section's as <section>_<field>
(checkpoint_every_n_steps, logger_project, ...); a few short names are kept for the common ones.
"""

from __future__ import annotations

import time
from typing import Any

from .config import FIELD_ALIASES, SECTIONS, Config


def kwarg_names() -> dict[str, tuple[str, str]]:
    """Trainer keyword -> (section, field)."""
    names = {"run_dir": ("run", "dir"), "run_id": ("run", "id"), "run_name": ("run", "name"),
             "logger": ("logger", "name")}
    for section, cls in SECTIONS.items():
        for f in cls.__dataclass_fields__:
            names.setdefault(f if section == "trainer" else f"{section}_{f}", (section, f))
    for (section, alias), f in FIELD_ALIASES.items():
        names[f"{section}_{alias}"] = (section, f)
    return names


def from_kwargs(kwargs: dict[str, Any]) -> Config:
    cfg = Config()
    names = kwarg_names()
    for key, value in kwargs.items():
        if key == "resume":
            cfg.resume = str(value)
        elif key in names:
            section, name = names[key]
            setattr(getattr(cfg, section), name, value)
        else:
            raise TypeError(f"Trainer got an unknown argument {key!r}; valid: resume, {', '.join(sorted(names))}")
    if "run_dir" not in kwargs:
        cfg.run.dir = time.strftime("runs/%Y-%m-%d_%H-%M-%S")
    return cfg
