"""Hydra's, OmegaConf's and YAML's errors as the one line a user gets: the key, the bad value, what
is valid (a close key name suggested where one exists)."""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from typing import Optional

from .. import config as C


def one_line(e: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line errors as the one line our users get."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        # an item of a list (logger=[csv,nope]) comes without Hydra's options: the group's files
        options = e.options or [p.stem for p in (C.CONF_DIR / group).glob("*.yaml")]
        if options:
            return f"{group}={option!r}: unknown option; valid: {', '.join(sorted(options))}"
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = cause.full_key
        first = str(cause.msg if hasattr(cause, "msg") else cause).strip().splitlines()[0]
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key.startswith("launcher.sbatch."):
            return (f"{key}: extra sbatch parameters are new keys: add them with Hydra's '+', "
                    f"as +{key}=<value>")
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            guess, valid = unknown(key)
            return f"{key}: unknown key{guess}; valid: {valid}"
        value = getattr(cause, "value", None)
        return f"{key}={value!r}: {first}" if value is not None else f"{key}: {first}"
    text = str(e)
    ambiguous = re.match(r"Ambiguous value for argument '\+?(sweep\.)?([^']*)'", text)
    if ambiguous:  # Hydra's two numbered choices, in one line; sweep.* is ours (given Hydra as +sweep.*)
        arg = f"{ambiguous.group(1) or ''}{ambiguous.group(2)}"
        return (f"{arg}: several values outside a sweep; valid: a sweep, with -m (python -m launcher -m ...) "
                f"or --multirun (launcher run --multirun SCRIPT ...), or one list value: {arg.split('=')[0]}=[...]")
    key = re.search(r"full_key: (\S+)", text)
    where = re.match(r"In '([^']+)'", text)
    if key and re.search(r"Key '[^']+' not in", text):  # an unknown key inside a config file
        guess, valid = unknown(key.group(1))
        return f"{key.group(1)}: unknown key{f' (in {where.group(1)}.yaml)' if where else ''}{guess}; valid: {valid}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(lines[:2]) if lines else type(e).__name__


def unknown(full_key: str) -> tuple[str, str]:
    """(" (did you mean X?)" or "", valid keys) for an unknown key: the same name in another section
    (checkpoint.monitor -> trainer.monitor), else the closest in its own (trainer.epochs -> max_epochs)."""
    section, _, leaf = full_key.rpartition(".")
    if not section:  # Hydra names only the missing top-level node: take the leaf from the override
        given = [a.lstrip("+~").split("=", 1)[0] for a in sys.argv[1:] if a.lstrip("+~").startswith(f"{full_key}.")]
        leaf = given[0].rpartition(".")[2] if given else ""
    schemas = C.section_schemas(launcher_choice())
    own = list(schemas[section].__dataclass_fields__) if section in schemas else []
    guess = [f"{s}.{leaf}" for s, cls in schemas.items() if s != section and leaf in cls.__dataclass_fields__]
    guess = guess or [f"{section}.{m}" for m in difflib.get_close_matches(leaf, own, n=1, cutoff=0.75)]
    hint = f" (did you mean {' or '.join(guess)}?)" if guess else ""
    if full_key == "recipe":  # a recipe file's keys landed under `recipe:` instead of the top level
        hint = " (a recipe file must begin with `# @package _global_`: its keys are top-level ones)"
    if own:
        return hint, ", ".join(f"{section}.{f}" for f in own)
    return hint, ", ".join(f.name for f in dataclasses.fields(C.Config))


def launcher_choice() -> str:
    """The launcher group option on the command line (for listing its valid keys)."""
    chosen = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("launcher=")]
    return chosen[-1] if chosen else "local"


def config_error(e: Exception) -> Optional[str]:
    """The one line for Hydra's, OmegaConf's and YAML's errors (a bad command line or config file)."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return one_line(e)
    if isinstance(e, yaml.YAMLError):  # a config file that is not YAML
        mark = getattr(e, "problem_mark", None)
        where = f"{mark.name} line {mark.line + 1}" if mark else "a config file"
        return f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})"
    return None
