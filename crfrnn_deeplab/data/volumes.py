"""Synthetic 3-D volumes for segmentation: thin tubes and blobs in a noisy grey volume, deterministic by seed.

The volume counterpart of :mod:`crfrnn_deeplab.data.synthetic`, made for the dense CRF on volumes (README: 3-D volumes):
a network that predicts at stride 4 cannot place a tube one or two voxels thick, while an intensity-aware CRF
can, because every label edge is also an intensity edge. The geometry is drawn in physical units (voxel index
× ``spacing``), so an anisotropic spacing (CT-like, thick slices) squashes the objects along that axis as a
scanner would.

====  ===========  ============================================================================
 id    class        shape and intensity (arbitrary units; noise std 0.15)
====  ===========  ============================================================================
 0     background   0.0 plus a smooth bias field (±0.1)
 1     tube         4-8 smooth random curves per 32² units of cross-section (4-8 in a smaller volume),
                    radius 0.8-1.6 units, intensity 1.0 ± 0.1 per tube
 2     blob         2-4 rotated ellipsoids, semi-axes 12-28 % of the smallest extent, 0.5 ± 0.1
====  ===========  ============================================================================

Blobs are drawn first and tubes over them, so a tube crossing a blob stays a tube. Volume ``i`` of a dataset
is drawn from ``numpy.random.default_rng([seed, i])``: any index is reproducible on its own.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from crfrnn_deeplab.data.io import as_index

__all__ = ["VOLUME_CLASSES", "SPACING_LIMITS", "MAX_VOXELS", "SyntheticVolumes", "render_volume"]

VOLUME_CLASSES = ("background", "tube", "blob")
NOISE = 0.15

#: The allowed voxel sizes, in the units of the objects (tube radius 0.8-1.6): tubes from ~64 voxels across down
#: to a third of a voxel. A tube is walked in steps of half the smallest voxel size, and the number of tubes grows
#: with the physical cross-section, so much finer or coarser voxels make the drawing run for hours (a 1e-6 voxel
#: size: ~1e7 steps a tube).
SPACING_LIMITS = (0.05, 5.0)

#: The most voxels one volume may have: 2**28, e.g. 512 × 512 × 1024 (a large CT scan). Drawing a volume takes
#: about 100 bytes a voxel at its peak (the float64 coordinates of every voxel, the volume, its labels and the
#: drawing's temporaries), ~26 GB at the bound; a much larger shape would fail in numpy's allocator instead.
MAX_VOXELS = 2**28


def _check_geometry(shape: object, spacing: object) -> tuple[tuple[int, int, int], np.ndarray]:
    """``shape`` as 3 ints >= 4, :data:`MAX_VOXELS` in all, and ``spacing`` as 3 finite voxel sizes within
    :data:`SPACING_LIMITS`."""
    shape, spacing = (v.tolist() if isinstance(v, (np.ndarray, Tensor)) else v for v in (shape, spacing))
    if (isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 3
            or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in shape) or min(shape) < 4):
        raise ValueError(f"shape must be 3 sides >= 4 (ints, D, H, W), got {shape!r}")
    sides = (int(shape[0]), int(shape[1]), int(shape[2]))
    if (voxels := sides[0] * sides[1] * sides[2]) > MAX_VOXELS:
        raise ValueError(f"shape {sides} has {voxels:,} voxels; a synthetic volume has at most MAX_VOXELS = "
                         f"{MAX_VOXELS:,} (2**28, e.g. 512x512x1024): drawing one takes ~100 bytes a voxel")
    low, high = SPACING_LIMITS
    values = list(spacing) if isinstance(spacing, Sequence) and not isinstance(spacing, (str, bytes)) else None
    if (values is None or len(values) != 3
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and low <= v <= high for v in values)):
        raise ValueError(
            f"spacing must be 3 voxel sizes in {low:g}..{high:g} (the units of the objects, whose tubes have a radius "
            f"of 0.8-1.6), got {spacing!r}"
        )
    return sides, np.asarray(values, dtype=np.float64)


def _ellipsoid(rng: np.random.Generator, coords: np.ndarray, extent: float) -> np.ndarray:
    """A random rotated ellipsoid: bool mask over ``coords`` (Tensor[3, D, H, W] of physical positions)."""
    centre = np.array([rng.uniform(0.2, 0.8) * coords[a].max() for a in range(3)])
    axes = rng.uniform(0.12, 0.28, 3) * extent
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    local = np.tensordot(rotation.T, coords - centre[:, None, None, None], axes=1)  # [3, D, H, W]
    return ((local / axes[:, None, None, None]) ** 2).sum(0) <= 1.0


def _tube(rng: np.random.Generator, coords: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """A smooth random curve of radius 0.8-1.6 through the volume: bool mask over ``coords``."""
    size = np.array([coords[a].max() for a in range(3)])
    point = rng.uniform(0.1, 0.9, 3) * size
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    radius = rng.uniform(0.8, 1.6)
    step = 0.5 * min(radius, float(spacing.min()))
    mask = np.zeros(coords.shape[1:], bool)
    reach = np.ceil((radius + 1.0) / spacing).astype(int)
    for _ in range(int(2.0 * size.max() / step)):
        direction += rng.normal(0, 0.08, 3)  # a slowly turning direction: a smooth curve
        direction /= np.linalg.norm(direction)
        point = point + step * direction
        if np.any(point < -radius) or np.any(point > size + radius):
            break
        centre = np.round(point / spacing).astype(int)
        lo, hi = np.maximum(centre - reach, 0), np.minimum(centre + reach + 1, coords.shape[1:])
        if np.any(lo >= hi):
            continue
        box = coords[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        near = ((box - point[:, None, None, None]) ** 2).sum(0) <= radius**2
        mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= near
    return mask


def render_volume(
    rng: np.random.Generator, shape: Sequence[int], *, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Draws one synthetic volume and its labels.

    Args:
        rng: the source of randomness (the volume is a function of its state).
        shape: (D, H, W) voxels, ints >= 4, :data:`MAX_VOXELS` in all.
        spacing: the physical size of a voxel along (D, H, W), each within :data:`SPACING_LIMITS`; the objects
            are drawn in physical units.

    Returns:
        ``(volume, label)``: float32 ``[D, H, W]`` intensities and int64 ``[D, H, W]`` class ids
        (:data:`VOLUME_CLASSES`).

    Raises:
        ValueError: a bad ``shape`` or ``spacing``.
    """
    shape, spacing_arr = _check_geometry(shape, spacing)
    coords = np.stack(np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing_arr)), indexing="ij"))
    extent = float(min(n * s for n, s in zip(shape, spacing_arr)))
    label = np.zeros(shape, np.int64)
    volume = np.zeros(shape, np.float64)
    for _ in range(rng.integers(2, 5)):
        blob = _ellipsoid(rng, coords, extent)
        label[blob], volume[blob] = 2, 0.5 + rng.uniform(-0.1, 0.1)
    # Tubes cross the volume: their number grows with its cross-section, so their share of voxels does not
    # depend on the volume's size.
    for _ in range(int(rng.integers(4, 9) * max(1.0, (extent / 32.0) ** 2))):
        tube = _tube(rng, coords, spacing_arr)
        label[tube], volume[tube] = 1, 1.0 + rng.uniform(-0.1, 0.1)
    # A smooth bias field: a few low-frequency cosines, ±0.1 at most.
    phase = rng.uniform(0, 2 * np.pi, 3)
    bias = sum(np.cos(2 * np.pi * coords[a] / (2 * coords[a].max() + 1) + phase[a]) for a in range(3)) / 30.0
    volume = volume + bias + rng.normal(0, NOISE, shape)
    return volume.astype(np.float32), label


class SyntheticVolumes(torch.utils.data.Dataset):
    """``num_volumes`` synthetic volumes of one shape and spacing, generated on access.

    Args:
        num_volumes: the dataset's length.
        shape: (D, H, W) voxels, ints >= 4, :data:`MAX_VOXELS` (2**28) in all.
        spacing: the voxel size along (D, H, W), each within :data:`SPACING_LIMITS` (0.05-5).
        seed: volume ``i`` is drawn from ``default_rng([seed, i])``; a non-negative int.

    Items: ``(volume, label)``, Tensor[1, D, H, W] float32 (one guidance channel) and Tensor[D, H, W] int64.

    Raises:
        ValueError: a bad ``num_volumes``, ``shape``, ``spacing`` or ``seed``.
    """

    def __init__(
        self,
        *,
        num_volumes: int,
        shape: Sequence[int] = (32, 32, 32),
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        seed: int = 0,
    ) -> None:
        if isinstance(num_volumes, bool) or not isinstance(num_volumes, numbers.Integral) or num_volumes < 1:
            raise ValueError(f"num_volumes must be an int >= 1, got {num_volumes!r}")
        shape, spacing_arr = _check_geometry(shape, spacing)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.num_volumes, self.shape, self.seed = int(num_volumes), shape, int(seed)
        self.spacing = tuple(float(s) for s in spacing_arr)

    def __len__(self) -> int:
        return self.num_volumes

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        index = as_index(index, "a volume index")
        if not 0 <= index < self.num_volumes:
            raise IndexError(f"volume {index} of {self.num_volumes}")
        volume, label = render_volume(np.random.default_rng([self.seed, index]), self.shape, spacing=self.spacing)
        return torch.from_numpy(volume)[None], torch.from_numpy(label)

    def __repr__(self) -> str:
        return (f"SyntheticVolumes(num_volumes={self.num_volumes}, shape={self.shape}, spacing={self.spacing}, "
                f"seed={self.seed})")
