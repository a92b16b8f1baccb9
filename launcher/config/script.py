"""The check of `launcher run SCRIPT` / `launcher run -m MODULE` (the script section of the config)."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from .errors import ConfigError


def check_script(s: Any) -> None:
    """The script exists, or the module can be found (from the working directory, as `python -m`
    looks); nothing of it is run here: its own import errors are its ranks' (one line each)."""
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
