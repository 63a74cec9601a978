"""Reading images, label maps and list files, with errors that name the file.

Every reader returns plain numpy arrays (images ``uint8 [H, W, 3]`` RGB, label maps ``uint8 [H, W]`` or
``int64 [H, W]``) and raises :class:`DatasetError` (a ``ValueError``) or ``FileNotFoundError`` with the
offending path in the message. Nothing here keeps a file open after it returns, so datasets built on these
helpers pickle cleanly into ``DataLoader`` workers.
"""

from __future__ import annotations

import operator
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, UnidentifiedImageError

from crfrnn_deeplab.images import pil_to_rgb

__all__ = [
    "DatasetError",
    "as_index",
    "as_path",
    "require_dir",
    "require_file",
    "read_id_list",
    "read_image",
    "read_index_png",
    "read_sbd_mat",
    "check_same_size",
    "check_label_values",
    "check_files_exist",
    "check_one_file_each",
    "list_dir",
    "scan_image_label_pairs",
]

PathLike = str | os.PathLike

# The PIL modes of a label image of class indices, and the dtype read_index_png returns for each: palette
# indices, 1-bit (0/1) and 8-bit greyscale as uint8; 16-bit greyscale in either byte order (a 16-bit PNG opens
# as 'I;16', a big-endian TIFF as 'I;16B') and 32-bit integers as int64. scan_image_label_pairs accepts exactly
# these, so a label the loader reads never fails the scan before a run.
_LABEL_DTYPES: dict[str, type] = {
    "P": np.uint8, "1": np.uint8, "L": np.uint8, "I;16": np.int64, "I;16B": np.int64, "I;16L": np.int64, "I": np.int64,
}
_LABEL_MODES_TEXT = ", ".join(repr(mode) for mode in _LABEL_DTYPES)

# PIL decodes 2- and 4-bit greyscale samples scaled to 0..255 (as the PNG standard renders them: 3 of 3 is white);
# a label's stored sample is its class index, so read_index_png divides the scaling out again.
_LOW_BIT_GREY_SCALE = {"L;2": 85, "L;2R": 85, "L;4": 17, "L;4R": 17}

# File formats whose compression changes pixel values (near every edge, to neighbouring values): never a label.
# Pillow opens a camera's JPEG with a second image inside (a preview) as 'MPO'.
_LOSSY_FORMATS = ("JPEG", "MPO")
_LOSSY_TEXT = ("its lossy compression changes the values near every edge, mostly to other class indices that "
               "no check can tell from the true ones; save the label map as a PNG (lossless)")

# EXIF orientations that turn the stored pixels by 90 degrees (5-8: transpose, rotate 270, transverse, rotate 90)
_EXIF_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)

# What PIL raises for a file it cannot decode. DecompressionBombError (an image above twice
# Image.MAX_IMAGE_PIXELS) derives from Exception only, not from OSError or ValueError.
_DECODE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)


class DatasetError(ValueError):
    """A dataset on disk is malformed: corrupt file, size mismatch, bad label values, empty split."""


def as_path(path: object, what: str) -> Path:
    """``path`` as a ``Path``: the one conversion of a dataset's root or directory argument.

    Args:
        path: a ``str`` or ``os.PathLike``.
        what: what the path is, for the message (``"root"``, ``"VOC root"``).

    Raises:
        TypeError: ``path`` is neither a ``str`` nor an ``os.PathLike`` (e.g. an int, None or bytes).
        ValueError: ``path`` is empty: ``Path("")`` would silently be the current directory.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    if os.fspath(path) in ("", b""):
        raise ValueError(f"{what} must not be empty (it would mean the current directory), got {path!r}")
    return Path(path)


def as_index(index: object, what: str) -> int:
    """``index`` as an int: an integer of any type (numpy's, a one-element integer tensor), never a float (1.5,
    which numpy's seeding would refuse with a message about seeds) or a bool (``torch.tensor(True)`` included, which
    ``operator.index`` reads as 1). Raises TypeError naming ``what``."""
    try:
        if not isinstance(index, bool) and str(getattr(index, "dtype", "")) not in ("bool", "torch.bool"):
            return operator.index(index)
    except TypeError:
        pass
    raise TypeError(f"{what} must be an int, got {type(index).__name__} {index!r}")


def _require(path: PathLike, what: str, layout: str, *, directory: bool) -> Path:
    p = as_path(path, what)
    if not (p.is_dir() if directory else p.is_file()):
        kind = "a directory" if directory else "a file"
        state = f"is not {kind}" if p.exists() else "does not exist"
        raise FileNotFoundError(f"{what} {str(p)!r} {state}; expected layout:\n{layout}")
    return p


def require_dir(path: PathLike, what: str, layout: str) -> Path:
    """Return ``path`` as a ``Path`` if it is a directory, else raise naming it and the expected layout.

    Args:
        path: directory that must exist.
        what: what the directory is, for the message (``"VOC root"``).
        layout: the layout expected there, for the message.

    Raises:
        TypeError, ValueError: ``path`` is not a path, or is empty (see :func:`as_path`).
        FileNotFoundError: the directory does not exist (or is a file).
    """
    return _require(path, what, layout, directory=True)


def require_file(path: PathLike, what: str, layout: str) -> Path:
    """Return ``path`` as a ``Path`` if it is a regular file, else raise naming it and the expected layout.

    Raises:
        TypeError, ValueError: ``path`` is not a path, or is empty (see :func:`as_path`).
        FileNotFoundError: the file does not exist (or is a directory).
    """
    return _require(path, what, layout, directory=False)


def read_id_list(path: PathLike) -> list[str]:
    """Read a split file: one image id per line, each id once; blank lines and surrounding whitespace are ignored.

    The file is UTF-8 text; a byte-order mark at its start (what some Windows editors write) is skipped rather
    than becoming an invisible part of the first id.

    Args:
        path: the list file (e.g. ``ImageSets/Segmentation/train.txt``).

    Returns:
        The ids in file order.

    Raises:
        DatasetError: the file is not UTF-8 text, a line holds more than one token (e.g. ``"img.jpg
            label.png"`` pair lists), an id is listed more than once, or the file lists no ids at all.
    """
    ids, lines_of = [], {}
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"list file {str(path)!r} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset "
            f"{e.start}): expected one image id per line"
        ) from None
    for lineno, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        if len(line.split()) != 1:
            raise DatasetError(
                f"{str(path)!r} line {lineno}: expected one image id per line (a file name without its "
                f"extension, e.g. '2007_000032'), got {line!r}"
            )
        ids.append(line)
        lines_of.setdefault(line, []).append(lineno)
    if not ids:
        raise DatasetError(f"list file {str(path)!r} holds no image ids: the dataset would be empty")
    repeated = [(i, n) for i, n in lines_of.items() if len(n) > 1]
    if repeated:
        shown = ", ".join(f"{i!r} (lines {', '.join(map(str, n[:-1]))} and {n[-1]})" for i, n in repeated[:5])
        raise DatasetError(
            f"list file {str(path)!r} lists {len(repeated)} ids more than once: {shown}"
            f"{', ...' if len(repeated) > 5 else ''}; each sample would be read that many times (trained on more "
            "often, counted more than once in a score): list each id once"
        )
    return ids


def list_dir(directory: PathLike) -> list[str]:
    """The names in ``directory``, sorted, without hidden ones (``.*``): what an operating system leaves beside a
    dataset's files (macOS's ``._<name>`` AppleDouble copies and ``.DS_Store``, ``.ipynb_checkpoints``) is never one
    of its samples, and a ``._x.png`` would otherwise become a sample ``._x`` that fails to decode."""
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def check_one_file_each(ids: Sequence[str], files_by_id: dict[str, list[str]], what: str, directory: PathLike) -> None:
    """Raise where an id has more than one file (``x.jpg`` and ``x.png``, ``x.png`` and ``x.PNG``): reading one of
    them would be a silent choice.

    Raises:
        DatasetError: names the ids (up to five) with their files, and the directory.
    """
    ambiguous = [i for i in ids if len(files_by_id[i]) > 1]
    if ambiguous:
        shown = "; ".join(f"{i!r}: {' and '.join(files_by_id[i])}" for i in ambiguous[:5])
        raise DatasetError(
            f"which {what} to read is ambiguous for {len(ambiguous)} of {len(ids)} ids, each with more than one "
            f"{what} in {str(directory)!r} ({shown}{' ...' if len(ambiguous) > 5 else ''}); remove or move the others"
        )


def check_files_exist(paths: Sequence[Path], what: str) -> None:
    """Raise if any of ``paths`` is missing; one directory listing per parent instead of one stat per file.

    Raises:
        FileNotFoundError: names the number of missing files and the first few of them.
    """
    listings: dict[Path, set[str]] = {}
    missing = []
    for p in paths:
        names = listings.get(p.parent)
        if names is None:
            names = set(os.listdir(p.parent)) if p.parent.is_dir() else set()
            listings[p.parent] = names
        if p.name not in names:
            missing.append(p)
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} {what} are missing:\n  {shown}{more}")


def read_image(path: PathLike) -> np.ndarray:
    """Decode an image file to RGB.

    PIL is used (not ``cv2.imread``) because it reports truncated files instead of returning a partly grey
    image; its JPEG/PNG decoders are as fast as OpenCV's.

    Args:
        path: a JPEG, PNG or any other format PIL reads.

    Returns:
        ``uint8`` array ``[H, W, 3]`` in RGB order (greyscale, palette and RGBA inputs are converted; 16-bit
        greyscale is scaled to 0-255, see :func:`crfrnn_deeplab.images.pil_to_rgb`). The pixels come in the
        order they are stored: an EXIF orientation tag is **not** applied (a phone photo may come back rotated
        from how a viewer shows it), and the label mask is read the same way; for such a photo, apply
        ``PIL.ImageOps.exif_transpose`` to the image, and the same rotation to its mask, before adding them to a
        dataset.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: the file exists but cannot be decoded (corrupt, truncated, not an image, or more pixels
            than PIL's decompression-bomb limit, ``Image.MAX_IMAGE_PIXELS``).
    """
    try:
        with _open_image(path) as im:
            arr = pil_to_rgb(im, name=str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {str(path)!r} does not exist") from None
    except _DECODE_ERRORS as e:
        raise DatasetError(f"cannot decode image {str(path)!r}: {e}") from e
    return arr


def read_index_png(path: PathLike, *, palette: np.ndarray | None = None, palette_name: str = "expected") -> np.ndarray:
    """Read a label PNG whose pixel values are class indices.

    Palette (mode ``"P"``) images are read as their palette *indices*, not their colours, which is what the
    VOC ``SegmentationClass`` PNGs hold. Greyscale 8-bit and 16-bit images (either byte order) and 32-bit
    integer ones are read as-is, 1-bit ones as 0/1, and 2- and 4-bit ones as their stored values too (0..3,
    0..15; PIL would scale them to 0..255, making the highest value 255, the ignore label).

    Args:
        path: a palette, 1-, 2-, 4-, 8- or 16-bit greyscale PNG (or another lossless format PIL reads, e.g. TIFF).
        palette: ``uint8 [K, 3]``, the colour of each class index in the dataset's own palette (VOC's): a palette
            image whose used index ``i`` has the colour that this palette gives another index ``j`` is refused.
            That is what saving a colour mask as a palette image by quantising it makes (``Image.quantize``,
            ``convert("P", palette=Image.ADAPTIVE)``): the class colours, renumbered in order of appearance.
            A used index whose colour is its own, or no colour of this palette (e.g. a grey palette), passes.
        palette_name: the palette's name, for the message (``"VOC"``).

    Returns:
        ``uint8 [H, W]`` for palette, 1- to 8-bit images, ``int64 [H, W]`` for 16- and 32-bit ones.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: it cannot be decoded, it is a colour (RGB/RGBA) image, whose values are colours and not
            class indices, it is a JPEG (lossy: its values near edges are not the ones saved), or its palette
            renumbers ``palette``'s colours.
    """
    try:
        with _open_image(path) as im:
            mode, lossy = im.mode, im.format in _LOSSY_FORMATS
            dtype = None if lossy else _LABEL_DTYPES.get(mode)
            arr = None
            if dtype is not None:
                scale = _LOW_BIT_GREY_SCALE.get(_rawmode(im)) if mode == "L" else None
                arr = np.asarray(im).astype(dtype, copy=False)  # 1-bit: bool to 0 / 1
                if scale is not None:
                    arr = arr // scale
            file_palette = im.getpalette("RGB") if mode == "P" and palette is not None else None
    except FileNotFoundError:
        raise FileNotFoundError(f"label file {str(path)!r} does not exist") from None
    except _DECODE_ERRORS as e:
        raise DatasetError(f"cannot decode label image {str(path)!r}: {e}") from e
    if lossy:
        raise DatasetError(f"label image {str(path)!r} is a JPEG file: {_LOSSY_TEXT}")
    if arr is None:
        raise DatasetError(
            f"label image {str(path)!r} has mode {mode!r}; expected a palette or greyscale image whose values are "
            f"class indices (one of the modes {_LABEL_MODES_TEXT}); a colour-coded mask must be converted to "
            "indices first"
        )
    if file_palette is not None:
        _check_palette(arr, np.asarray(file_palette, dtype=np.uint8).reshape(-1, 3), palette, palette_name, path)
    return arr


def _rawmode(im: Image.Image) -> str | None:
    """How the file stores its samples (e.g. ``"L;4"``: 4-bit greyscale), from the first tile of an unread image."""
    if not im.tile:
        return None
    args = im.tile[0].args
    return args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None


def _check_palette(label: np.ndarray, colours: np.ndarray, expected: np.ndarray, name: str, path: PathLike) -> None:
    """Raise if a used index of ``label`` has, in the file's palette ``colours``, the colour that ``expected`` gives
    another index: the file's indices are then positions in a renumbered colour table, not class indices."""
    index_of = {tuple(c): j for j, c in enumerate(np.asarray(expected, dtype=np.uint8).tolist())}
    for i in np.flatnonzero(np.bincount(label.ravel(), minlength=256)[: len(colours)]).tolist():
        j = index_of.get(tuple(colours[i].tolist()))
        if j is not None and j != i:
            raise DatasetError(
                f"label image {str(path)!r} is a palette image whose index {i} has the {name} colour of class {j} "
                f"{tuple(colours[i].tolist())}: its indices are not class indices but positions in a renumbered "
                "colour table (as quantising a colour mask to a palette image makes them); convert the colours to "
                "class indices, or save the index map with the palette it was drawn in"
            )


def read_sbd_mat(path: PathLike) -> np.ndarray:
    """Read the class segmentation of one SBD (Hariharan et al. 2011) ``cls/*.mat`` file.

    The file holds a MATLAB struct ``GTcls`` with fields ``Segmentation`` (``uint8 [H, W]``, values 0-20),
    ``Boundaries`` and ``CategoriesPresent``; only ``Segmentation`` is returned.

    Returns:
        ``uint8 [H, W]`` class indices.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: it is not a MATLAB file or lacks ``GTcls.Segmentation``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SBD label file {str(path)!r} does not exist")
    try:
        mat = scipy.io.loadmat(path, variable_names=["GTcls"], squeeze_me=True, struct_as_record=False)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        raise DatasetError(f"cannot read SBD label file {str(path)!r} as a MATLAB file: {e}") from e
    gt = mat.get("GTcls")
    seg = getattr(gt, "Segmentation", None)
    if seg is None:
        raise DatasetError(
            f"SBD label file {str(path)!r} has no struct 'GTcls' with field 'Segmentation' "
            f"(variables found: {sorted(k for k in mat if not k.startswith('__'))})"
        )
    seg = np.asarray(seg)
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        raise DatasetError(
            f"SBD label file {str(path)!r}: GTcls.Segmentation should be a 2-D integer array, "
            f"got shape {seg.shape} dtype {seg.dtype}"
        )
    if seg.dtype != np.uint8:
        if seg.min() < 0 or seg.max() > 255:
            raise DatasetError(f"SBD label file {str(path)!r}: values outside 0-255 in GTcls.Segmentation")
        seg = seg.astype(np.uint8)
    return np.ascontiguousarray(seg)


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: PathLike, label_path: PathLike) -> None:
    """Raise if the image and its label map differ in height or width.

    Raises:
        DatasetError: names both files and both sizes (as H x W), and an EXIF orientation of the image that turns it
            to the label's size (the label was then drawn on the turned view).
    """
    if image.shape[:2] != label.shape[:2]:
        raise _size_mismatch(image_path, image.shape[:2], label_path, label.shape[:2])


def _size_mismatch(
    image_path: PathLike, image_size: tuple[int, int], label_path: PathLike, label_size: tuple[int, int]
) -> DatasetError:
    """The error for an image and label of different (H, W) sizes; where the label has the image's size turned by
    90 degrees and the image's EXIF tag turns it so, it says that the label follows the turned view."""
    (ih, iw), (lh, lw) = image_size, label_size
    message = (f"size mismatch: image {str(image_path)!r} is {ih}x{iw} (HxW) but its label {str(label_path)!r} "
               f"is {lh}x{lw}")
    orientation = _exif_orientation(image_path) if (lh, lw) == (iw, ih) else None
    if orientation in _QUARTER_TURNS:
        message += (
            f"; the image has EXIF orientation {orientation} (a viewer shows it turned by 90 degrees) and the label "
            "seems drawn on that view: images are read as stored, without applying the tag, so apply "
            "PIL.ImageOps.exif_transpose to the image and save it (or turn the label back to the stored pixels)"
        )
    return DatasetError(message)


def _exif_orientation(path: PathLike) -> int | None:
    """The EXIF orientation tag of an image file (1-8), or None where it has none or cannot be read."""
    try:
        with _open_image(path) as im:
            return im.getexif().get(_EXIF_ORIENTATION)
    except (FileNotFoundError, DatasetError, *_DECODE_ERRORS):
        return None


def check_label_values(label: np.ndarray, num_classes: int, ignore_index: int, path: PathLike) -> None:
    """Raise if ``label`` holds a value that is neither a class index (``0..num_classes-1``) nor ``ignore_index``.

    Costs one vectorised pass (a ``bincount`` for ``uint8`` maps), a fraction of a millisecond at 500x375.

    Raises:
        DatasetError: names the file and the offending values.
    """
    if label.dtype == np.uint8:
        counts = np.bincount(label.ravel(), minlength=256)
        counts[:num_classes] = 0
        if 0 <= ignore_index < 256:
            counts[ignore_index] = 0
        bad: list[int] = np.flatnonzero(counts).tolist()
    else:
        mask = (label < 0) | (label >= num_classes)
        mask &= label != ignore_index
        bad = np.unique(label[mask]).tolist() if mask.any() else []
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise DatasetError(
            f"label file {str(path)!r} holds values [{shown}] outside the class range 0..{num_classes - 1} "
            f"that are not the ignore value {ignore_index}"
        )


def _open_image(path: PathLike) -> Image.Image:
    """``Image.open(path)`` for a regular file (following links); anything else would block (a FIFO) or fail
    obscurely (a directory, a device): DatasetError. FileNotFoundError where nothing is there."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as e:
        raise DatasetError(f"{str(path)!r} cannot be read: {e}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise DatasetError(f"{str(path)!r} is {kind}, not an image file")
    return Image.open(path)


def _header(path: str, what: str) -> tuple[tuple[int, int], str, str | None]:
    """``((width, height), mode, format)`` from the file's header, without decoding its pixels."""
    try:
        with _open_image(path) as im:
            return im.size, im.mode, im.format
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from None
    except _DECODE_ERRORS as e:
        raise DatasetError(f"{what} {path!r} is not a readable image: {e}") from None


def scan_image_label_pairs(images: Sequence[PathLike], labels: Sequence[PathLike]) -> None:
    """A fast check of a split's files before a long run: every image and label opens as an image (the
    header only: no pixel is decoded), the label has its image's size, and each label has a mode that
    :func:`read_index_png` reads (palette or greyscale) in a lossless format (not JPEG).
    SBD ``.mat`` labels are only checked to exist. Decoding errors past the header, and label values, are
    left to :meth:`~crfrnn_deeplab.data.base.SegmentationDataset.verify`.

    Raises:
        FileNotFoundError: a listed file is missing (named).
        DatasetError: a file that is not an image, a size mismatch, or a label that :func:`read_index_png`
            refuses by its header: of a colour mode (e.g. RGB), or a JPEG (both files named).
    """
    for image_path, label_path in zip(images, labels, strict=True):
        image_path, label_path = str(image_path), str(label_path)
        (iw, ih), _, _ = _header(image_path, "image")
        if label_path.endswith(".mat"):
            if not Path(label_path).is_file():
                raise FileNotFoundError(f"label {label_path!r} does not exist")
            continue
        (lw, lh), mode, file_format = _header(label_path, "label")
        if file_format in _LOSSY_FORMATS:
            raise DatasetError(f"label {label_path!r} is a JPEG file: {_LOSSY_TEXT}")
        if mode not in _LABEL_DTYPES:
            raise DatasetError(f"label {label_path!r} is a {mode!r} image; expected a palette or greyscale image of "
                               f"class indices (one of the modes {_LABEL_MODES_TEXT})")
        if (iw, ih) != (lw, lh):
            raise _size_mismatch(image_path, (ih, iw), label_path, (lh, lw))

