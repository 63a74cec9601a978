"""The exact Gaussian filter of small images, in the lattice's form: each point its own vertex.

For images of at most :data:`EXACT_FILTER_POINTS` pixels (voxels) the N×N kernel matrix
``k_ij = exp(-|f_i - f_j|² / 2)`` is small (a million entries at most, 4 MiB in float32), so the bilateral kernel
is filtered exactly instead of through the permutohedral lattice, whose kernel is not the Gaussian's shape: on such
images its normalised rows differ from the Gaussian's by 20–30 % in L1, and the CRF it defines is as far from the
exact dense CRF as densecrf's is (``benchmarks/bench_bandwidth_gradient.py --only kernel``, ``--only drawn``).

The exact filter is a :class:`~crfrnn_deeplab.crf.lattice.PermutohedralLattice` whose vertices are the valid
points, whose splat and slice are 0/1 matrices (each point to its vertex) and whose one "blur" is the dense kernel
of each image (:class:`DenseBlocks`), so every consumer of a lattice (the autograd node, the fused training
iterations, the inference loop, the normalisers, the weighted copies) takes it unchanged. Its bandwidth gradient
is then the exact Gaussian's: the kernel pairs' lattice-to-Gaussian mass ratio is 1 (:mod:`.bandwidth_gradient`).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from crfrnn_deeplab.crf.bandwidth_gradient import EXACT_POINTS, packed_points
from crfrnn_deeplab.crf.lattice import PermutohedralLattice, check_lattice_inputs
from crfrnn_deeplab.crf.sparse_rows import SparseRows
from crfrnn_deeplab.crf.threads import caller_threads

__all__ = ["EXACT_FILTER_POINTS", "MAX_KERNEL_ENTRIES", "BilateralFilter", "DenseBlocks", "check_bilateral_filter",
           "exact_filter", "lattice_points", "uses_exact_filter"]

#: How the bilateral kernel is filtered: the permutohedral lattice, the exact Gaussian, or by size.
BilateralFilter = Literal["auto", "lattice", "exact"]

#: Images of at most this many valid points are filtered exactly under ``bilateral_filter="auto"``: the size up to
#: which the bandwidth gradient sums all pairs (:data:`.bandwidth_gradient.EXACT_POINTS`), so that an image up to it,
#: padded or not, gets the exact dense CRF's values and every gradient.
EXACT_FILTER_POINTS = EXACT_POINTS
#: The most kernel entries (B·V²) a batch may ask of the exact filter: 8 GiB in float32. Beyond, a clear error
#: instead of an allocation that fails or, worse, a process the system kills for its memory.
MAX_KERNEL_ENTRIES = 2**31


@dataclass(frozen=True, eq=False)
class DenseBlocks:
    """A block-diagonal matrix Tensor[B·N, B·N] of B dense symmetric blocks Tensor[N, N]: one image's kernel each.

    Attributes:
        blocks: Tensor[B, N, N].
    """

    blocks: Tensor

    def __matmul__(self, x: Tensor) -> Tensor:
        """The product with dense values: Tensor[B·N, C] -> Tensor[B·N, C]."""
        b, n, _ = self.blocks.shape
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != b * n or x.dtype != self.blocks.dtype:
            raise ValueError(f"values must be a Tensor[{b * n}, C] of {self.blocks.dtype}, got "
                             f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x).__name__)}")
        with caller_threads():  # a product's rounding depends on the thread count: never on the load
            return torch.bmm(self.blocks, x.reshape(b, n, -1)).view(b * n, -1)

    def to_dense(self) -> Tensor:
        """Tensor[B·N, B·N] (for tests)."""
        return torch.block_diag(*self.blocks)


def lattice_points(num_points: int, valid: Tensor | None = None) -> int:
    """The most points any image of a batch has on its lattice: ``num_points`` (N per image), or the largest count
    of valid points of an image when ``valid`` (bool Tensor[B, ...] of B·N values) holds some but not all
    (:func:`~crfrnn_deeplab.crf.lattice.build_lattice` puts every point on the lattice when none is valid)."""
    if valid is None:
        return num_points
    counts = valid.reshape(valid.shape[0], -1).sum(1)
    most = int(counts.max())
    return num_points if most == 0 or int(counts.min()) == num_points else most


def check_bilateral_filter(bilateral_filter: object) -> BilateralFilter:
    """``bilateral_filter`` if it is one of :data:`BilateralFilter`'s values, else a ValueError naming them."""
    choices = typing.get_args(BilateralFilter)
    if bilateral_filter not in choices:
        raise ValueError(f"bilateral_filter must be {', '.join(map(repr, choices[:-1]))} or {choices[-1]!r}, got "
                         f"{bilateral_filter!r}")
    return bilateral_filter


def uses_exact_filter(bilateral_filter: BilateralFilter, points: int) -> bool:
    """Whether a batch whose images have at most ``points`` points on the lattice (:func:`lattice_points`) is
    filtered exactly: ``bilateral_filter`` "exact", or "auto" and ``points <= EXACT_FILTER_POINTS`` ("lattice":
    never). One choice for the whole batch: an image's result does not depend on its padding, but a small image
    batched with one of more than EXACT_FILTER_POINTS valid points is filtered by the lattice."""
    check_bilateral_filter(bilateral_filter)
    return bilateral_filter == "exact" or (bilateral_filter == "auto" and points <= EXACT_FILTER_POINTS)


def exact_filter(features: Tensor, valid: Tensor | None = None) -> PermutohedralLattice:
    """The exact Gaussian filter ``exp(-|f_i - f_j|² / 2)`` of a batch of feature maps, as a lattice.

    Args:
        features: as :func:`~crfrnn_deeplab.crf.lattice.build_lattice`'s, Tensor[B, d, H, W] or Tensor[B, d, N],
            already divided by the bandwidths.
        valid: as :func:`~crfrnn_deeplab.crf.lattice.build_lattice`'s: only these points send and receive.

    Returns:
        A lattice of B·V vertices, V = :func:`lattice_points`: the k-th point of image b on the lattice is vertex
        ``b·V + k`` (splat and slice are 0/1 matrices, each other's transpose, ``alpha`` = 1), and its one blur
        holds the images' V×V kernels (vertices without a point get no value, so they send nothing). Memory:
        B·V² values.
    """
    f, flat_valid = check_lattice_inputs(features, valid)  # [d, B·N]
    b, d = features.shape[:2]
    total = f.shape[1]
    n = total // b
    index = torch.int32 if total < 2**31 else torch.long
    if flat_valid is None:
        v, kept, slots, vertex = n, None, None, torch.arange(total, dtype=index, device=f.device)
    else:
        packed, slots = packed_points(flat_valid.view(b, n))  # [B, V]: image b's k-th valid point is vertex b·V + k
        v, slots = packed.shape[1], slots.view(-1)
        kept = (packed + torch.arange(0, total, n, device=f.device)[:, None]).view(-1)[slots].to(index)
        vertex = slots.nonzero()[:, 0].to(index)  # of each kept point
        f = f.index_select(1, kept)
    if b * v * v > MAX_KERNEL_ENTRIES:
        raise ValueError(f"the exact filter would hold {b} × {v}² = {b * v * v:.3g} kernel entries "
                         f"({b * v * v * f.element_size() / 2**30:.3g} GiB), more than its limit of "
                         f"{MAX_KERNEL_ENTRIES:.3g}: use bilateral_filter='lattice' (or 'auto') for images this large")
    points = f.new_zeros(d, b * v)  # features of the vertices (0 where a vertex has no point)
    points[:, vertex.long()] = f
    exponent = f.new_zeros(b, v, v)  # -|f_i - f_j|² / 2, a feature at a time (contiguous passes, no cancellation)
    for feature in points.view(d, b, v):
        diff = feature[:, :, None] - feature[:, None, :]
        exponent.addcmul_(diff, diff, value=-0.5)
    # Entries below 1.5·e^20 times the dtype's smallest normal number (9e-30 in float32; a row's own entry is 1)
    # become 0: exp near and products below that number take a slow path, many times slower. (One threshold pass
    # after the clamp: 4× faster than a mask.)
    negligible = math.log(torch.finfo(f.dtype).tiny) + 20.0
    blocks = F.threshold_(exponent.clamp_(min=negligible).exp_(), 1.5 * math.exp(negligible), 0.0)
    blur = (DenseBlocks(blocks),)
    if kept is None:  # every point its own vertex: splat = slice = I
        identity = SparseRows.selection(vertex, None, total, f.dtype)
        return PermutohedralLattice(b, n, d, total, identity, identity, blur, 1.0)
    splat = SparseRows.selection(kept, slots, total, f.dtype)  # vertex → its point (vertices ascend with points)
    slice_ = SparseRows.selection(vertex, flat_valid, b * v, f.dtype)  # point → its vertex
    return PermutohedralLattice(b, n, d, b * v, splat, slice_, blur, 1.0)
