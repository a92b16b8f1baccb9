"""The error a user's input causes, and the small checks every schema module shares."""

from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """A failure the user caused (config, recipe code, data, run dir, tracker), at config or run
    time: str() is the one line the CLI prints, exit 2. Anything else is a bug: it keeps its traceback."""

    def _render_traceback_(self) -> list[str]:
        # IPython's hook (Jupyter, the IPython shell): the one line in place of the traceback, as the
        # CLI prints it; a plain `python` script keeps Python's own report
        return [f"{type(self).__name__}: {self}"]


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class ConfigError(UserError):
    """A bad config value; str() is the one line the CLI prints."""

    def __init__(self, key: str, value: Any, problem: str, valid: str = "") -> None:
        self.key, self.value = key, value
        text = f"{key}={value!r}: {problem}"
        super().__init__(f"{text}; valid: {valid}" if valid else text)


def positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "must be a positive integer")


def non_negative(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, value, "must be an integer >= 0")


def positive_number(key: str, value: Any, valid: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(key, value, "must be a number > 0", valid)


def choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, value, "unknown choice", ", ".join(choices))
