"""Segment images with a trained checkpoint: ``python -m crfrnn_deeplab.predict``.

::

    python -m crfrnn_deeplab.predict --checkpoint runs/synthetic/stage2/best.pt photos/ extra.jpg --out predictions

For every input image ``OUT/<name>.png`` is written: a palette-mode ("P") PNG whose pixel values are class indices
and whose palette is the PASCAL VOC colour map, the size of the input. ``OUT/classes.json`` lists the class names
of the checkpoint. Options add ``overlays/<name>.png`` (the colours blended over the image), ``panels/<name>.png``
(image | network | network + CRF) and ``probabilities/<name>.npy`` (float16 ``[C, H, W]``).

Inputs are image files and directories; a directory contributes its ``.png``, ``.jpg``, ``.jpeg``, ``.bmp``,
``.tif`` and ``.tiff`` files (not those of its subdirectories), in name order. ``<name>`` is the file's stem; a stem
seen before gets a suffix (``_2``, ``_3``, ...). No input file is ever overwritten: the run refuses to start if an
output path is an input, and every output is written to a temporary file in its folder and renamed onto its name
(:func:`~crfrnn_deeplab.files.atomic_write`), so ``--overwrite`` replaces an existing output's directory entry
and never writes into the file a hard link or a symlink there points to, and an interrupted run leaves no
truncated output. An image that cannot be read (or is too small for the model) is reported on stderr and skipped;
the run goes on and exits with status 1. Exit status 2: bad arguments (a device this machine lacks included), a
missing, unreadable or non-finite checkpoint, a model of more classes than a palette PNG holds (256), no images
found, an output directory that cannot be created or written. SIGINT (Ctrl-C) and SIGTERM stop the run with one
line on stderr and status 130 or 143; the file being written is dropped with its temporary file, and every output
already written is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn
from tqdm import tqdm

from crfrnn_deeplab.weights import LoadReport, model_for_checkpoint
from crfrnn_deeplab.models.crfrnn import CRFRNN
from crfrnn_deeplab.data.io import DatasetError, read_image
from crfrnn_deeplab.files import atomic_write, blocking_parent
from crfrnn_deeplab.images import MAX_SCALE, check_scales
from crfrnn_deeplab.predict.api import (
    MAX_CRF_ITERATIONS,
    Prediction,
    check_crf_iterations,
    predict,
    resolve_device,
)
from crfrnn_deeplab.visualize import colorize, make_panel, palette

__all__ = ["IMAGE_SUFFIXES", "find_images", "output_names", "main"]

#: File name suffixes (lower case) taken from a directory.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_OVERLAY_ALPHA = 0.5  # weight of the class colours over the image
_MAX_LABEL_CLASSES = 256  # an 8-bit palette PNG holds the indices 0..255


class UsageError(ValueError):
    """Arguments the run cannot start with (exit status 2)."""


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``inputs``: files as given, directories' image files (non-recursive, sorted).

    Raises:
        UsageError: an input does not exist, or there is no image at all.
    """
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            try:
                images += sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            except OSError as e:
                raise UsageError(f"cannot list the input directory {str(item)!r}: {e.strerror or e}") from None
        elif item.is_file():
            images.append(item)
        elif not item.exists():
            raise UsageError(f"input {str(item)!r} does not exist")
        else:  # a FIFO, a socket, a device: reading it would block or fail obscurely
            raise UsageError(f"input {str(item)!r} is neither a file nor a directory")
    if not images:
        raise UsageError(f"no images found in {', '.join(map(str, inputs))} (looked for {', '.join(IMAGE_SUFFIXES)})")
    seen: set[Path] = set()
    unique = []  # a file named twice (or found through its directory too) is predicted once
    for p in images:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def output_names(images: Sequence[Path]) -> list[str]:
    """One output name per image: its stem, with ``_2``, ``_3``, ... for a stem seen before (case-insensitively)."""
    used: set[str] = set()
    names = []
    for p in images:
        name, k = p.stem, 2
        while name.lower() in used:
            name, k = f"{p.stem}_{k}", k + 1
        used.add(name.lower())
        names.append(name)
    return names


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.75,1, got {text!r}") from None
    try:
        return check_scales(scales)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (from {text!r})") from None


def _int(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _crf_iterations(text: str) -> int:
    try:
        return check_crf_iterations(_int(text, f"an integer in 0..{MAX_CRF_ITERATIONS}"), "--crf-iterations")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crfrnn_deeplab.predict",
        description="Segment images with a crfrnn_deeplab checkpoint and write palette PNG label maps.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                        help=f"image files, or directories whose {'/'.join(IMAGE_SUFFIXES)} files are read "
                        "(not recursively)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint written by train.py or convert")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that already exist (default: refuse to start)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda:0 (default: the accelerator if there is one, else cpu)")
    parser.add_argument("--no-crf", action="store_true", help="network only, even if the model has a CRF layer")
    parser.add_argument("--crf-iterations", type=_crf_iterations, default=None,
                        help=f"mean-field iterations, 0..{MAX_CRF_ITERATIONS} (default: the checkpoint's eval_iterations)")
    parser.add_argument("--scales", type=_parse_scales, default=(1.0,),
                        help=f"test-time input scales in (0, {MAX_SCALE:g}], comma-separated, e.g. 0.5,0.75,1 "
                        "(logits averaged; default 1)")
    parser.add_argument("--flip", action="store_true", help="also average the horizontally flipped image's logits")
    parser.add_argument("--overlay", action="store_true", help="write overlays/<name>.png: colours over the image")
    parser.add_argument("--panel", action="store_true", help="write panels/<name>.png: image | network | network + CRF")
    parser.add_argument("--probabilities", action="store_true",
                        help="write probabilities/<name>.npy: float16 [C, H, W] class probabilities")
    parser.add_argument("--batch-size", type=_positive_int, default=1,
                        help="images of equal size per forward pass (default 1)")
    return parser


def _outputs(out: Path, name: str, args: argparse.Namespace) -> dict[str, Path]:
    paths = {"labels": out / f"{name}.png"}
    if args.overlay:
        paths["overlay"] = out / "overlays" / f"{name}.png"
    if args.panel:
        paths["panel"] = out / "panels" / f"{name}.png"
    if args.probabilities:
        paths["probabilities"] = out / "probabilities" / f"{name}.npy"
    return paths


def _check_no_overwrite(images: Sequence[Path], outputs: Sequence[Path], *, overwrite: bool) -> None:
    """Refuses outputs that would replace an input image (always) or an existing file (unless ``overwrite``),
    before anything is written."""
    inputs = {p.resolve(): p for p in images}
    for path in outputs:
        if path.resolve() in inputs:
            raise UsageError(
                f"output {str(path)!r} would overwrite the input image {str(inputs[path.resolve()])!r}; "
                "choose another --out directory"
            )
    for path in outputs:
        parent = blocking_parent(path)
        if parent is not None:
            what = "a dangling symlink" if not parent.exists() else "a file"
            raise UsageError(f"output directory {str(parent)!r} is {what}")
        if path.is_dir():
            raise UsageError(f"output {str(path)!r} is a directory")
        if os.path.lexists(path) and not overwrite:  # a dangling symlink too: the name is taken
            raise UsageError(f"output {str(path)!r} already exists; pass --overwrite to replace existing outputs")


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_write(path) as f:
        image.save(f, format="PNG")


def _write(prediction: Prediction, image: np.ndarray, paths: dict[str, Path], colours: np.ndarray,
           titles: tuple[str, ...]) -> None:
    """Writes one image's outputs, each whole or not at all (:func:`atomic_write`)."""
    labels = prediction.labels.numpy().astype(np.uint8)
    png = Image.fromarray(labels)  # "L"; putpalette makes it "P" with the same index values
    png.putpalette(colours.reshape(-1).tolist())
    _save_png(png, paths["labels"])
    if "overlay" in paths:
        blend = (1 - _OVERLAY_ALPHA) * image + _OVERLAY_ALPHA * colorize(labels, colours)
        _save_png(Image.fromarray(blend.round().astype(np.uint8)), paths["overlay"])
    if "panel" in paths:
        row = [image, prediction.labels] if prediction.network_labels is None else [
            image, prediction.network_labels, prediction.labels]
        _save_png(make_panel([row], titles=titles[: len(row)], colours=colours), paths["panel"])
    if "probabilities" in paths:
        with atomic_write(paths["probabilities"]) as f:
            np.save(f, prediction.probabilities.numpy().astype(np.float16))


def _error(message: str) -> None:
    tqdm.write(f"error: {message}", file=sys.stderr)


def _plan(args: argparse.Namespace) -> tuple[list[Path], list[dict[str, Path]], nn.Module, LoadReport]:
    """Everything that can fail before a file is written: the images, their output paths (checked), the model.

    Raises:
        UsageError, CheckpointError, ConversionError (ValueErrors), FileNotFoundError.
    """
    if args.no_crf and args.crf_iterations is not None:
        raise UsageError("--crf-iterations has no effect with --no-crf")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
    images = find_images(args.inputs)
    names = output_names(images)
    outputs = [_outputs(args.out, name, args) for name in names]
    _check_no_overwrite(images, [args.out / "classes.json"] + [p for o in outputs for p in o.values()],
                        overwrite=args.overwrite)
    model, report = model_for_checkpoint(args.checkpoint)
    if args.crf_iterations is not None and not isinstance(model, CRFRNN):
        raise UsageError(f"--crf-iterations given but {args.checkpoint} holds a model without a CRF layer")
    if model.num_classes > _MAX_LABEL_CLASSES:
        raise UsageError(
            f"{args.checkpoint} holds a model of {model.num_classes} classes, but the label maps are 8-bit palette "
            f"PNGs, which hold class indices 0..{_MAX_LABEL_CLASSES - 1}"
        )
    model.to(device)
    return images, outputs, model, report


def _prepare_out(out: Path, outputs: Sequence[dict[str, Path]], classes: dict) -> None:
    """Creates ``out`` and its subfolders and writes ``out/classes.json``.

    Raises:
        OSError: a folder cannot be created or the file written (no permission, a read-only file system, ...).
    """
    out.mkdir(parents=True, exist_ok=True)
    for sub in {p.parent for o in outputs for p in o.values()}:
        sub.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "classes.json") as f:
        f.write((json.dumps(classes, indent=2) + "\n").encode("utf-8"))


class _Stopped(BaseException):
    """SIGTERM during the run, raised where the run is, so that :func:`atomic_write` removes the file it was
    writing (the default action would kill the process and leave that temporary file behind)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`_Stopped` while the block runs (only in the main thread, where handlers can be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise _Stopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 all written, 1 some images failed, 2 usage errors, an
    output directory that cannot be written included, 128 + N stopped by signal N: 130 SIGINT, 143 SIGTERM)."""
    args = build_parser().parse_args(argv)
    try:
        images, outputs, model, report = _plan(args)
    except (ValueError, FileNotFoundError) as e:  # UsageError, CheckpointError, ConversionError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2

    num_classes = model.num_classes
    colours = palette(num_classes)
    class_names = report.class_names
    try:
        _prepare_out(args.out, outputs, {
            "num_classes": num_classes,
            "class_names": list(class_names) if class_names is not None else None,
            "palette": colours[:num_classes].tolist(),
        })
    except OSError as e:
        print(f"error: cannot write into the output directory {str(args.out)!r}: {e}", file=sys.stderr)
        return 2

    options = dict(crf=not args.no_crf, crf_iterations=args.crf_iterations, scales=args.scales, flip=args.flip,
                   batch_size=args.batch_size)
    titles = ("image", "network", "network + CRF")
    written = failed = 0
    try:
        with _sigterm_raises(), tqdm(total=len(images), desc="predict", unit="img", dynamic_ncols=True) as bar:
            for start in range(0, len(images), args.batch_size):
                batch = []
                for path, paths in zip(images[start : start + args.batch_size],
                                       outputs[start : start + args.batch_size]):
                    try:
                        batch.append((path, paths, read_image(path)))
                        if batch[-1][2].max() <= 1:  # the models' own check of this warning names no file
                            tqdm.write(f"warning: {str(path)!r} has pixel values of at most 1 (of 0-255): a nearly "
                                       "black image, or a 0-1 float image (scale it to 0-255)", file=sys.stderr)
                    except (DatasetError, FileNotFoundError) as e:
                        _error(str(e))
                        failed += 1
                        bar.update()
                try:
                    predictions = predict(model, [image for _, _, image in batch], **options) if batch else []
                except ValueError:  # one image is unusable (e.g. too small): predict them one by one to name it
                    predictions = []
                    for path, _, image in batch:
                        try:
                            predictions.append(predict(model, image, **options)[0])
                        except ValueError as e:
                            _error(f"cannot segment {str(path)!r}: {e}")
                            predictions.append(None)
                for (path, paths, image), prediction in zip(batch, predictions):
                    if prediction is not None:
                        try:
                            _write(prediction, image, paths, colours, titles)
                            written += 1
                        except OSError as e:
                            _error(f"cannot write the outputs of {str(path)!r}: {e}")
                            failed += 1
                    else:
                        failed += 1
                    bar.update()
    except (KeyboardInterrupt, _Stopped) as e:
        signum = e.signum if isinstance(e, _Stopped) else signal.SIGINT
        print(f"\nstopped by {signal.Signals(signum).name} after {written} of {len(images)} images written "
              f"({failed} failed); every output file in {args.out} is complete, or as it was before the run "
              "(rerun with --overwrite to redo them)", file=sys.stderr)
        return 128 + signum
    print(f"{written} written, {failed} failed; outputs in {args.out}")
    return 1 if failed else 0
