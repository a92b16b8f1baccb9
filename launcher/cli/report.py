"""The CLI's exits: a user's error as one line on stderr and exit 2, a signal as one line and
128 + N, printed once however many ranks; a bug keeps its traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from .. import config as C
from ..config import faults
from .hydra_errors import config_error

EXIT_CONFIG = 2


def another_rank() -> bool:
    """This process is a rank other than 0 of a valid torchrun / srun world."""
    if "RANK" not in os.environ:  # the usual CLI (dist.env_rank needs RANK): no torch import to say so
        return False
    from ..device import dist

    rank = dist.env_rank() if dist.env_problem() is None else None
    return rank is not None and rank[0] > 0


@contextlib.contextmanager
def reported(composing: bool = False) -> Iterator[None]:
    """A user's error as one line on stderr and exit 2; Ctrl-C / SIGTERM as one line, 128 + N.
    While composing, Hydra's, OmegaConf's and YAML's errors are the user's too (the command line, a
    config file); anything else is a bug and keeps its traceback."""
    try:
        yield
    except C.UserError as e:
        if not another_rank():  # under torchrun / srun every rank gets here: rank 0 says it
            print(f"launcher: error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the same on one rank and on N
        if not another_rank():
            print(f"launcher: interrupted by {faults.signal_name(e)}; the run stopped (run the same command "
                  "to continue it from its last checkpoint)", file=sys.stderr)
        sys.exit(faults.exit_code(e))
    except Exception as e:
        line = config_error(e) if composing else None
        if line is None:  # a bug: its traceback
            raise
        print(f"launcher: error: {line}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


