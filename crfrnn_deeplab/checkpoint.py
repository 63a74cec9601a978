"""Self-describing checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is a dict of plain containers and tensors only (so ``torch.load(weights_only=True)`` can read it
without executing code)::

    {
        "format": "crfrnn_deeplab/1",
        "model": state_dict,                      # DeepLabV2 / MSC keys, or CRFRNN's network.* + crf.*
        "model_config": {"name": str, "num_classes": int, "options": dict, "crf": dict | None},
        "input_convention": InputConvention.to_dict(),
        "class_names": list[str] | None,
        # training state, when written by train.py:
        "optimizer": dict, "scheduler": dict, "step": int, "config": dict, "rng": dict,
        # provenance, when written by the converter:
        "source": dict,
    }
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "remove_stale_temporaries"]

FORMAT = "crfrnn_deeplab/1"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive (PyTorch >= 1.6)
_PICKLE_PROTO = b"\x80"  # the legacy format: a pickle, protocol >= 2
_TMP_SUFFIX = ".tmp"  # save_checkpoint writes ".<name>.<random>.tmp" next to <name>, then renames it


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of the expected kind."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` to ``path`` atomically: a temporary file in the same directory, fsync, rename.

    A crash or a kill during the write leaves any previous file at ``path`` intact.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(directory: str | os.PathLike, *, suffix: str = ".pt") -> None:
    """Deletes the temporary files that killed :func:`save_checkpoint` calls left in ``directory`` for
    checkpoints named ``*<suffix>`` (the checkpoints themselves are intact)."""
    for tmp in Path(directory).glob(f".*{suffix}.*{_TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint (ours or any plain state dict) with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, not a PyTorch file, or needs arbitrary code execution
            (pickled classes) to load — the message says which and names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with path.open("rb") as f:
        head = f.read(4)
    if not head.startswith(_ZIP_MAGIC) and not head.startswith(_PICKLE_PROTO):
        # Anything else would reach the unpickler and fail with a misleading message (or a bare KeyError).
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: torch.save writes a zip archive (or, before PyTorch 1.6, "
            f"a pickle), this file starts with {head!r}"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"it pickles {found[1]}" if found else str(e).strip().splitlines()[-1][:200]
        raise CheckpointError(
            f"{path} cannot be loaded with weights_only=True: it contains pickled Python objects beyond tensors "
            f"and plain containers ({what}). Only load it if you trust its source; then re-save its state_dict "
            f"with torch.save(state_dict, ...) or convert it with `python -m crfrnn_deeplab.convert`."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation, ValueError, KeyError, IndexError) as e:
        # A truncated archive fails in whichever structure the cut lands: zip directory, pickle memo, storage.
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or another kind of file): {e}"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict (a checkpoint or a state dict)")
    return obj
