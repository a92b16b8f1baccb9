"""A local rank's report to the launcher, in the error file elastic reads (TORCHELASTIC_ERROR_FILE):
written whole or not at all, with room reserved at the rank's start (the run can fill the disk).
Used by worker.py (recipe ranks) and script_rank.py (a user's script)."""

from __future__ import annotations

import contextlib
import json
import os
import time

USER_ERROR_KEY = "launcher_user_error"  # in a rank's elastic error file: the failure is the user's
JOIN_KEY = "launcher_not_joined"  # ... the failure is a rank that did not join (dist.JoinTimeout, JoinWatch)
SCRIPT_KEY = "launcher_script_failed"  # ... a `launcher run` script ended badly: its line (script.ended)

# Room for a rank's report in its error file, taken when the rank starts: the temp dir that holds the
# error files may share a disk with the run dir, which the run can fill (its first checkpoint), and
# the report of that ENOSPC must still fit. A longer report is written as a new file.
ERROR_FILE_RESERVE = 4096


def reserve() -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(f"{path}.reserve", "wb") as f:
            f.write(b" " * ERROR_FILE_RESERVE)
    except OSError:  # a disk full already: _write_error_file tries a new file, or leaves none
        with contextlib.suppress(OSError):
            os.unlink(f"{path}.reserve")


def report(line: str, key: str) -> None:
    """The one line for the parent to print (once, whichever rank failed), marked with `key` (the
    user's error, or a rank that did not join) so that no traceback is shown."""
    write({"message": line, "timestamp": int(time.time()), key: line})


def write(data: dict) -> None:
    """`data` where elastic reads a failed rank's error (TORCHELASTIC_ERROR_FILE), whole or not at all.

    The agent fails with a JSONDecodeError traceback on a file that is there but empty or cut short
    (a full disk), and reports a missing one as a failure without a message: the text goes into the
    reserved room (no new blocks needed), then takes the error file's name."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    raw = json.dumps(data).encode()
    reserve = f"{path}.reserve"
    fits = len(raw) <= ERROR_FILE_RESERVE and os.path.isfile(reserve)
    staged = reserve if fits else f"{path}.tmp{os.getpid()}"
    try:
        with open(staged, "r+b" if fits else "wb") as f:
            f.write(raw)
            f.truncate()
        os.replace(staged, path)
    except OSError:  # nothing readable to leave: the launcher reports the exit code without it
        with contextlib.suppress(OSError):
            os.unlink(staged)
