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
    """Class indices (Tensor/ndarray [H, W]) to an RGB picture (uint8 [H, W, 3]); indices are taken modulo the
    palette's length."""
    label = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    return colours[label.astype(np.int64) % len(colours)]


def _as_rgb(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Raw RGB 0-255 (Tensor [3, H, W] or ndarray [H, W, 3]) to uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float()
        image = image.permute(1, 2, 0).numpy() if image.dim() == 3 and image.shape[0] == 3 else image.numpy()
    return np.clip(np.asarray(image), 0, 255).astype(np.uint8)


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
        ValueError: no rows, or a row without one entry per title.
    """
    if not rows:
        raise ValueError("make_panel needs at least one row")
    tiles = [[_as_rgb(row[0])] + [colorize(x, colours) for x in row[1:]] for row in rows]
    cols = len(tiles[0])
    if len(titles) != cols or any(len(r) != cols for r in tiles):
        raise ValueError(f"every row needs {len(titles)} entries (one per title)")
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
    """:func:`make_panel` written as a PNG (directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_panel(rows, titles=titles, colours=palette(num_classes, ignore_index=ignore_index)).save(path)
    return path
