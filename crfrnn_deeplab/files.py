"""Writing files whole: an output is either complete or absent, and never written through a link; and the
parent that keeps a path from being created.

The lowest layer of the package beside :mod:`crfrnn_deeplab.images`: the prediction CLI's outputs and every
checkpoint (:func:`crfrnn_deeplab.weights.save_checkpoint`) are written with :func:`atomic_write`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "blocking_parent", "naming_the_file"]

PathLike = str | os.PathLike


@contextmanager
def atomic_write(path: PathLike) -> Iterator[BinaryIO]:
    """Writes ``path`` whole: yields a binary file to write into, then puts it in place in one rename.

    The data goes to a new file next to ``path`` (``.<name>.<random>.tmp``, created exclusively, with the usual
    permissions), which is flushed, fsynced and renamed onto ``path`` with :func:`os.replace`. The rename
    replaces the directory entry, never the file behind it: when ``path`` is a hard link to another file, or a
    symlink, that other file (or the symlink's target) is left as it was. An error or an interrupt while writing
    removes the temporary file and leaves ``path`` untouched, so nobody ever reads a truncated file there.
    An OSError that names no file (a full disk) is raised naming ``path``.

    Example::

        with atomic_write(out / "labels.png") as f:
            image.save(f, format="PNG")
    """
    path = Path(path)
    with naming_the_file(path):
        tmp, fd = _new_temporary(path)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


@contextmanager
def naming_the_file(path: PathLike) -> Iterator[None]:
    """Raises an OS error of the block that names no file (a failed write: a full disk, ENOSPC, names none) again,
    naming ``path``, so that a one-line error says which file could not be written. One that names a file, or an
    OSError with a message but no errno (not the operating system's), is raised as it is."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e


#: The longest file name, in bytes, of the usual file systems (ext4, XFS, btrfs, APFS).
_NAME_MAX = 255


def _temporary_name(name: str, token: str) -> str:
    """``.<name>.<token>.tmp``, with as much of the end of ``name`` as fits in :data:`_NAME_MAX` bytes: a name
    that is itself legal (up to 255 bytes) must not fail for its temporary's 14 bytes more. Its end is kept, so
    the temporary still ends in ``<suffix>.<token>.tmp`` (what ``remove_stale_temporaries`` looks for)."""
    room = _NAME_MAX - len(f"..{token}.tmp")
    encoded = os.fsencode(name)
    if len(encoded) > room:
        encoded = encoded[-room:]
        while encoded and encoded[0] & 0xC0 == 0x80:  # not from inside a UTF-8 character
            encoded = encoded[1:]
        name = os.fsdecode(encoded)
    return f".{name}.{token}.tmp"


def _new_temporary(path: Path) -> tuple[Path, int]:
    """A new, empty file ``.<name>.<random>.tmp`` in ``path``'s directory, opened for writing (the name's start cut
    where the whole would be longer than a file name may be)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)  # O_EXCL: never an existing file or link
    for _ in range(100):
        tmp = path.with_name(_temporary_name(path.name, secrets.token_hex(4)))
        try:
            return tmp, os.open(tmp, flags, 0o666)  # 0o666 less the umask, as open(path, "wb") would create it
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {str(path)!r}: every name tried exists")


def blocking_parent(path: PathLike) -> Path | None:
    """The first parent of ``path`` that exists (as a name: a dangling symlink too) and is not a directory, so that
    ``path`` cannot be created below it; None when there is none."""
    return next((p for p in Path(path).parents if os.path.lexists(p) and not p.is_dir()), None)
