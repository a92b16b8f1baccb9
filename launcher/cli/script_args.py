"""`launcher run SCRIPT [overrides] [-- script args]`: the command line split into the script, the
launcher's Hydra overrides and the script's own arguments, before Hydra sees any of it.

The rule is positional and has no exceptions: after `run` comes the script (or `-m MODULE`), then
`key=value` overrides, then `--` and the script's arguments, passed untouched (a `--lr` before `--`
is refused, not guessed at: an override and a script flag can look alike, e.g. `trainer.nproc=2`).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional

from .. import config as C

USAGE = """\
usage: launcher run SCRIPT [KEY=VALUE ...] [-- SCRIPT ARGS ...]
       launcher run -m MODULE [KEY=VALUE ...] [-- SCRIPT ARGS ...]
       launcher run --multirun SCRIPT [KEY=A,B ...] [sweep.NAME=A,B ...] [-- ... '${sweep.NAME}' ...]

Runs an unmodified torchrun-style script (it reads RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT and calls init_process_group itself) on the ranks a recipe run would get:

  launcher run train.py trainer.gpus=0 trainer.nproc=2 -- --lr 3e-4       # 2 CPU ranks here
  launcher run train.py trainer.gpus=8 launcher.max_restarts=2            # 8 GPU ranks, 2 restarts
  launcher run train.py launcher=slurm trainer.nodes=2 trainer.gpus=4 launcher.wait=true
  launcher run -m mypkg.train launcher=ray trainer.gpus=0 trainer.nproc=4 run.dir=runs/a
  launcher run --multirun train.py launcher=slurm sweep.lr=1e-4,3e-4 -- --lr '${sweep.lr}'   # a job array

Before `--`: the launcher's overrides (trainer.*, launcher.*, run.*; `launcher run --help` is this
text). After `--`: the script's arguments, exactly as given. Each rank finds LAUNCHER_RUN_DIR (its run
directory: logs/rank-N.log holds its output), LAUNCHER_ATTEMPT (0, then 1 after a restart or requeue)
and LAUNCHER_STOP_SIGNAL (the signal that asks it to save and exit with code 75 to be requeued);
launcher.stop_requested() is the same as one agreed answer of all ranks. A sweep (--multirun) runs
one point per combination of the comma-separated values, each in RUN_DIR/<n> (on SLURM: one job
array); '${sweep.NAME}' in an argument is that point's value. docs/your-script.md."""

# what may stand before `--`: Hydra's key=value, +key=value, ++key=value and ~key
MULTIRUN = "--multirun"
_OVERRIDE = re.compile(r"^(~|\+\+|\+)?[A-Za-z_][\w.\-@/]*(=.*)?$", re.S)


def parse(argv: list[str]) -> Optional[tuple[C.ScriptConfig, list[str]]]:
    """argv after `run` -> (the script, Hydra's overrides); None after printing the usage (--help).
    A malformed command line is a ConfigError naming the token."""
    head, args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    # Hydra's sweep flag, anywhere before `--`; its short form `-m` is taken: it names a module here
    sweep = [a for a in head if a == MULTIRUN]
    head = [a for a in head if a != MULTIRUN]
    if not head:
        raise C.ConfigError("script", "", "missing", "launcher run train.py [KEY=VALUE ...] [-- ARGS], or "
                            "launcher run -m MODULE; launcher run --help")
    if head[0] in ("-h", "--help") or any(a in ("-h", "--help") for a in head[1:]):
        print(USAGE)
        return None
    if head[0] == "-m":
        if len(head) > 1 and (head[1].endswith(".py") or "/" in head[1] or "=" in head[1]):
            raise C.ConfigError("-m", head[1], "names a module here, not a script or a sweep",
                                f"launcher run -m package.module, launcher run {head[1]} (a script), or "
                                f"launcher run {MULTIRUN} SCRIPT KEY=A,B (a sweep)")
        if len(head) < 2 or head[1].startswith("-"):
            raise C.ConfigError("-m", head[1] if len(head) > 1 else "", "needs a module name",
                                "launcher run -m package.module [KEY=VALUE ...] [-- ARGS]")
        script, overrides = C.ScriptConfig(module=head[1], args=args), head[2:]
    elif head[0].startswith("-") or ("=" in head[0] and not os.path.exists(head[0])):
        raise C.ConfigError("script", head[0], "the script comes first, right after `run`",
                            "launcher run train.py [KEY=VALUE ...] [-- ARGS], or launcher run -m MODULE")
    else:
        script, overrides = C.ScriptConfig(path=os.path.abspath(head[0]), args=args), head[1:]
    for token in overrides:
        if not _OVERRIDE.match(token) or "=" not in token and not token.startswith("~"):
            raise C.ConfigError("override", token, "not KEY=VALUE: the script's own arguments go after `--`",
                                f"launcher run {head[0] if head[0] != '-m' else '-m ' + head[1]} "
                                f"[KEY=VALUE ...] -- {token} ...")
        if re.match(r"^(\+\+|\+)?(recipe|script)\b", token):
            raise C.ConfigError("override", token, "a script run has no recipe and takes its script from "
                                "the command line", "trainer.*, launcher.*, run.*, checkpoint.* keys")
    return script, sweep + overrides


def usage_error(e: C.UserError) -> None:
    print(f"launcher: error: {e}", file=sys.stderr)
    sys.exit(2)
