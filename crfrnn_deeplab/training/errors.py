"""How the command-line tools report the errors a user can fix: one line on stderr and a documented exit status.

``error: <what> (<file / key / value>)``: the project's exceptions name the offending file, key or value in
their message; :func:`one_line` folds a multi-line message (e.g. an expected directory layout) into that line.
A traceback is printed only with ``--debug`` or for an exception that is not one of these (a bug).
"""

from __future__ import annotations

import re
import sys

__all__ = ["EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "UsageError", "one_line", "original_message", "print_error"]

EXIT_OK = 0
#: Bad data or a failure while running: a corrupt/missing data file or checkpoint, divergence.
EXIT_RUNTIME = 1
#: A command line or config the tool refuses: unknown key, bad value, a path it would overwrite.
EXIT_USAGE = 2


class UsageError(ValueError):
    """A command line that asks for something the tool refuses to do (e.g. to write over a previous run)."""


_TRACEBACK = "Traceback (most recent call last):\n"


def original_message(text: str) -> str:
    """The message of an exception that a DataLoader worker raised, without what the worker's wrapping added.

    PyTorch re-raises a worker's exception in the main process with the same type but the message
    ``"Caught <Type> in DataLoader worker process N.\nOriginal Traceback ...\n<module>.<Type>: <message>"``:
    this returns ``<message>``, so an error reads the same with ``data.workers=0`` and ``>= 1``. Any other
    text is returned as it is.
    """
    if not (text.startswith("Caught ") and "DataLoader worker" in text.partition("\n")[0] and _TRACEBACK in text):
        return text
    lines = text.rpartition(_TRACEBACK)[2].splitlines()  # the last traceback: the exception that was raised
    while lines and (not lines[0].strip() or lines[0][0].isspace()):  # its frames ("  File ...", source lines)
        lines.pop(0)
    if not lines:
        return text
    name, colon, first = lines[0].partition(": ")
    return "\n".join([first if colon and re.fullmatch(r"[\w.]+", name) else lines[0], *lines[1:]])


def one_line(error: BaseException) -> str:
    """The error's message on one line: its lines joined with ``"; "`` (blank lines and indentation dropped;
    the traceback a DataLoader worker adds, too: :func:`original_message`)."""
    lines = [line.strip() for line in original_message(str(error)).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def print_error(error: BaseException) -> None:
    """``error: <message>`` on stderr, one line."""
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
