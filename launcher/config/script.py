"""`launcher run`'s own config: the user's script and the sweep values its arguments take.

A script has no config keys of its own, only arguments; a sweep over it is a sweep over those
arguments. `sweep.NAME=a,b` (Hydra's sweep syntax, with `launcher run --multirun`) gives each point a
value, and `${sweep.NAME}` in an argument after `--` is replaced by it, point by point: the script
itself never sees a placeholder, and each point is its own run directory (RUN_DIR/0, RUN_DIR/1, ...).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ConfigError

PLACEHOLDER = re.compile(r"\$\{sweep\.([^}]*)\}")


@dataclass
class ScriptConfig:
    # filled from `launcher run SCRIPT ... -- ARGS` (cli/script_args.py), never a recipe's key
    path: str = ""  # the user's torchrun-style script, run as __main__ on every rank
    module: str = ""  # `launcher run -m MODULE`: the module run as __main__ instead
    args: list[str] = field(default_factory=list)  # the script's own arguments (after `--`), untouched

    def given(self) -> bool:
        return bool(self.path or self.module)


def with_sweep(s: ScriptConfig, sweep: dict[str, Any]) -> ScriptConfig:
    """The script with this sweep point's values in its arguments. Every placeholder must name a
    given sweep key and every key must be used: a key nothing reads would run identical points."""
    valid = ", ".join(f"${{sweep.{k}}}" for k in sweep) or "none given"
    for arg in s.args:
        for name in PLACEHOLDER.findall(arg):
            if name not in sweep:
                raise ConfigError("--", arg, f"names sweep.{name}, which is not given", f"sweep.{name}=A,B before "
                                  f"`--` (with launcher run --multirun); the sweep's placeholders: {valid}")
    used = {name for arg in s.args for name in PLACEHOLDER.findall(arg)}
    for name, value in sweep.items():
        if name not in used:
            raise ConfigError(f"sweep.{name}", value, "no script argument takes it",
                              f"'${{sweep.{name}}}' in an argument after `--`, e.g. -- --{name} '${{sweep.{name}}}'")
    return replace(s, args=[PLACEHOLDER.sub(lambda m: _text(sweep[m.group(1)]), a) for a in s.args])


def _text(value: Any) -> str:
    # Hydra has parsed the value (1e-3 arrives as the float 0.001, true as a bool); a quoted value
    # keeps its text: sweep.tag="'0.10','0.20'"
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_script(s: ScriptConfig, sweep: dict[str, Any]) -> None:
    """The script exists, or the module can be found (from the working directory, as `python -m`
    looks); nothing of it is run here: its own import errors are its ranks' (one line each).
    Sweep values are for a script's arguments: a recipe sweeps its own keys."""
    if sweep and not s.given():
        name = next(iter(sweep))
        raise ConfigError(f"sweep.{name}", sweep[name], "a recipe run has no script arguments to fill",
                          "a recipe's own keys swept with -m (python -m launcher -m recipe=mnist "
                          "optimizer.lr=1e-3,3e-3); sweep.* is for launcher run --multirun")
    if s.path and not os.path.isfile(s.path):
        raise ConfigError("script", s.path, "no such file" if not os.path.exists(s.path) else "not a file",
                          "a Python file (launcher run train.py), or launcher run -m MODULE")
    if s.module:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            found = importlib.util.find_spec(s.module)
        except Exception as e:  # noqa: BLE001 - a parent package that fails to import is the user's
            raise ConfigError("-m", s.module, f"does not import: {type(e).__name__}: {e}",
                              "a module importable from this directory or the PYTHONPATH") from None
        if found is None:
            raise ConfigError("-m", s.module, "no such module", "a module importable from this directory "
                              "or the PYTHONPATH (python -m MODULE finds the same)")
