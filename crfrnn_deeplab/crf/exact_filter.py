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

The choice is made per image (:func:`exact_images`): a batch that holds small images beside larger ones is
filtered by one lattice made of both (:func:`bilateral_lattice`), so an image's result does not depend on its
batch (nor, therefore, on how a batch is split over DistributedDataParallel ranks).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from crfrnn_deeplab.crf.bandwidth_gradient import EXACT_POINTS, gaussian_, packed_points
from crfrnn_deeplab.crf.lattice import PermutohedralLattice, build_lattice, check_lattice_inputs
from crfrnn_deeplab.crf.sparse_rows import SparseRows, index_dtype, stacked
from crfrnn_deeplab.crf.threads import caller_threads

__all__ = ["EXACT_FILTER_POINTS", "MAX_KERNEL_ENTRIES", "BilateralFilter", "DenseBlocks", "SplitBlur",
           "bilateral_lattice", "check_bilateral_filter", "exact_filter", "exact_images"]

#: How the bilateral kernel is filtered: the permutohedral lattice, the exact Gaussian, or by size.
BilateralFilter = Literal["auto", "lattice", "exact"]

#: Images of at most this many valid points are filtered exactly under ``bilateral_filter="auto"``: the size up to
#: which the bandwidth gradient sums all pairs (:data:`.bandwidth_gradient.EXACT_POINTS`), so that an image up to it,
#: padded or not, gets the exact dense CRF's values and every gradient.
EXACT_FILTER_POINTS = EXACT_POINTS
#: The most kernel entries (B·V²) a batch may ask of the exact filter: 8 GiB in float32. Beyond, a clear error
#: instead of an allocation that fails or, worse, a process the system kills for its memory. The kernel is built in
#: blocks of rows, so building it needs little more than the kernel itself (a 558 MiB kernel: 662 MiB of peak RSS,
#: 1683 MiB when the differences were formed for all rows at once).
MAX_KERNEL_ENTRIES = 2**31
_DIFF_ENTRIES = 2**22  # entries of the temporary differences per step of the kernel's construction


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


@dataclass(frozen=True, eq=False)
class SplitBlur:
    """One blur of a lattice whose vertices are a permutohedral lattice's, then ``rest`` more of an exact filter
    (:func:`bilateral_lattice`): ``first`` blurs the lattice's, ``second`` the others (None: they stay).

    Attributes:
        first: SparseRows Tensor[M, M], the lattice's blur along one direction.
        rest: the number of vertices after the lattice's.
        second: the exact filter's kernels (Tensor[rest, rest] in all), or None.
    """

    first: SparseRows
    rest: int
    second: DenseBlocks | None = None

    def __matmul__(self, x: Tensor) -> Tensor:
        """The product with dense values: Tensor[M + rest, C] -> Tensor[M + rest, C]."""
        m = self.first.num_columns
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != m + self.rest:
            raise ValueError(f"values must be a Tensor[{m + self.rest}, C], got {tuple(getattr(x, 'shape', ()))}")
        head, tail = x[:m], x[m:]
        return torch.cat([self.first @ head, tail if self.second is None else self.second @ tail])

    def to_dense(self) -> Tensor:
        """Tensor[M + rest, M + rest] (for tests)."""
        first = self.first.to_dense()
        second = torch.eye(self.rest, dtype=first.dtype) if self.second is None else self.second.to_dense()
        return torch.block_diag(first, second)


def check_bilateral_filter(bilateral_filter: object) -> BilateralFilter:
    """``bilateral_filter`` if it is one of :data:`BilateralFilter`'s values, else a ValueError naming them."""
    choices = typing.get_args(BilateralFilter)
    if bilateral_filter not in choices:
        raise ValueError(f"bilateral_filter must be {', '.join(map(repr, choices[:-1]))} or {choices[-1]!r}, got "
                         f"{bilateral_filter!r}")
    return bilateral_filter


def exact_images(bilateral_filter: BilateralFilter, batch_size: int, num_points: int,
                 valid: Tensor | None = None) -> Tensor:
    """Which images of a batch the bilateral kernel filters exactly: bool Tensor[B].

    "exact": all; "lattice": none; "auto": each image with at most :data:`EXACT_FILTER_POINTS` valid points (of
    its N = ``num_points``; all N where ``valid`` is None, or where no point of the batch is valid, as
    :func:`~crfrnn_deeplab.crf.lattice.build_lattice` then puts every point on the lattice). An image's filter
    depends on its own valid points alone: not on its padding, nor on the other images of its batch. (An image
    without a valid point sends and receives nothing: it goes with the others, exact only where no image with
    valid points takes the lattice.)

    Args:
        valid: bool Tensor[B, ...] of B·N values, or None.
    """
    check_bilateral_filter(bilateral_filter)
    if valid is not None and (not isinstance(valid, Tensor) or valid.dtype != torch.bool
                              or valid.numel() != batch_size * num_points):
        raise ValueError(f"valid must be a bool Tensor of B·N = {batch_size}·{num_points} values, got "
                         f"{getattr(valid, 'dtype', type(valid).__name__)} {tuple(getattr(valid, 'shape', ()))}")
    device = None if valid is None else valid.device
    if bilateral_filter != "auto":
        return torch.full((batch_size,), bilateral_filter == "exact", dtype=torch.bool, device=device)
    counts = torch.full((batch_size,), num_points, device=device)
    if valid is not None and bool(valid.any()):
        counts = valid.reshape(batch_size, -1).sum(1)
    exact, holds = counts <= EXACT_FILTER_POINTS, counts > 0
    return exact & holds if bool((~exact & holds).any()) else torch.ones_like(exact)


def bilateral_lattice(features: Tensor, valid: Tensor | None, exact: Tensor) -> PermutohedralLattice:
    """The bilateral filter of a batch: the exact Gaussian (:func:`exact_filter`) for the images ``exact`` marks,
    the permutohedral lattice (:func:`~crfrnn_deeplab.crf.lattice.build_lattice`) for the others.

    Where the batch holds both, the two are one lattice: the permutohedral lattice's M vertices, then the exact
    filter's, its splat's rows stacked under the lattice's, its slice's columns beside them, and each blur acting
    on the two sets apart (:class:`SplitBlur`; the exact filter's kernels in the first). The exact filter's slice
    takes the lattice's ``alpha`` and its kernels ``1 / alpha``, so that ``slice = alpha · splatᵀ`` holds for the
    whole, as every consumer of a lattice assumes.

    Args:
        features, valid: as :func:`exact_filter`'s.
        exact: bool Tensor[B] (:func:`exact_images`); where it marks some images but not all, each of those must
            hold valid points, and so must one of the others.
    """
    b = features.shape[0]
    if exact.shape != (b,) or exact.dtype != torch.bool:
        raise ValueError(f"exact must be a bool Tensor[{b}], got {tuple(exact.shape)} {exact.dtype}")
    if bool(exact.all()):
        return exact_filter(features, valid)
    if not bool(exact.any()):
        return build_lattice(features, valid)
    check_lattice_inputs(features, valid)  # (a clear error before the first use)
    n = features[0, 0].numel()
    if valid is None or not bool(valid.any()):  # every point on the lattice (as build_lattice takes it)
        valid = torch.ones(b, n, dtype=torch.bool, device=features.device)
    on = valid.reshape(b, n).to(features.device)
    exact = exact.to(features.device)
    holds = on.any(1)
    if not bool(holds[exact].all()) or not bool(holds[~exact].any()):
        raise ValueError("a batch filtered both ways needs valid points in every image filtered exactly and in one "
                         "filtered by the lattice (exact_images chooses so)")
    lattice = build_lattice(features, on & ~exact[:, None])
    images = exact.nonzero()[:, 0]
    small = exact_filter(features[images], on[images])
    points = (images[:, None] * n + torch.arange(n, device=images.device)).view(-1)  # sub-batch point -> batch
    index = index_dtype(b * n, small.splat.columns.numel())
    splat = SparseRows(points[small.splat.columns.long()].to(index), small.splat.offsets.to(index),
                       small.splat.weights, b * n, small.splat.row_length)
    slice_ = small.slice.spread_rows(points, b * n)
    slice_ = lattice.slice.beside(slice_.reweighted(slice_.weights * lattice.alpha))
    kernels = DenseBlocks(small.blur[0].blocks / lattice.alpha)
    rest = small.num_vertices
    blur = tuple(SplitBlur(part, rest, kernels if j == 0 else None) for j, part in enumerate(lattice.blur))
    return PermutohedralLattice(b, n, lattice.dim, lattice.num_vertices + rest,
                                stacked(lattice.splat, splat), slice_, blur, lattice.alpha)


def exact_filter(features: Tensor, valid: Tensor | None = None) -> PermutohedralLattice:
    """The exact Gaussian filter ``exp(-|f_i - f_j|² / 2)`` of a batch of feature maps, as a lattice.

    Args:
        features: as :func:`~crfrnn_deeplab.crf.lattice.build_lattice`'s, Tensor[B, d, H, W] or Tensor[B, d, N],
            already divided by the bandwidths.
        valid: as :func:`~crfrnn_deeplab.crf.lattice.build_lattice`'s: only these points send and receive.

    Returns:
        A lattice of B·V vertices, V = the most valid points of an image (N where ``valid`` is None or holds all
        or none): the k-th point of image b on the lattice is vertex ``b·V + k`` (splat and slice are 0/1
        matrices, each other's transpose, ``alpha`` = 1), and its one blur
        holds the images' V×V kernels (vertices without a point get no value, so they send nothing). Memory:
        B·V² values.
    """
    f, flat_valid = check_lattice_inputs(features, valid)  # [d, B·N]
    b, d = features.shape[:2]
    total = f.shape[1]
    n = total // b
    index = index_dtype(total, total)
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
    step = max(1, _DIFF_ENTRIES // (b * v))  # rows per step: the differences' temporary stays small beside the kernel
    for feature in points.view(d, b, v):
        for start in range(0, v, step):
            diff = feature[:, start : start + step, None] - feature[:, None, :]
            exponent[:, start : start + step].addcmul_(diff, diff, value=-0.5)
    blur = (DenseBlocks(gaussian_(exponent)),)
    if kept is None:  # every point its own vertex: splat = slice = I
        identity = SparseRows.selection(vertex, None, total, f.dtype)
        return PermutohedralLattice(b, n, d, total, identity, identity, blur, 1.0)
    splat = SparseRows.selection(kept, slots, total, f.dtype)  # vertex → its point (vertices ascend with points)
    slice_ = SparseRows.selection(vertex, flat_valid, b * v, f.dtype)  # point → its vertex
    return PermutohedralLattice(b, n, d, b * v, splat, slice_, blur, 1.0)
