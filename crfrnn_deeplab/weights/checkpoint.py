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
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from crfrnn_deeplab.files import atomic_write, blocking_parent

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "ModelConfig",
    "check_model_entries",
    "load_checkpoint",
    "model_entries",
    "remove_stale_temporaries",
    "save_checkpoint",
]

FORMAT = "crfrnn_deeplab/1"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive (PyTorch >= 1.6)
_PICKLE_PROTO = b"\x80"  # the legacy format: a pickle, protocol >= 2
_TMP_SUFFIX = ".tmp"  # atomic_write (save_checkpoint's writer) writes ".<name>.<random>.tmp", then renames it


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
    """Writes ``payload`` to ``path`` whole, with :func:`~crfrnn_deeplab.files.atomic_write`: a temporary file
    in the same directory (created with the usual permissions, 0o666 less the umask), fsync, rename.

    A crash or a kill during the write leaves any previous file at ``path`` intact; a symlink at ``path`` is
    replaced, its target left as it was. Missing parent directories are created.

    Returns:
        The path written.

    Raises:
        NotADirectoryError: a parent of ``path`` is a file (or another non-directory).
    """
    path = Path(path)
    if (blocking := blocking_parent(path)) is not None:
        raise NotADirectoryError(f"cannot write {path}: {blocking} is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, **payload}
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


def remove_stale_temporaries(directory: str | os.PathLike, *, suffix: str = ".pt") -> None:
    """Deletes the temporary files that killed :func:`save_checkpoint` calls left in ``directory`` for
    checkpoints named ``*<suffix>`` (the checkpoints themselves are intact)."""
    for tmp in Path(directory).glob(f".*{suffix}.*{_TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint (ours or any plain state dict) with ``weights_only=True``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: ``path`` is a directory or another non-regular file; the file is truncated or corrupt
            (a CRC-32 mismatch included), not a PyTorch file, needs arbitrary code execution (pickled classes) to
            load, or holds something other than a dict — the message says which and names the file.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():  # a directory, a FIFO (whose read would block), a device
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise CheckpointError(f"{path} is {kind}, not a checkpoint file")
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with path.open("rb") as f:
        head = f.read(4)
    if not head.startswith(_ZIP_MAGIC) and not head.startswith(_PICKLE_PROTO):
        # Anything else would reach the unpickler and fail with a misleading message (or a bare KeyError).
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: torch.save writes a zip archive (or, before PyTorch 1.6, "
            f"a pickle), this file starts with {head!r}"
        )
    if head.startswith(_ZIP_MAGIC):
        _check_crcs(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} cannot be loaded with weights_only=True: it contains pickled Python objects beyond tensors "
            f"and plain containers ({_refused_object(e)}; nothing in it was run). Only if you trust its source: "
            f"load it with torch.load(..., weights_only=False) and re-save its tensors alone, "
            f"torch.save(state_dict, ...); every reader here, the converter included, reads that file."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation, ValueError, KeyError, IndexError,
            OSError) as e:
        # A truncated or damaged archive fails in whichever structure the cut lands: zip directory, pickle memo,
        # storage; a zip directory that points past the end makes torch's reader seek there (OSError EINVAL).
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt, or another kind of file): "
            f"{_reason(e)}"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict (a checkpoint or a state dict)")
    return obj


def _check_crcs(path: Path) -> None:
    """Raises CheckpointError when a member of the zip archive does not match its CRC-32: ``torch.load`` does not
    check them, so flipped bits in a tensor's data would load as different weights without a word. (torch.save
    stores the members uncompressed: the check reads the file once more, ~0.2 s for a DeepLab v2 ResNet-101.)
    A damaged directory is left to ``torch.load``, whose error names the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: its member {bad!r} does not match its CRC-32 checksum (the "
                              "file was damaged after it was written); use another copy")


def _refused_object(error: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, from its message: the global (``"it pickles the global
    posix.system, which weights_only loading does not allow"``), else the line that says what went wrong."""
    message = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", message)  # "Unsupported global: GLOBAL x" / "unsupported GLOBAL x whose ..."
    if found:
        return f"it pickles the global {found[1]}, which weights_only loading does not allow"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                                    "(1)", "(2)"))]
    return (informative or lines or [type(error).__name__])[0][:200]


def _reason(error: Exception) -> str:
    """The error's message; the unpickler's ``EOFError`` on a truncated legacy (pickle) file has none."""
    message = str(error).strip()
    if message:
        return message
    if isinstance(error, EOFError):
        return "the file ends before its data does (EOFError)"
    return type(error).__name__


def check_model_entries(entries: Mapping[str, Any], where: str, *, classes: int | None) -> None:
    """Checks the entries of one of our checkpoints that say which model it holds (``model_config``,
    ``class_names``; hand-edited files get them wrong), so that nothing downstream guesses or casts.

    Args:
        entries: the checkpoint's entries besides its state dict.
        where: the file (or ``"<in-memory checkpoint>"``), for the messages.
        classes: the number of classes of the state dict's classifier (or CRF), ``None`` if it has neither.

    Raises:
        CheckpointError: naming the file and the entry: ``model_config`` not a dict, or with an unknown key, a
            ``name`` that is not a string, a ``num_classes`` that is not an int >= 1 or differs from the state
            dict's classes, ``options`` / ``crf`` neither None nor a dict with string keys;
            ``class_names`` not a list of strings, one per class.
    """
    config = entries.get("model_config")
    if config is not None:
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{where}: model_config must be a dict, got {type(config).__name__} {config!r:.80}")
        unknown = sorted(map(str, set(config) - set(ModelConfig.__annotations__)))
        if unknown:
            raise CheckpointError(f"{where}: unknown model_config key(s) {unknown}; expected name, num_classes, "
                                  "options, crf")
        if not isinstance(config.get("name"), str):
            raise CheckpointError(f"{where}: model_config.name must be a registered model name (a string), got "
                                  f"{config.get('name')!r:.80}")
        recorded = config.get("num_classes")
        if not _is_positive_int(recorded):
            raise CheckpointError(f"{where}: model_config.num_classes must be an int >= 1, got {recorded!r:.80}")
        if classes is not None and recorded != classes:
            raise CheckpointError(f"{where}: model_config.num_classes is {recorded} but the weights are for "
                                  f"{classes} classes")
        classes = recorded
        for key in ("options", "crf"):  # None: no options / no CRF
            value = config.get(key)
            if value is not None and (not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value)):
                raise CheckpointError(f"{where}: model_config.{key} must be a dict of keyword options (or None), "
                                      f"got {value!r:.80}")
    names = entries.get("class_names")
    if names is not None:
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"{where}: class_names must be a list of strings, got {names!r:.80}")
        if classes is not None and len(names) != classes:
            counted = f"model_config.num_classes is {classes}" if config is not None else f"the weights have {classes}"
            raise CheckpointError(f"{where}: class_names lists {len(names)} name(s) but {counted} classes")


def _is_positive_int(value: Any) -> bool:
    """A number of classes: an int (not a bool) >= 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
