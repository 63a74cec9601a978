"""An embedded synthetic segmentation dataset, generated on the fly, deterministic by seed.

It is the default data of ``train.py``, so that training runs on a fresh machine with no download, and it is
built to give a dense CRF real work: objects with **thin parts** (bars, rings, star spikes, cross limbs,
stems a few pixels wide) and **sharp boundaries** where the object colour changes abruptly, over smoothly
varying textured backgrounds. A network with output stride 8 cannot place these boundaries from its 1/8
resolution scores; a colour-aware CRF can, because every label edge is also a colour edge.

Each image (reference size 161x161; any size works, e.g. 321x321) holds 4-8 objects of the 5 classes below,
drawn in random order so that later ones occlude earlier ones, without anti-aliasing (so the label and the
colour change on exactly the same pixel). Lengths scale with ``min(H, W) / 161``, thicknesses too (at least
1 px):

====  ==========  =====================================================================================
 id    class       shape (at 161 px)
====  ==========  =====================================================================================
 0     background  smooth colour field (4x4 control colours, bicubic) + oriented stripes or soft blotches
 1     bar         1-3 straight bars, 2-4 px thick, 45-120 px long
 2     ring        an annulus of radius 12-32 px, 2-5 px thick
 3     star        a 4-8 pointed star of radius 16-38 px, spikes 2-8 px wide at their base
 4     cross       2-4 limbs of width 3-6 px from a common centre, each 18-45 px long
 5     leaf        a filled ellipse (semi-axes 7-22 px) with a stem 2 px thick, 12-30 px long
====  ==========  =====================================================================================

Colours: each object gets one colour, drawn around its class's mean colour with a per-channel standard
deviation of 50 (0-255 units), so the class colour distributions overlap (colour alone does not tell the
class: a nearest-class-mean colour classifier labels about 70 % of object pixels correctly) while the object
is kept at least 70 (RGB distance) away from the background colour under its centre, so that its boundary is a
colour edge. A smooth illumination field (+-12 %) and pixel noise (triangular, std 3-10) are applied to the
whole image.

Stated properties, checked by the tests over the first 50 training images of seeds 0-1 at 161x161 (measured
values in brackets):

- class frequencies: background 80-95 % of pixels [88-89 %]; every object class 0.8-6 % [1.4-2.9 %], and
  present in at least 40 % of the images [64-80 %];
- thin parts: at least 25 % of the object pixels lie in parts under 5 px wide, i.e. are removed by a 5x5
  morphological opening of their class mask [41 %; bars 62 %, rings 50 %, stars 42 %, crosses 33 %, leaves 11 %];
- the boundaries are colour edges: at least 90 % of the pixel pairs across a label boundary differ by more
  than 40 in RGB distance [99.6 %], and the median jump across a boundary is at least 4x the median jump
  between neighbours of the same label [138 vs 12-14];
- the CRF has work to do: labels downsampled 8x (nearest) and upsampled back (nearest), a stand-in for
  predictions made at output stride 8, are wrong on at least 30 % of the pixels within 3 px of a label
  boundary [42.5 %; 43 % at 321x321] (and on about 12 % of all pixels at 161x161, 8 % at 321x321);
- colour alone is ambiguous: a nearest-class-mean colour classifier gets 50-85 % of object pixels right [69-73 %].

Determinism: image ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, s_code, i])``, so any
index is reproducible on its own (in any worker, in any order), and train (code 0) and val (code 1) come from
disjoint seed streams: they never share an image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from crfrnn_deeplab.data.base import SegmentationDataset, Transform
from crfrnn_deeplab.data.io import as_index

__all__ = ["SYNTHETIC_CLASSES", "SyntheticSegmentation", "render_synthetic"]

#: Class names of the synthetic dataset, in label order.
SYNTHETIC_CLASSES: tuple[str, ...] = ("background", "bar", "ring", "star", "cross", "leaf")

_CLASS_MEAN_RGB = np.array(
    [[0, 0, 0], [190, 80, 70], [80, 160, 90], [190, 170, 70], [80, 100, 180], [160, 90, 170]], dtype=np.float32
)
_COLOUR_STD = 50.0
_MIN_CONTRAST = 70.0
_REFERENCE_SIZE = 161.0
_SPLIT_CODES = {"train": 0, "val": 1}


def _is_int(value: object) -> bool:
    """An integer of any type (numpy's, a 0-d tensor's too), not a bool: a float size such as 40.7 is refused, not
    truncated (:func:`~crfrnn_deeplab.data.io.as_index`)."""
    try:
        as_index(value, "")
    except TypeError:
        return False
    return True


def _image_size(size: object) -> tuple[int, int]:
    """``size`` (one int for a square, or ``(height, width)``) as two ints.

    Raises:
        TypeError: not an int or a pair of ints (a float, a bool, a string, three sides, ...).
    """
    sides = size.tolist() if hasattr(size, "tolist") and getattr(size, "ndim", 0) else size  # an array or tensor
    if _is_int(sides):
        sides = (sides, sides)
    if (isinstance(sides, (str, bytes)) or not isinstance(sides, Sequence) or len(sides) != 2
            or not all(_is_int(side) for side in sides)):
        raise TypeError(f"size must be an int or a (height, width) pair of ints, got {type(size).__name__} {size!r}")
    return int(sides[0]), int(sides[1])


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour field plus a texture, float32 [H, W, 3] in 0-255."""
    base = rng.uniform(50, 205, size=3)
    grid = (base + rng.normal(0, 30, size=(4, 4, 3))).astype(np.float32)
    # bicubic to 1/8 size, then bilinear: as smooth as a full-size bicubic resize, ten times cheaper
    small = cv2.resize(grid, (max(4, w // 8), max(4, h // 8)), interpolation=cv2.INTER_CUBIC)
    field = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    amplitude = rng.uniform(8, 20)
    if rng.random() < 0.5:  # oriented stripes
        period = rng.uniform(6, 20) * min(h, w) / _REFERENCE_SIZE
        angle = rng.uniform(0, math.pi)
        phase = rng.uniform(0, 2 * math.pi)
        ky, kx = 2 * math.pi / period * math.sin(angle), 2 * math.pi / period * math.cos(angle)
        yy = np.arange(h, dtype=np.float32)[:, None] * np.float32(ky)
        xx = np.arange(w, dtype=np.float32)[None, :] * np.float32(kx)
        texture = np.sin(yy + xx + np.float32(phase)) * np.float32(amplitude)
    else:  # soft blotches: coarse noise upsampled
        cells = max(2, round(min(h, w) / 10))
        coarse = rng.standard_normal((cells, cells), dtype=np.float32) * np.float32(amplitude)
        texture = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    field += texture[:, :, None] * tint
    return field


def _draw_object(inst: np.ndarray, value: int, cls: int, rng: np.random.Generator, scale: float) -> tuple[int, int]:
    """Rasterise one object of class ``cls`` into ``inst`` with ``value`` (no anti-aliasing); return its centre."""
    h, w = inst.shape
    cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))

    def px(lo: float, hi: float) -> int:  # a length drawn at the reference size, scaled
        return max(1, round(rng.uniform(lo, hi) * scale))

    def thick(lo: int, hi: int) -> int:  # a thickness in [lo, hi] px at the reference size, scaled
        return max(1, round(int(rng.integers(lo, hi + 1)) * scale))

    if cls == 1:  # bars
        for _ in range(int(rng.integers(1, 4))):
            length, angle = px(45, 120), rng.uniform(0, math.pi)
            ox, oy = cx + rng.normal(0, 10 * scale), cy + rng.normal(0, 10 * scale)
            dx, dy = 0.5 * length * math.cos(angle), 0.5 * length * math.sin(angle)
            p0, p1 = (round(ox - dx), round(oy - dy)), (round(ox + dx), round(oy + dy))
            cv2.line(inst, p0, p1, value, thickness=thick(2, 4), lineType=cv2.LINE_8)
    elif cls == 2:  # ring
        cv2.circle(inst, (cx, cy), px(12, 32), value, thickness=thick(2, 5), lineType=cv2.LINE_8)
    elif cls == 3:  # star
        n = int(rng.integers(4, 9))
        outer = px(16, 38)
        inner = max(1.0, outer * rng.uniform(0.12, 0.3))
        start = rng.uniform(0, 2 * math.pi)
        angles = start + np.arange(2 * n) * (math.pi / n)
        radii = np.where(np.arange(2 * n) % 2 == 0, outer, inner)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(inst, [np.round(pts).astype(np.int32)], value, lineType=cv2.LINE_8)
    elif cls == 4:  # cross: limbs from a common centre
        n = int(rng.integers(2, 5))
        start = rng.uniform(0, 2 * math.pi)
        width = thick(3, 6)
        for k in range(n):
            angle = start + k * 2 * math.pi / n + rng.normal(0, 0.15)
            length = px(18, 45)
            end = (round(cx + length * math.cos(angle)), round(cy + length * math.sin(angle)))
            cv2.line(inst, (cx, cy), end, value, thickness=width, lineType=cv2.LINE_8)
    elif cls == 5:  # leaf: ellipse + stem
        a, b = px(10, 22), px(7, 14)
        angle = rng.uniform(0, 180)
        cv2.ellipse(inst, (cx, cy), (a, b), angle, 0, 360, value, thickness=-1, lineType=cv2.LINE_8)
        t = math.radians(angle)
        stem = px(12, 30)
        p0 = (round(cx + a * math.cos(t)), round(cy + a * math.sin(t)))
        p1 = (round(cx + (a + stem) * math.cos(t)), round(cy + (a + stem) * math.sin(t)))
        cv2.line(inst, p0, p1, value, thickness=max(1, round(2 * scale)), lineType=cv2.LINE_8)
    else:
        raise AssertionError(f"unknown synthetic class {cls}")
    return cx, cy


def render_synthetic(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic image and its label map from ``rng``.

    Args:
        rng: the image's own generator (see the module docstring for how the dataset seeds it).
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        ``(image, label)``: ``uint8 [H, W, 3]`` RGB and ``uint8 [H, W]`` with values in ``0..5``.

    Raises:
        TypeError: ``height`` or ``width`` is not an int.
        ValueError: ``height`` or ``width`` is below 1.
    """
    for name, side in (("height", height), ("width", width)):
        if not _is_int(side):
            raise TypeError(f"{name} must be an int (pixels), got {type(side).__name__} {side!r}")
        if side < 1:
            raise ValueError(f"{name} must be at least 1 pixel, got {side}")
    height, width = int(height), int(width)
    scale = min(height, width) / _REFERENCE_SIZE
    background = _background(rng, height, width)
    n_objects = int(rng.integers(4, 9))
    inst = np.zeros((height, width), dtype=np.uint8)
    classes = np.zeros(n_objects + 1, dtype=np.uint8)
    colours = np.zeros((n_objects + 1, 3), dtype=np.float32)
    for k in range(1, n_objects + 1):
        cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        cx, cy = _draw_object(inst, k, cls, rng, scale)
        under = background[cy, cx]
        for _ in range(8):  # keep the object's colour away from the background it sits on
            colour = np.clip(_CLASS_MEAN_RGB[cls] + rng.normal(0, _COLOUR_STD, size=3), 0, 255)
            if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
                break
        else:  # push it away along the difference (or along grey when they coincide)
            d = colour - under
            norm = float(np.linalg.norm(d))
            d = d / norm if norm > 1e-3 else np.where(under > 127, -1.0, 1.0) / math.sqrt(3)
            colour = np.clip(under + _MIN_CONTRAST * d, 0, 255)
        classes[k], colours[k] = cls, colour
    label = classes[inst]
    image = background  # objects painted over it in place
    foreground = inst > 0
    image[foreground] = colours[inst[foreground]]

    gain = rng.uniform(0.88, 1.12, size=(3, 3)).astype(np.float32)
    illumination = cv2.resize(gain, (width, height), interpolation=cv2.INTER_LINEAR)
    image *= illumination[:, :, None]
    # pixel noise: the sum of two uniforms (triangular, close to Gaussian, 5x cheaper to draw), std 3-10
    noise = rng.random(image.shape, dtype=np.float32)
    noise += rng.random(image.shape, dtype=np.float32)
    noise -= np.float32(1.0)
    noise *= np.float32(rng.uniform(3, 10) * math.sqrt(6))
    image += noise
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8), label


class SyntheticSegmentation(SegmentationDataset):
    """Synthetic objects with thin parts and sharp colour edges (see the module docstring), made on the fly.

    Args:
        split: ``"train"`` or ``"val"``; the two splits never share an image.
        num_images: dataset length (any number; images are generated, not stored). Default 1000 for
            ``"train"`` and 100 for ``"val"``.
        size: ``(height, width)`` of the images, or one int for a square (default 161).
        seed: dataset seed; the same ``(seed, split, index)`` always gives the same image.
        transform: applied to each raw sample dict (see :class:`SegmentationDataset`).

    Raises:
        ValueError: unknown split, non-positive length, negative seed, or a size below 32 pixels.
        TypeError: non-integer ``num_images``, ``seed`` or ``size`` (a float is refused, not truncated; so is a
            bool).
    """

    def __init__(
        self,
        *,
        split: str = "train",
        num_images: int | None = None,
        size: int | tuple[int, int] = 161,
        seed: int = 0,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(transform=transform)
        if split not in _SPLIT_CODES:
            raise ValueError(f"synthetic split must be one of {tuple(_SPLIT_CODES)}, got {split!r}")
        if num_images is None:
            num_images = 1000 if split == "train" else 100
        if not _is_int(num_images):
            raise TypeError(f"num_images must be a positive integer, got {type(num_images).__name__} {num_images!r}")
        if num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        if not _is_int(seed):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        height, width = _image_size(size)
        if min(height, width) < 32:
            raise ValueError(f"synthetic images must be at least 32x32, got size {size!r}")
        self.split, self.seed, self.size = split, int(seed), (height, width)
        self.class_names = SYNTHETIC_CLASSES
        self.ids = [f"synthetic_{split}_{self.seed}_{i:06d}" for i in range(int(num_images))]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        return render_synthetic(rng, *self.size)

    def __repr__(self) -> str:
        h, w = self.size
        return f"SyntheticSegmentation(split={self.split!r}, num_images={len(self)}, size={h}x{w}, seed={self.seed})"
