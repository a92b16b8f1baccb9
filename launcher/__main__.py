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

import dataclasses
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from . import config as C
from . import faults

# Everything that imports torch (checkpoint, dist, run, worker, launch/*) is imported inside the
# functions that need it, once Hydra has composed the config: `--help`, `--cfg` and Hydra's own
# errors must not wait ~2 s for torch.
EXIT_CONFIG = 2


_failures: list[int] = []  # exit codes of failed runs; a sweep goes on and exits with the first
_errors: list[BaseException] = []  # raised in the task: reported by main(), not by Hydra's job runner
_pending: list[Any] = []  # -m: the checked configs of every sweep point, started once all have passed
_sweep_parents: dict[str, str] = {}  # -m: run.dir as written -> as resolved at the sweep's first point


def _conf_dir() -> str:
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):  # installed wheel / source checkout
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"launcher's conf/ directory is missing (looked in {here} and {here.parent})")


def _task(dcfg: Any) -> None:
    """Hydra's task function: runs in the parent, once per run (once per sweep point with -m)."""
    # Hydra's job runner prints its own "Error executing job" line for anything raised from here.
    try:
        _run(dcfg)
    except Exception as e:  # noqa: BLE001 - handed to main() unchanged
        _errors.append(e)


def _run(dcfg: Any) -> None:
    cfg = _checked(dcfg)
    if cfg is None:  # this process was one rank of an outside torchrun / srun, and has run
        return
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        _pending.append(cfg)  # a sweep starts only once every point has passed its checks
        return
    from .launch.start import start

    _failures.extend(start([cfg]))


def _checked(dcfg: Any) -> Any:
    """The typed, checked Config, with nothing written yet; ConfigError on bad input. Under an
    outside torchrun / srun this process is a rank: it runs the worker and returns None."""
    _refuse_unknown_keys(dcfg)
    cfg: C.Config = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:  # each sweep point its own run directory, all under one parent:
        # a run.dir that is the same template for every point (the default `runs/${now:...}`) is
        # resolved once, at the first point, not again (a second later) at each
        template = str(OmegaConf.to_container(dcfg.run, resolve=False)["dir"])
        shared = template if re.fullmatch(r"[^$]*(\$\{now:[^}]*\}[^$]*)+", template) else None
        cfg.run.dir = str(Path(_sweep_parents.setdefault(shared, cfg.run.dir) if shared else cfg.run.dir)
                          / str(hc.job.num))
    local, slurm = cfg.launcher.name == "local", cfg.launcher.name == "slurm"
    C.check_fields(cfg)  # before torch is imported (by what follows): a bad value costs no import
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
    C.register()
    sys.argv[1:] = [_field_alias(a) for a in sys.argv[1:]]
    entry = hydra.main(config_path=_conf_dir(), config_name="config", version_base="1.3")(_task)
    try:
        entry()
        if _errors:
            raise _errors[0]
        if _pending:  # a -m sweep, every point checked: start them (SLURM: job arrays)
            from .launch.start import start

            _failures.extend(start(_pending))
        if _failures:
            sys.exit(_failures[0])
    except C.UserError as e:
        if not _another_rank():  # under torchrun / srun every rank gets here: rank 0 says it
            print(f"launcher: error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"launcher: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except yaml.YAMLError as e:  # a config file that is not YAML
        mark = getattr(e, "problem_mark", None)
        where = f"{mark.name} line {mark.line + 1}" if mark else "a config file"
        print(f"launcher: error: {where}: not valid YAML ({getattr(e, 'problem', None) or e})", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the same on one rank and on N
        if not _another_rank():
            print(f"launcher: interrupted by {faults.signal_name(e)}; the run stopped (run the same command "
                  "to continue it from its last checkpoint)", file=sys.stderr)
        sys.exit(faults.exit_code(e))


if __name__ == "__main__":
    main()
