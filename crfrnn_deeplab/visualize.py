"""Pictures of predictions: a class palette and PNG panels ``image | network | network + CRF | ground truth``.

Used by ``train.py`` at each evaluation; the functions take plain tensors/arrays so they work for any model.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from crfrnn_deeplab.data import voc_colormap
from crfrnn_deeplab.files import atomic_write, blocking_parent
from crfrnn_deeplab.images import check_rgb_array, check_rgb_image

__all__ = ["palette", "colorize", "make_panel", "save_panel"]

_IGNORE_RGB = (255, 255, 255)


def palette(num_classes: int, *, ignore_index: int = 255) -> np.ndarray:
    """The PASCAL VOC colour map (uint8 [256, 3]) for class indices, with ``ignore_index`` (an index into its 256
    entries, 0..255) drawn white. ``num_classes`` is only checked: the map always has 256 entries.

    Raises:
        TypeError: ``num_classes`` or ``ignore_index`` is not an int.
        ValueError: ``num_classes`` outside 1..256, or ``ignore_index`` outside 0..255.
    """
    for name, value in (("num_classes", num_classes), ("ignore_index", ignore_index)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in 1..256, got {num_classes}")
    if not 0 <= ignore_index <= 255:  # a negative index would silently colour another entry
        raise ValueError(f"ignore_index must be in 0..255 (an entry of the 256-colour map), got {ignore_index}")
    colours = voc_colormap(256).astype(np.uint8).copy()
    colours[ignore_index] = _IGNORE_RGB
    return colours


def colorize(label: torch.Tensor | np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Class indices (Tensor/ndarray [H, W], any integer or bool dtype) to an RGB picture (uint8 [H, W, 3]).

    Indices address the palette's entries as Python indexes a sequence: ``0..N-1``, and ``-N..-1`` counting from
    its end (``-1`` is entry 255 of :func:`palette`, the ignore colour by default).

    Raises:
        TypeError: ``colours`` is not a uint8 [N, 3] array, or ``label`` is not an integer/bool tensor or array
            (a float mask would be truncated silently: round it first).
        ValueError: ``colours`` is empty, or an index lies outside ``-N..N-1`` (it would wrap onto another class's
            colour).
    """
    if not (isinstance(colours, np.ndarray) and colours.dtype == np.uint8 and colours.ndim == 2
            and colours.shape[1] == 3):
        raise TypeError(f"colours must be a uint8 [N, 3] palette (see palette()), got {_describe(colours)}")
    if len(colours) == 0:
        raise ValueError("colours is an empty palette: expected at least one colour")
    label = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_):
        raise TypeError(f"label must hold integer class indices, got dtype {label.dtype} (round and cast a float mask, "
                        "e.g. label.round().astype(np.int64))")
    label = label.astype(np.int64)
    if label.size:
        low, high = int(label.min()), int(label.max())
        if low < -len(colours) or high >= len(colours):
            raise ValueError(f"label holds indices in [{low}, {high}], outside the {len(colours)}-colour palette "
                             f"(-{len(colours)}..{len(colours) - 1})")
    return colours[label]


def _describe(x: object) -> str:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _as_rgb(image: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """Raw RGB 0-255 (Tensor [3, H, W], any real dtype, or uint8 ndarray [H, W, 3]), checked, to uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        image = check_rgb_image(image, name=name, dims=(3,)).detach().cpu()
        return image.float().to(torch.uint8).permute(1, 2, 0).numpy()  # truncated, as the picture always was
    return check_rgb_array(image, name=name)


def make_panel(
    rows: Sequence[Sequence[torch.Tensor | np.ndarray]],
    *,
    titles: Sequence[str],
    colours: np.ndarray,
    gap: int = 4,
) -> Image.Image:
    """One picture: a row per image, a column per entry, titles on top.

    Args:
        rows: per image, the raw RGB image (Tensor[3, H, W] in 0-255 or uint8 [H, W, 3]) followed by label
            maps (Tensor/ndarray [H, W] of class indices), e.g. ``(raw, network, network + CRF, ground truth)``.
        titles: one title per column.
        colours: the palette (see :func:`palette`).
        gap: white pixels between tiles.

    Returns:
        An RGB PIL image; every tile gets the cell of the largest one, at its top left.

    Raises:
        TypeError: an image or label map of a wrong type or dtype (see :func:`colorize`), ``gap`` not an int.
        ValueError: no rows, a row without one entry per title, an image that is not raw RGB 0-255 (a normalised
            network input, NaN), a label map that is not 2-D or holds an index outside the palette, a negative
            ``gap``.
    """
    if not rows:
        raise ValueError("make_panel needs at least one row")
    if not titles:
        raise ValueError("titles must name at least one column (the image)")
    for i, row in enumerate(rows):
        if len(row) != len(titles):
            raise ValueError(f"every row needs {len(titles)} entries (one per title, the image first); row {i} has "
                             f"{len(row)}")
    if isinstance(gap, bool) or not isinstance(gap, numbers.Integral):
        raise TypeError(f"gap must be an int, got {type(gap).__name__} {gap!r}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0 (white pixels between tiles), got {gap}")
    tiles = []
    for i, row in enumerate(rows):
        tiles.append([_as_rgb(row[0], name=f"row {i} image")])
        for j, label in enumerate(row[1:], start=1):
            tile = colorize(label, colours)
            if tile.ndim != 3:
                raise ValueError(f"row {i}, entry {j} ({titles[j]!r}): a label map must be [H, W], got shape "
                                 f"{tile.shape[:-1]}")
            tiles[-1].append(tile)
    cols = len(titles)
    tile_h = max(t.shape[0] for r in tiles for t in r)
    tile_w = max(t.shape[1] for r in tiles for t in r)
    header = 14
    canvas = Image.new("RGB", (cols * tile_w + (cols - 1) * gap, header + len(tiles) * (tile_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((j * (tile_w + gap) + 2, 1), title, fill=(0, 0, 0))
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (j * (tile_w + gap), header + i * (tile_h + gap)))
    return canvas


def save_panel(path: str | Path, rows: Sequence[Sequence[torch.Tensor | np.ndarray]], *, titles: Sequence[str],
               num_classes: int, ignore_index: int = 255) -> Path:
    """:func:`make_panel` written as a PNG (directories created), whole or not at all (:func:`atomic_write`).

    Raises:
        ValueError: ``path`` does not end in ``.png``, is a directory, or lies below a file; and what
            :func:`make_panel` and :func:`palette` raise.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"a panel is written as a PNG: its path must end in .png, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"panel path {str(path)!r} is a directory")
    parent = blocking_parent(path)
    if parent is not None:
        raise ValueError(f"cannot write the panel {str(path)!r}: {str(parent)!r} is not a directory")
    panel = make_panel(rows, titles=titles, colours=palette(num_classes, ignore_index=ignore_index))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        panel.save(f, format="PNG")
    return path
