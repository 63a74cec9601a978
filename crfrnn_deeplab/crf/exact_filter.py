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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from crfrnn_deeplab.crf.bandwidth_gradient import EXACT_POINTS
from crfrnn_deeplab.crf.lattice import PermutohedralLattice, check_lattice_inputs
from crfrnn_deeplab.crf.sparse_rows import SparseRows
from crfrnn_deeplab.crf.threads import caller_threads

__all__ = ["EXACT_FILTER_POINTS", "MAX_KERNEL_ENTRIES", "DenseBlocks", "exact_filter", "lattice_points",
           "uses_exact_filter"]

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


def uses_exact_filter(bilateral_filter: str, points: int) -> bool:
    """Whether a batch whose images have at most ``points`` points on the lattice (:func:`lattice_points`) is
    filtered exactly: ``bilateral_filter`` "exact", or "auto" and ``points <= EXACT_FILTER_POINTS`` ("lattice":
    never). One choice for the whole batch: an image's result does not depend on its padding, but a small image
    batched with one of more than EXACT_FILTER_POINTS valid points is filtered by the lattice."""
    if bilateral_filter not in ("auto", "lattice", "exact"):
        raise ValueError(f"bilateral_filter must be 'auto', 'lattice' or 'exact', got {bilateral_filter!r}")
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
    device = f.device
    index = torch.int32 if total < 2**31 else torch.long
    if flat_valid is None:
        v, kept, vertex = n, None, torch.arange(total, dtype=index, device=device)
    else:
        per_image = flat_valid.view(b, n)
        v = int(per_image.sum(1).max())
        kept = flat_valid.nonzero()[:, 0]  # the points on the lattice, image by image
        rank = per_image.to(index).cumsum(1, dtype=index).view(-1)[kept] - 1  # each one's place in its image
        vertex = (kept // n).to(index) * v + rank
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
    ones = f.new_ones(vertex.numel())
    if kept is None:  # every point its own vertex: splat = slice = I
        identity = SparseRows(vertex, torch.arange(total + 1, dtype=index, device=device), ones, total, 1)
        return PermutohedralLattice(b, n, d, total, identity, identity, (DenseBlocks(blocks),), 1.0)
    kept = kept.to(index)
    splat = SparseRows(kept, _offsets(vertex, b * v), ones, total)  # vertex ascends with the point
    slice_ = SparseRows(vertex, _offsets(kept, total), ones, b * v)
    return PermutohedralLattice(b, n, d, b * v, splat, slice_, (DenseBlocks(blocks),), 1.0)


def _offsets(rows: Tensor, num_rows: int) -> Tensor:
    """Row offsets Tensor[R + 1] of a 0/1 matrix of ``num_rows`` rows whose rows ``rows`` (ascending) hold one entry."""
    counts = torch.zeros(num_rows, dtype=rows.dtype, device=rows.device)
    counts[rows.long()] = 1
    return torch.cat([counts.new_zeros(1), counts.cumsum(0, dtype=rows.dtype)])
