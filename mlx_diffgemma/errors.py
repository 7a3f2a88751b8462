"""How a failure reaches the person at the terminal: one line, ``mlxdg: ...``.

Light on purpose (no MLX, no mlx-lm): ``cli`` reads it before any command runs.
"""

import sys

PREFIX = "mlxdg: "


class UserError(Exception):
    """A failure meant for people: the CLI prints its message as it is, on one
    line, and exits with status 1. Its message says what failed, on what (a
    file, flag or value) and what to do."""


def error_line(message: str) -> None:
    """``message`` on stderr as one ``mlxdg:`` line."""
    print(PREFIX + " ".join(str(message).split()), file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def describe(error: BaseException) -> str:
    """The line to print for ``error``: a ``UserError`` as it is; anything else
    with its type, its first line and how to see more."""
    if isinstance(error, UserError):
        return str(error)
    name, first = type(error).__name__, first_line(error)
    return f"{name}{'' if first == name else ': ' + first} (--debug shows the traceback)"
