"""Self-describing checkpoints: one typed payload, written atomically, read with ``weights_only=True``.

A checkpoint is a dict of plain containers and tensors only (so ``torch.load(weights_only=True)`` can read it
without executing code). Its keys are :class:`Checkpoint`: what describes the model (every checkpoint, built
by :func:`model_entries`), then the training state (``train.py``) or the provenance (the converter). Training,
the converter and prediction all read and write this one definition.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "ModelConfig",
    "load_checkpoint",
    "model_entries",
    "remove_stale_temporaries",
    "save_checkpoint",
]

FORMAT = "crfrnn_deeplab/1"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive (PyTorch >= 1.6)
_PICKLE_PROTO = b"\x80"  # the legacy format: a pickle, protocol >= 2
_TMP_SUFFIX = ".tmp"  # save_checkpoint writes ".<name>.<random>.tmp" next to <name>, then renames it


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of the expected kind."""


class ModelConfig(TypedDict):
    """How to rebuild the model: ``get_model(name, num_classes=..., **options)``, plus ``MeanFieldCRF(**crf)``
    on top when ``crf`` is not None."""

    name: str
    num_classes: int
    options: dict[str, Any]
    crf: dict[str, Any] | None


class Checkpoint(TypedDict, total=False):
    """The keys of a checkpoint file (``format`` is added by :func:`save_checkpoint`).

    Always present: ``model`` (the state dict: DeepLabV2 / MSC keys, or CRFRNN's ``network.*`` + ``crf.*``),
    ``model_config``, ``input_convention`` (``InputConvention.to_dict()``) and ``class_names``.
    Written by ``train.py``: ``stage``, ``step``, ``config`` (the resolved config), ``rng``, ``optimizer``,
    ``scheduler``, ``grad_scaler``, ``data`` (the data stream's position), ``best``, ``elapsed_s``, ``baseline``.
    Written by the converter: ``source`` (the file, its SHA-256, layout, unused keys, initialised keys).
    """

    format: str
    model: dict[str, torch.Tensor]
    model_config: ModelConfig
    input_convention: dict[str, Any]
    class_names: list[str] | None
    stage: int
    step: int
    config: dict[str, Any]
    rng: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    grad_scaler: dict[str, Any]
    data: dict[str, int]
    best: dict[str, Any]
    elapsed_s: float
    baseline: dict[str, Any]
    source: dict[str, Any]


def model_entries(
    model: nn.Module,
    *,
    name: str,
    num_classes: int,
    options: dict[str, Any],
    crf: dict[str, Any] | None,
    class_names: list[str] | None,
) -> Checkpoint:
    """The entries that describe ``model`` (a network, or a network + CRF model with ``network`` and ``crf``
    attributes): its state dict, how to rebuild it, its input convention and its class names."""
    network = model.network if isinstance(getattr(model, "crf", None), nn.Module) else model
    return Checkpoint(
        model=model.state_dict(),
        model_config=ModelConfig(name=name, num_classes=num_classes, options=dict(options), crf=crf),
        input_convention=network.input_convention.to_dict(),
        class_names=None if class_names is None else list(class_names),
    )


def save_checkpoint(path: str | os.PathLike, payload: Checkpoint | dict[str, Any]) -> Path:
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
            f"with torch.save(state_dict, ...) or convert it with `python -m crfrnn_deeplab.weights.convert`."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation, ValueError, KeyError, IndexError) as e:
        # A truncated archive fails in whichever structure the cut lands: zip directory, pickle memo, storage.
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or another kind of file): {_reason(e)}"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict (a checkpoint or a state dict)")
    return obj


def _reason(error: Exception) -> str:
    """The error's message; the unpickler's ``EOFError`` on a truncated legacy (pickle) file has none."""
    message = str(error).strip()
    if message:
        return message
    if isinstance(error, EOFError):
        return "the file ends before its data does (EOFError)"
    return type(error).__name__
