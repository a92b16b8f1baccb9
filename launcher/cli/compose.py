"""Hydra's composition of the command line and the field checks, torch-free: `--help`, `--cfg` and a
bad value never wait for torch (cli/overlap.py runs this in a forked child while the parent
imports it). Hydra is imported here only; ranks never re-enter it."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Optional

from .. import config as C
from .hydra_errors import unknown
from .report import reported

_errors: list[BaseException] = []  # raised in the task: reported by compose(), not by Hydra's job runner
_composed: list[Any] = []  # (field-checked config, hydra.job.env_set) of the run (-m: of every sweep point)
_sweep_parents: dict[str, str] = {}  # -m: run.dir as written -> as resolved at the sweep's first point
_script: list[C.ScriptConfig] = []  # `launcher run`: the script each composed config runs (cli/script_args.py)


def _task(dcfg: Any) -> None:
    """Hydra's task function, once per run (once per sweep point with -m): the torch-free checks."""
    # Hydra's job runner prints its own "Error executing job" line for anything raised from here.
    from hydra.core.hydra_config import HydraConfig

    try:
        hc = HydraConfig.get()
        env = {str(k): str(v) for k, v in (hc.job.env_set or {}).items()}
        _composed.append((fieldschecked(dcfg, hc), env))
    except Exception as e:  # noqa: BLE001 - handed to compose() unchanged
        _errors.append(e)


def fieldschecked(dcfg: Any, hc: Any) -> Any:
    """The typed Config with every field checked: what needs neither torch nor any file. `hc`:
    Hydra's own config of this job (mode, job number)."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    refuse_unknown_keys(dcfg)
    cfg: C.Config = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    if hc.mode == RunMode.MULTIRUN:  # each sweep point its own run directory, all under one parent:
        # a run.dir that is the same template for every point (the default `runs/${now:...}`) is
        # resolved once, at the first point, not again (a second later) at each
        template = str(OmegaConf.to_container(dcfg.run, resolve=False)["dir"])
        shared = template if re.fullmatch(r"[^$]*(\$\{now:[^}]*\}[^$]*)+", template) else None
        cfg.run.dir = str(Path(_sweep_parents.setdefault(shared, cfg.run.dir) if shared else cfg.run.dir)
                          / str(hc.job.num))
    if _script:  # checked with the rest (config.check_script), in this torch-free child; each sweep
        cfg.script = C.with_sweep(_script[0], cfg.sweep)  # point with its own values in the arguments
    C.check_fields(cfg)
    return cfg


def refuse_unknown_keys(dcfg: Any) -> None:
    """Keys added with Hydra's `+` pass composition, and to_object() would drop them silently."""
    from omegaconf import OmegaConf

    fields = [f.name for f in dataclasses.fields(C.Config)]
    schemas = C.section_schemas(dcfg.launcher.name)
    strays = [str(k) for k in dcfg if k not in fields]
    strays += [f"{s}.{k}" for s, cls in schemas.items() for k in (OmegaConf.select(dcfg, s) or {})
               if k not in cls.__dataclass_fields__]
    if strays:
        guess, valid = unknown(strays[0])
        raise C.ConfigError(strays[0], OmegaConf.select(dcfg, strays[0]), f"unknown key{guess}", valid)


def field_alias(arg: str) -> str:
    """checkpoint.async=true -> checkpoint.async_save=true (config.FIELD_ALIASES: a keyword can't be a field);
    sweep.lr=... -> +sweep.lr=..."""
    for (section, alias), name in C.FIELD_ALIASES.items():
        arg = re.sub(rf"^(\+*{section}\.){alias}=", rf"\g<1>{name}=", arg)
    # sweep.NAME=...: a key of the user's own naming, which Hydra takes only as an addition (+)
    return re.sub(r"^sweep\.", "+sweep.", arg)


def compose(script: Optional[C.ScriptConfig] = None) -> Optional[list[Any]]:
    """Hydra's composition of the command line and the field checks: (config, env_set) to run, or None
    when Hydra only had something to show (--help, --cfg). Errors: one line, exit 2. `script`: a
    `launcher run`, whose config has no recipe (`~recipe`: the default one is dropped)."""
    import hydra

    C.register()
    if script is not None:
        _script.append(script)
        sys.argv.append("~recipe")  # after the overrides: Hydra's flags (--multirun) come first
    sys.argv[1:] = [field_alias(a) for a in sys.argv[1:]]
    entry = hydra.main(config_path=str(C.CONF_DIR), config_name="config", version_base="1.3")(_task)
    with reported(composing=True):
        entry()
        if _errors:
            raise _errors[0]
    return list(_composed) or None


