"""How the command-line tools report the errors a user can fix: one line on stderr and a documented exit status.

``error: <what> (<file / key / value>)``: the project's exceptions name the offending file, key or value in
their message; :func:`one_line` folds a multi-line message (e.g. an expected directory layout) into that line.
A traceback is printed only with ``--debug`` or for an exception that is not one of these (a bug).
"""

from __future__ import annotations

import sys

__all__ = ["EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "UsageError", "one_line", "print_error"]

EXIT_OK = 0
#: Bad data or a failure while running: a corrupt/missing data file or checkpoint, divergence.
EXIT_RUNTIME = 1
#: A command line or config the tool refuses: unknown key, bad value, a path it would overwrite.
EXIT_USAGE = 2


class UsageError(ValueError):
    """A command line that asks for something the tool refuses to do (e.g. to write over a previous run)."""


def one_line(error: BaseException) -> str:
    """The error's message on one line: its lines joined with ``"; "`` (blank lines and indentation dropped)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def print_error(error: BaseException) -> None:
    """``error: <message>`` on stderr, one line."""
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
