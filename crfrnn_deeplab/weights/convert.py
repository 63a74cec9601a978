"""Checkpoint conversion: a checkpoint of any supported layout (:mod:`.layouts`) written as one of ours, which
records the model it needs and the input convention of its weights.

Run as ``python -m crfrnn_deeplab.weights.convert SRC DST [--layout L] [--num-classes N] [--msc | --no-msc]``.
The package does not import this module, so that ``python -m`` runs it fresh.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from crfrnn_deeplab.weights.checkpoint import model_entries, save_checkpoint
from crfrnn_deeplab.weights.factory import build_for_checkpoint
from crfrnn_deeplab.weights.layouts import LAYOUTS, convert_state_dict
from crfrnn_deeplab.weights.loading import LoadReport

__all__ = ["convert_checkpoint", "main"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_destination(dst: str | os.PathLike) -> None:
    """Refuses a destination that names a directory: one ending in a separator (``Path`` would drop it and write
    a file named like the directory) or in ``.`` / ``..`` (a directory even where it does not exist yet: the
    write would create its parents, then fail to rename onto it), or an existing directory."""
    text = os.fspath(dst)
    if isinstance(text, str) and text.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        raise ValueError(f"the destination {text} ends in a path separator, so it names a directory; give a file name")
    last = os.path.basename(text)
    if last in (".", "..", b".", b".."):
        raise ValueError(f"the destination {os.fsdecode(text)} ends in {os.fsdecode(last)!r}, so it names a "
                         "directory; give a file name")
    if os.path.isdir(text):
        raise ValueError(f"the destination is a directory ({text}); give a file name")


def _class_count(text: str) -> int:
    """``--num-classes``'s value: an int >= 1 (argparse reports the error with the option's name)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected the model's number of classes, an int >= 1, got {text!r}")
    return value


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    layout: str = "auto",
    num_classes: int | None = None,
    msc: bool | None = None,
) -> LoadReport:
    """Converts a checkpoint of any supported layout into our format (what the CLI runs).

    The written checkpoint holds :func:`~.checkpoint.model_entries` (the model's state dict, ``model_config``:
    builder name, number of classes, the options that rebuild the same architecture, CRF options;
    ``input_convention``; ``class_names``) and ``source``: the file, its SHA-256, layout, removed prefix, the
    checkpoint keys not used and the model keys left at their initial values (with the reasons).

    Returns:
        The :class:`~.loading.LoadReport` of loading ``src``.

    Raises:
        ValueError: ``dst`` is ``src`` (the source is never overwritten), ends in a path separator, ``.`` or
            ``..``, or is a directory; ``num_classes`` < 1.
        TypeError: ``num_classes`` is not an int or None.
        NotADirectoryError: a parent of ``dst`` is a file.
        ConversionError, CheckpointError, FileNotFoundError: see :func:`~.factory.model_for_checkpoint`.
    """
    _check_destination(dst)
    src, dst = Path(src), Path(dst)
    if os.path.realpath(dst) == os.path.realpath(src):  # realpath: no error on a symlink loop
        raise ValueError(f"the destination must differ from the source, got {dst} for both")
    converted = convert_state_dict(src, layout=layout)
    recipe, model, report = build_for_checkpoint(converted, num_classes=num_classes, msc=msc)
    payload = model_entries(
        model,
        name=recipe.name,
        num_classes=recipe.num_classes,
        options=recipe.options,
        crf=recipe.crf,
        class_names=report.class_names,
    )
    payload["source"] = {
        "path": str(src),
        "sha256": _sha256(src),
        "layout": report.layout,
        "removed_prefix": report.removed_prefix,
        "unused": dict(report.unexpected),
        "initialised": report.initialised,
    }
    save_checkpoint(dst, payload)
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m crfrnn_deeplab.weights.convert SRC DST [--layout L] [--num-classes N] [--msc | --no-msc]
    [--overwrite] [--debug]``.

    Exit status: 0 written; 2 the command cannot be carried out (SRC missing or not a convertible checkpoint,
    DST is SRC, DST exists (a symlink, dangling or not, included) without ``--overwrite``, DST names a directory
    (it is one, or ends in a separator, ``.`` or ``..``), DST's directory is not writable or lies below a file): one line
    ``error: ...`` on stderr, and nothing is written. ``--debug`` shows the traceback instead.
    """
    parser = argparse.ArgumentParser(
        prog="python -m crfrnn_deeplab.weights.convert",
        description="Convert a DeepLab / ResNet checkpoint (any supported layout) into a crfrnn_deeplab checkpoint "
        "that records its model options and input convention.",
    )
    parser.add_argument("src", type=Path, help="checkpoint to convert")
    parser.add_argument("dst", help="where to write the crfrnn_deeplab checkpoint (a file name)")
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="layout of SRC (default: detect)")
    parser.add_argument("--num-classes", type=_class_count, default=None, metavar="N",
                        help="classes of the model, >= 1 (default: SRC's)")
    parser.add_argument(
        "--msc", action=argparse.BooleanOptionalAction, default=None,
        help="multi-scale (MSC) model or not (default: as SRC was saved)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists (never SRC)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        _check_destination(args.dst)  # the raw text: Path("d/") would drop the separator
        dst = Path(args.dst)
        # lexists: a symlink at DST (even a dangling one) is an existing name that --overwrite would replace
        if os.path.lexists(dst) and os.path.realpath(dst) != os.path.realpath(args.src) and not args.overwrite:
            raise ValueError(f"the destination exists; pass --overwrite to replace it ({dst})")
        report = convert_checkpoint(args.src, args.dst, layout=args.layout, num_classes=args.num_classes, msc=args.msc)
    except (ValueError, OSError) as e:  # ConversionError and CheckpointError are ValueErrors; OSError: the paths
        if args.debug:
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f"error: {'; '.join(lines) or type(e).__name__}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
