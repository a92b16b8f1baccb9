"""`python -m launcher` (or `launcher`): compose a recipe with Hydra, check it once, run it.

    python -m launcher recipe=mnist                                   # 1 rank on the best local device
    python -m launcher recipe=mnist trainer.gpus=0 trainer.nproc=2 trainer.max_epochs=3   # 2 CPU ranks (gloo)
    python -m launcher recipe=mnist trainer.gpus=8                    # 8 GPU ranks (nccl) on this box
    python -m launcher recipe=mnist launcher=ray launcher.address=auto trainer.gpus=8 trainer.nodes=4   # Ray actors
    python -m launcher recipe=circles 'logger=[csv,wandb,tensorboard]' # + W&B (offline without a key), TensorBoard
    python -m launcher recipe=mnist run.dir=runs/exp1                 # killed? the same command resumes
    python -m launcher -m recipe=linreg optimizer.lr=1e-2,3e-2        # a sweep, one run directory each
    python -m launcher --help  |  python -m launcher recipe=mnist --cfg job
    torchrun --nproc-per-node 2 -m launcher recipe=mnist              # an outside launcher: no second spawn

Bad input (unknown option or key, wrong type, impossible value) is one line on stderr and exit 2,
before any process starts or any file is written. A failed rank: its traceback and exit 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from . import config as C
from . import faults, overlap
from .launch import fork_server  # the standard library only: no torch before the config is composed

# Two phases (overlap.py runs the first in a forked child while this process imports torch):
# Hydra composes and the fields are checked, without torch; then the checks that need torch
# (recipe targets, GPUs, resume) and the start. Hydra is imported by the first phase only, torch
# (checkpoint, dist, run, worker, launch/*) by the second: `--help`, `--cfg` and a bad value never
# wait ~2 s for torch.
EXIT_CONFIG = 2


_errors: list[BaseException] = []  # raised in the task: reported by _compose(), not by Hydra's job runner
_composed: list[Any] = []  # (field-checked config, hydra.job.env_set) of the run (-m: of every sweep point)
_sweep_parents: dict[str, str] = {}  # -m: run.dir as written -> as resolved at the sweep's first point


def _conf_dir() -> str:
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):  # installed wheel / source checkout
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"launcher's conf/ directory is missing (looked in {here} and {here.parent})")


def _task(dcfg: Any) -> None:
    """Hydra's task function, once per run (once per sweep point with -m): the torch-free checks."""
    # Hydra's job runner prints its own "Error executing job" line for anything raised from here.
    from hydra.core.hydra_config import HydraConfig

    try:
        hc = HydraConfig.get()
        env = {str(k): str(v) for k, v in (hc.job.env_set or {}).items()}
        _composed.append((_fields_checked(dcfg, hc), env))
    except Exception as e:  # noqa: BLE001 - handed to _compose() unchanged
        _errors.append(e)


def _fields_checked(dcfg: Any, hc: Any) -> Any:
    """The typed Config with every field checked: what needs neither torch nor any file. `hc`:
    Hydra's own config of this job (mode, job number)."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    _refuse_unknown_keys(dcfg)
    cfg: C.Config = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    if hc.mode == RunMode.MULTIRUN:  # each sweep point its own run directory, all under one parent:
        # a run.dir that is the same template for every point (the default `runs/${now:...}`) is
        # resolved once, at the first point, not again (a second later) at each
        template = str(OmegaConf.to_container(dcfg.run, resolve=False)["dir"])
        shared = template if re.fullmatch(r"[^$]*(\$\{now:[^}]*\}[^$]*)+", template) else None
        cfg.run.dir = str(Path(_sweep_parents.setdefault(shared, cfg.run.dir) if shared else cfg.run.dir)
                          / str(hc.job.num))
    C.check_fields(cfg)
    return cfg


def _checked(cfg: Any) -> Any:
    """The Config checked against this machine (recipe targets, GPUs, resume), with nothing written
    yet; ConfigError on bad input. Under an outside torchrun / srun this process is a rank: it runs
    the worker and returns None."""
    local, slurm = cfg.launcher.name == "local", cfg.launcher.name == "slurm"
    from . import dist, recipe, worker
    from . import run as R
    from .checkpoint import format as F
    from .launch import slurm as S

    # srun python -m launcher launcher=slurm ...: this process is one rank of the allocation. With the
    # local launcher inside an srun (an interactive srun --pty bash), launch locally as anywhere.
    inside = S.in_srun_step() and slurm
    if slurm:
        S.check_installed()
    elif cfg.launcher.name == "ray":
        from .launch import ray_cluster

        ray_cluster.check_installed()  # (without importing ray: launch/ray.py does, when it starts the ranks)
    C.check(cfg, local=local and not inside)
    recipe.check(cfg)
    run_dir = Path(cfg.run.dir).expanduser().absolute()
    if cfg.resume not in C.RESUME_MODES:
        try:
            F.resolve(cfg.resume)
        except ValueError as e:
            raise C.ConfigError("resume", cfg.resume, str(e).split(": ", 1)[-1],
                                "auto, never, or a complete checkpoint") from None
    if cfg.resume == "never" and F.candidates(run_dir / "checkpoints"):
        raise C.ConfigError("resume", "never", f"{run_dir} already holds checkpoints of another start",
                            "auto (continue it), or a new run.dir")
    existing = R.read_id(run_dir)
    if cfg.run.id and existing and cfg.run.id != existing:
        raise C.ConfigError("run.id", cfg.run.id, f"{run_dir} belongs to run {existing!r}", f"{existing!r} or a new run.dir")
    cfg.trainer.gpus = C.resolve_gpus(cfg.trainer, local and not inside)
    cfg.run.dir = str(run_dir)
    if inside:
        S.export_env()
        want = C.ranks_per_node(cfg.trainer) * cfg.trainer.nodes
        if int(os.environ["WORLD_SIZE"]) != want:
            print(f"launcher: warning: the SLURM step has {os.environ['WORLD_SIZE']} task(s), the config asks for "
                  f"{want} (trainer.nodes x trainer.gpus or nproc); the allocation wins", file=sys.stderr)
    problem = dist.env_problem()
    if problem:  # e.g. a torchrun-style env with RANK >= WORLD_SIZE: fail here, not in init_process_group
        key, value, what, valid = problem
        raise C.ConfigError(f"env {key}", value, what, valid)
    if dist.env_rank() is not None:  # started by torchrun / srun: this process is one rank
        worker.run(cfg)
        return None
    if slurm:
        S.check(cfg)
    return cfg


def _refuse_unknown_keys(dcfg: Any) -> None:
    """Keys added with Hydra's `+` pass composition, and to_object() would drop them silently."""
    from omegaconf import OmegaConf

    fields = [f.name for f in dataclasses.fields(C.Config)]
    schemas = C.section_schemas(dcfg.launcher.name)
    unknown = [str(k) for k in dcfg if k not in fields]
    unknown += [f"{s}.{k}" for s, cls in schemas.items() for k in (OmegaConf.select(dcfg, s) or {})
                if k not in cls.__dataclass_fields__]
    if unknown:
        guess, valid = _unknown(unknown[0])
        raise C.ConfigError(unknown[0], OmegaConf.select(dcfg, unknown[0]), f"unknown key{guess}", valid)


def _one_line(e: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line errors as the one line our users get."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        # an item of a list (logger=[csv,nope]) comes without Hydra's options: the group's files
        options = e.options or [p.stem for p in Path(_conf_dir(), group).glob("*.yaml")]
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
            guess, valid = _unknown(key)
            return f"{key}: unknown key{guess}; valid: {valid}"
        value = getattr(cause, "value", None)
        return f"{key}={value!r}: {first}" if value is not None else f"{key}: {first}"
    text = str(e)
    key = re.search(r"full_key: (\S+)", text)
    where = re.match(r"In '([^']+)'", text)
    if key and re.search(r"Key '[^']+' not in", text):  # an unknown key inside a config file
        guess, valid = _unknown(key.group(1))
        return f"{key.group(1)}: unknown key{f' (in {where.group(1)}.yaml)' if where else ''}{guess}; valid: {valid}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(lines[:2]) if lines else type(e).__name__


def _unknown(full_key: str) -> tuple[str, str]:
    """(" (did you mean X?)" or "", valid keys) for an unknown key: the same name in another section
    (checkpoint.monitor -> trainer.monitor), else the closest in its own (trainer.epochs -> max_epochs)."""
    section, _, leaf = full_key.rpartition(".")
    if not section:  # Hydra names only the missing top-level node: take the leaf from the override
        given = [a.lstrip("+~").split("=", 1)[0] for a in sys.argv[1:] if a.lstrip("+~").startswith(f"{full_key}.")]
        leaf = given[0].rpartition(".")[2] if given else ""
    schemas = C.section_schemas(_launcher_choice())
    own = list(schemas[section].__dataclass_fields__) if section in schemas else []
    guess = [f"{s}.{leaf}" for s, cls in schemas.items() if s != section and leaf in cls.__dataclass_fields__]
    guess = guess or [f"{section}.{m}" for m in difflib.get_close_matches(leaf, own, n=1, cutoff=0.75)]
    hint = f" (did you mean {' or '.join(guess)}?)" if guess else ""
    if full_key == "recipe":  # a recipe file's keys landed under `recipe:` instead of the top level
        hint = " (a recipe file must begin with `# @package _global_`: its keys are top-level ones)"
    if own:
        return hint, ", ".join(f"{section}.{f}" for f in own)
    return hint, ", ".join(f.name for f in dataclasses.fields(C.Config))


def _launcher_choice() -> str:
    """The launcher group option on the command line (for listing its valid keys)."""
    chosen = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("launcher=")]
    return chosen[-1] if chosen else "local"


def _field_alias(arg: str) -> str:
    """checkpoint.async=true -> checkpoint.async_save=true (config.FIELD_ALIASES: a keyword can't be a field)."""
    for (section, alias), name in C.FIELD_ALIASES.items():
        arg = re.sub(rf"^(\+*{section}\.){alias}=", rf"\g<1>{name}=", arg)
    return arg


def _another_rank() -> bool:
    """This process is a rank other than 0 of a valid torchrun / srun world."""
    if "RANK" not in os.environ:  # the usual CLI (dist.env_rank needs RANK): no torch import to say so
        return False
    from . import dist

    rank = dist.env_rank() if dist.env_problem() is None else None
    return rank is not None and rank[0] > 0


def main() -> None:
    """The CLI; its process ends as soon as the run is done (launch/rank.py's exit_now)."""
    from .launch.rank import run_then_exit

    run_then_exit(_main)


def _main() -> None:
    # Hydra re-raises instead of printing its own report, so every error goes through _one_line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    faults.raise_on_sigterm()  # SIGTERM ends a run as Ctrl-C does, its cleanup done: exit 143
    # CPU ranks' fork server (launch/fork_server.py) starts as soon as the composed config wants it
    composed = overlap.compose_beside(_compose, _torch_imports, early=fork_server.prestart)
    if not composed:  # --help, --cfg, --info: Hydra has printed what was asked
        return
    from .launch.start import start

    for _, env in composed:  # hydra.job.env_set: Hydra sets it around its task, which only composes
        os.environ.update(env)
    with _reported():
        checked = [cfg for cfg in (_checked(c) for c, _ in composed) if cfg is not None]
        # a sweep starts only once every point has passed its checks (SLURM: one job array)
        failures = start(checked) if checked else []
        if failures:
            sys.exit(failures[0])  # a sweep goes on after a failed point and exits with the first


def _compose() -> Optional[list[Any]]:
    """Hydra's composition of the command line and the field checks: (config, env_set) to run, or None
    when Hydra only had something to show (--help, --cfg). Errors: one line, exit 2."""
    import hydra

    C.register()
    sys.argv[1:] = [_field_alias(a) for a in sys.argv[1:]]
    entry = hydra.main(config_path=_conf_dir(), config_name="config", version_base="1.3")(_task)
    with _reported(composing=True):
        entry()
        if _errors:
            raise _errors[0]
    return list(_composed) or None


def _torch_imports() -> None:
    """What every run imports once its config is composed (overlap.py: while Hydra composes)."""
    for name in ("torch", "dist", "recipe", "run", "worker", "checkpoint.format", "launch.slurm", "launch.start"):
        importlib.import_module(name if name == "torch" else f"{__package__}.{name}")


@contextlib.contextmanager
def _reported(composing: bool = False) -> Iterator[None]:
    """A user's error as one line on stderr and exit 2; Ctrl-C / SIGTERM as one line, 128 + N.
    While composing, Hydra's, OmegaConf's and YAML's errors are the user's too (the command line, a
    config file); anything else is a bug and keeps its traceback."""
    try:
        yield
    except C.UserError as e:
        if not _another_rank():  # under torchrun / srun every rank gets here: rank 0 says it
            print(f"launcher: error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the same on one rank and on N
        if not _another_rank():
            print(f"launcher: interrupted by {faults.signal_name(e)}; the run stopped (run the same command "
                  "to continue it from its last checkpoint)", file=sys.stderr)
        sys.exit(faults.exit_code(e))
    except Exception as e:
        line = _config_error(e) if composing else None
        if line is None:  # a bug: its traceback
            raise
        print(f"launcher: error: {line}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def _config_error(e: Exception) -> Optional[str]:
    """The one line for Hydra's, OmegaConf's and YAML's errors (a bad command line or config file)."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return _one_line(e)
    if isinstance(e, yaml.YAMLError):  # a config file that is not YAML
        mark = getattr(e, "problem_mark", None)
        where = f"{mark.name} line {mark.line + 1}" if mark else "a config file"
        return f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})"
    return None


if __name__ == "__main__":
    main()
