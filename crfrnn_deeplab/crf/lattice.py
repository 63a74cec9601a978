"""The permutohedral lattice: fast high-dimensional Gaussian filtering in pure PyTorch.

Adams, Baek & Davis, "Fast High-Dimensional Filtering Using the Permutohedral Lattice", Eurographics 2010,
in the variant that Krähenbühl & Koltun's densecrf uses (NIPS 2011): features scaled so that the lattice
approximates a Gaussian of unit standard deviation, splat with barycentric weights onto the d+1 vertices of
the enclosing simplex, blur with [1 2 1] along each of the d+1 lattice directions, slice with the same
weights, and scale by 1 / (1 + 2^-d).

The lattice is built once per feature map (:func:`build_lattice`) and then filters any number of value
channels (:meth:`PermutohedralLattice.filter`). Every operator is a sparse matrix stored row by row
(:class:`~crfrnn_deeplab.crf.sparse_rows.SparseRows`), applied as a weighted gather-and-sum. The transpose of
the whole filter (used by the backward pass) is the same operators in reverse blur order. A batch of images becomes one lattice whose vertex keys include the image
index, so images never exchange mass.

Gradients w.r.t. the feature scales (the kernel bandwidths) are not the lattice's own: its forward pass is
piecewise in the scales (points change simplex) and its kernel is not the Gaussian's shape. They are the exact
Gaussian's derivative summed over explicit point pairs (:mod:`.bandwidth_gradient`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from crfrnn_deeplab.crf.bandwidth_gradient import KernelPairs, PairGroups, kernel_pairs
from crfrnn_deeplab.crf.products import gram
from crfrnn_deeplab.crf.routes import cpu_route
from crfrnn_deeplab.crf.sparse_rows import BlockedRows, SparseRows, index_dtype
from crfrnn_deeplab.crf.threads import caller_threads, limited_threads
from crfrnn_deeplab.images import all_finite

__all__ = ["PermutohedralLattice", "build_lattice", "check_lattice_inputs", "lattice_gaussian", "point_pairs"]

_PACK_LIMIT = 2**62
_KEY_LIMIT = 2**62  # int64 vertex keys (and their neighbours' offsets) stay below this in magnitude
_NARROW_KEYS = 2**30  # remainder-0 points smaller than this in magnitude are kept as int32, larger ones as int64
_PACKED_SORT_BITS = 63  # a key and its position packed into one int64 scalar (_packed_argsort)
_SPLAT_BLOCK = 2**14  # points per block of the CPU splat (BlockedRows): 1.3 MiB of 21 float32 channels
_SORT_PROBE = 2**16  # keys of the one-off timing that picks the CPU's sort (_sort_route)
_SORT_ROUTE: str | None = None  # "torch" or "numpy" once measured


@dataclass(frozen=True, eq=False)
class PermutohedralLattice:
    """A built lattice: the sparse operators of one (batched) permutohedral filter ``K = slice·blur·splat``.

    Attributes:
        batch_size: number of images B.
        num_points: points per image N (pixels).
        dim: feature dimension d.
        num_vertices: lattice vertices M over the whole batch.
        splat: Tensor[M, B*N] of barycentric weights (times the ``before`` weights, if any); on the CPU, blocked by
            points (:class:`~crfrnn_deeplab.crf.sparse_rows.BlockedRows`) when there are many.
        slice: Tensor[B*N, M], the transpose of the barycentric weights times ``alpha = 1 / (1 + 2^-d)`` (times
            the ``after`` weights, if any).
        blur: d+1 Tensor[M, M], ``I + (P_j + P_jᵀ) / 2`` for lattice direction j.
        alpha: the slice's scale ``1 / (1 + 2^-d)``.
        symmetric: ``slice = alpha · splatᵀ`` (unweighted, or equal weights before and after), so that ``Kᵀ`` is
            the same splat and slice with the blur directions reversed.
        unweighted: for a :meth:`weighted` lattice, the lattice of ``K`` itself (else None); ``before`` and
            ``after`` (Tensor[B, N] each) are then its weights, ``diag(after) · K · diag(before)``.
    """

    batch_size: int
    num_points: int
    dim: int
    num_vertices: int
    splat: SparseRows | BlockedRows
    slice: SparseRows
    blur: tuple[SparseRows, ...]
    alpha: float
    symmetric: bool = True
    unweighted: "PermutohedralLattice | None" = None
    before: Tensor | None = None
    after: Tensor | None = None

    def to_lattice(self, values: Tensor, *, transpose: bool = False, blur: bool = True) -> Tensor:
        """Splat then blur: Tensor[B, N, C] -> lattice values Tensor[M, C] (``Kᵀ``'s blur order if transpose)."""
        if not isinstance(values, Tensor) or values.dim() != 3 or values.shape[:2] != (self.batch_size, self.num_points):
            raise ValueError(f"values must be a Tensor[B, N, C] = [{self.batch_size}, {self.num_points}, C] for this "
                             f"lattice, got {tuple(getattr(values, 'shape', ()))}")
        b, n, c = values.shape
        x = self.splat @ values.reshape(b * n, c)  # [M, C]
        return self.blur_lattice(x, transpose=transpose) if blur else x

    def blur_lattice(self, x: Tensor, *, transpose: bool = False) -> Tensor:
        """The [1 2 1] blurs along the d+1 directions (reverse order for ``Kᵀ``): Tensor[M, C] -> Tensor[M, C]."""
        for blur in reversed(self.blur) if transpose else self.blur:
            x = blur @ x
        return x

    def from_lattice(self, x: Tensor) -> Tensor:
        """Slice lattice values Tensor[M, C] back to Tensor[B, N, C]."""
        return (self.slice @ x).view(self.batch_size, self.num_points, -1)

    def filter(self, values: Tensor, *, transpose: bool = False, mix: Tensor | None = None) -> Tensor:
        """Applies the lattice Gaussian ``K`` (or ``Kᵀ``) to values.

        Args:
            values: Tensor[B, N, C], any number of channels C, the lattice's dtype and device.
            transpose: apply ``Kᵀ`` (blur directions in reverse order) — the adjoint used by backward; needs a
                ``symmetric`` lattice.
            mix: optional Tensor[C, C'] applied to the channels on the lattice (``(K v) @ mix`` computed as
                ``K (v @ mix)`` where the lattice has far fewer rows than there are pixels).

        Returns:
            Tensor[B, N, C] (or C' with ``mix``): ``out_i = Σ_j k(f_i, f_j) v_j`` for the lattice's ``k``.
        """
        if transpose and not self.symmetric:
            raise ValueError("Kᵀ of a lattice with different before and after weights: transpose needs a symmetric one")
        x = self.to_lattice(values, transpose=transpose)
        if mix is not None:
            x = x @ mix
        return self.from_lattice(x)

    def weighted(self, before: Tensor, after: Tensor) -> "PermutohedralLattice":
        """The lattice of ``diag(after) · K · diag(before)`` (e.g. a normalised kernel), at no extra cost.

        Args:
            before: Tensor[B, N], multiplies the values before splatting.
            after: Tensor[B, N], multiplies the result after slicing. Pass the same tensor as ``before`` to
                keep the lattice ``symmetric`` (transposable).
        """
        splat, slice_ = self.splat.scale_columns(before), self.slice.scale_rows(after)
        symmetric = self.symmetric and before is after
        before = before.reshape(self.batch_size, self.num_points)
        after = after.reshape(self.batch_size, self.num_points)
        if self.unweighted is not None:  # weights compose
            before, after = self.before * before, self.after * after
        return PermutohedralLattice(
            self.batch_size, self.num_points, self.dim, self.num_vertices, splat, slice_, self.blur, self.alpha,
            symmetric, self if self.unweighted is None else self.unweighted, before, after,
        )

    def on_lattice(self) -> Tensor:
        """Which points are on the lattice (have vertices): bool Tensor[B, N]."""
        return (self.slice.offsets.diff() > 0).view(self.batch_size, self.num_points)


def _scale_factors(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # densecrf's choice: the [1 2 1] blur along d+1 directions then has unit variance in feature space.
    i = torch.arange(d, dtype=dtype, device=device)
    return math.sqrt(2.0 / 3.0) * (d + 1) / torch.sqrt((i + 1) * (i + 2))


class _Vertices:
    """Numbers the lattice vertices that the points touch, and finds vertices' neighbours.

    A vertex is identified by the image index and the first d coordinates of its key. Keys are packed into
    one int64 (mixed radix, image most significant) whenever the coordinate spans allow it — the usual case,
    a sort of scalars, and packing is linear so a neighbour's code is the vertex's code plus a constant.
    Neighbouring pixels often lie in the same simplex (the same d+1 vertices), so the distinct simplices are
    found first and only their vertices are numbered (at densecrf's usual bandwidths a photograph has several
    pixels per simplex).
    Otherwise (extreme bandwidths on huge images) whole key rows are ranked with ``unique(dim=0)``.

    Attributes:
        ids: Tensor[P, d+1], the vertex ids of every point's d+1 enclosing vertices, in [0, num).
        num: the number of vertices M.
    """

    def __init__(self, image: Tensor, rem0: Tensor, rank: Tensor, num_images: int) -> None:
        """image: Tensor[P], each point's image index; rem0: Tensor[d+1, P] (integer), the remainder-0 points;
        rank: Tensor[d+1, P] (integer), the ranks; num_images: B."""
        d1, p = rank.shape
        d = d1 - 1
        device = rank.device
        k = torch.arange(d1, device=device)
        lo = rem0[:d].amin(1).long() - 2 * d1  # keys are rem0 + [-d-1, d]; neighbours ± d more
        span = [num_images] + (rem0[:d].amax(1).long() + 2 * d1 - lo + 1).tolist()
        self.packed = math.prod(span) < _PACK_LIMIT
        if self.packed:
            radix = [1] * len(span)
            for i in range(len(span) - 2, -1, -1):
                radix[i] = radix[i + 1] * span[i + 1]
            self.radix = torch.tensor(radix, device=device)
            # base = image·radix_0 + Σ_i (rem0_i - lo_i)·radix_{i+1}, [P], accumulated row by row in place (a third
            # of the time of the broadcast [d, P] products and their sum)
            base = image * radix[0]
            for i in range(d):
                base.add_(rem0[i], alpha=radix[i + 1])
            base.sub_(int((lo * self.radix[1:]).sum()))
            rank = rank[:d]  # a permutation of 0..d: its first d entries determine it
            point_simplex = None
            if math.prod(span) * d1**d < _PACK_LIMIT:  # a simplex = its remainder-0 key and its rank order
                digits = d1 ** torch.arange(d, device=device)
                code = base * d1**d
                for i in range(d):
                    code.add_(rank[i], alpha=d1**i)
                simplices, point_simplex = _unique(code)
                base, rank = simplices // d1**d, simplices[:, None] // digits % d1  # [S], [S, d]
            else:
                rank = rank.T.long()
            # key_k = rem0 + k - (d+1)·[k >= d + 1 - rank]; sum the radix-weighted indicator by a cumsum.
            jumps = torch.zeros(base.shape[0], d + 2, dtype=torch.long, device=device)
            jumps.scatter_add_(1, d + 1 - rank, self.radix[1:].expand(base.shape[0], d))
            codes = base[:, None] + k * int(self.radix[1:].sum()) - d1 * jumps.cumsum(1)[:, :d1]  # [S, d+1]
            if math.prod(span) < 2**31:  # int32 sorts about twice as fast
                codes = codes.int()
            self.codes, ids = _unique(codes)  # sorted unique vertex codes
            ids = ids.int() if self.codes.numel() < 2**31 else ids
            self.ids = ids if point_simplex is None else ids.index_select(0, point_simplex)
        else:
            rem0, rank = rem0.T, rank.T
            keys = rem0[:, None, :d] + k[:, None] - d1 * (rank[:, None, :d] > d - k[:, None])  # [P, d+1, d]
            rows = torch.cat([image[:, None, None].expand(p, d1, 1), keys], 2).reshape(-1, d1)
            self.rows, ids = torch.unique(rows, dim=0, return_inverse=True)
            self.ids = ids.view(p, d1)
        self.num = self.codes.numel() if self.packed else self.rows.shape[0]

    def neighbours(self, steps: Tensor) -> Tensor:
        """Ids of the vertices at key + step for each step (Tensor[S, d], the image fixed): Tensor[S, M],
        -1 where absent."""
        if self.packed:  # each row of queries is sorted, as the codes are
            query = self.codes + (steps * self.radix[1:]).sum(1, keepdim=True).to(self.codes.dtype)
            if cpu_route(query.device):  # a row of queries merges with the codes (both sorted) in linear time
                codes = self.codes.numpy()
                below = torch.from_numpy(np.stack([_counts_at_most(codes, row) for row in query.numpy()]))
                pos = below.sub_(1).clamp_min_(0)  # the largest code <= the query, if any
            else:
                pos = torch.searchsorted(self.codes, query).clamp_max_(self.num - 1)  # the smallest code >= it
            return torch.where(self.codes[pos] == query, pos, -1)
        found = []
        for step in steps:
            shifted = self.rows.clone()
            shifted[:, 1:] += step
            _, ids = torch.unique(torch.cat([self.rows, shifted]), dim=0, return_inverse=True)
            table = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long, device=step.device)
            table[ids[: self.num]] = torch.arange(self.num, device=step.device)
            found.append(table[ids[self.num :]])
        return torch.stack(found)


def _counts_at_most(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """How many of the sorted ``keys`` are <= each of the sorted ``queries`` (``np.searchsorted(keys, queries,
    side="right")``), in time linear in their sizes.

    A stable argsort of the two concatenated runs is one merge (numpy's stable sort of integers wider than 16 bits
    is timsort, which finds the two runs), with the keys first among equal values: each query lands after the
    keys <= it and the queries before it, so its place minus its index is the count. The neighbour search of a noise
    image's 295 k vertex codes (six directions, one thread) took 49 ms instead of 69 ms with numpy's binary searches,
    and its lattice build 0.92× (0.72–1.36; 10 rounds of ``benchmarks/ab_trees.py``).
    """
    order = np.argsort(np.concatenate([keys, queries]), kind="stable")
    return np.flatnonzero(order >= keys.size) - np.arange(queries.size)


def _unique(x: Tensor) -> tuple[Tensor, Tensor]:
    """The sorted distinct values of an integer tensor and the index of each entry's value among them
    (``torch.unique(x, return_inverse=True)``; the index int32 below 2^31 entries on the CPU).

    On the CPU by one stable sort that also gives the order (:func:`_sort_with_order`; 885 k int64 simplex codes
    of a 96³ volume about 40 ms by numpy's packed sort instead of 86 for ``np.unique``, 88 for ``torch.unique``,
    one thread, on the Intel Xeon host), or numpy's argsort where that route finds the codes' span too wide to
    pack; then the distinct values are numbered by an int32 cumulative sum (numpy's cumsum of a bool mask takes
    2-4× as long)."""
    if not cpu_route(x.device) or x.numel() == 0:
        return torch.unique(x, return_inverse=True)
    flat = x.numpy().reshape(-1)
    lo, hi = int(flat.min()), int(flat.max())
    packed = _sort_with_order(flat - lo, hi - lo + 1)
    if packed is None:
        order, lo = np.argsort(flat), 0
        ordered = flat[order]
    else:
        order, ordered = packed  # ordered: the values minus lo
    first = _run_starts(ordered)  # the first entry of each distinct value, in sorted order
    number = torch.cumsum(torch.from_numpy(first), 0, dtype=torch.int32 if flat.size < 2**31 else torch.long)
    inverse = np.empty(flat.size, dtype=number.numpy().dtype)
    inverse[order] = number.numpy() - 1
    values = (ordered[first].astype(np.int64) + lo).astype(flat.dtype)
    return torch.from_numpy(values), torch.from_numpy(inverse).view(x.shape)


def _run_starts(values: np.ndarray, every: int | None = None) -> np.ndarray:
    """Where a run of equal values starts in ``values`` (np.ndarray[E]), as a bool mask: the first entry, each
    entry that differs from the one before, and (``every``) each ``every``-th entry, which starts a run too."""
    first = np.empty(values.size, dtype=bool)
    first[:1] = True
    np.not_equal(values[1:], values[:-1], out=first[1:])
    if every is not None:
        first[::every] = True
    return first


def _sort_with_order(keys: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The stable ascending argsort of integer keys in ``[0, span)`` (np.ndarray[E], int32 or int64) and the sorted
    keys, by the faster of two routes on this CPU (:func:`_sort_route`): ``torch.sort(stable=True)`` (int64
    order, the keys' dtype) or numpy's sort of packed scalars (:func:`_packed_argsort`; None where too wide).
    Both give the same order (a stable sort's is unique) and the same keys."""
    if _sort_route() == "torch":
        keys_sorted, order = torch.from_numpy(keys).sort(stable=True)
        return order.numpy(), keys_sorted.numpy()
    return _packed_argsort(keys, span)


def _sort_route() -> str:
    """``"torch"`` or ``"numpy"``: which stable sort :func:`_sort_with_order` takes, measured once per process.

    numpy sorts plain integers with vectorised sorting networks (x86-simd-sort) on some CPUs and not on others:
    on the AMD EPYC (Zen 4) of 2026-12-01 ``np.sort`` took 58 ms for 1.125 M int64 keys (35 ms for int32), where
    ``torch.sort(stable=True)`` took 22 ms at one thread, 12 at two, giving the order as well; on the Intel Xeon
    the project was developed on, numpy's sort took 14 ms. So both are timed once, on 2^16 keys at one thread
    (a few milliseconds), and the faster is kept; the route changes no result.
    """
    global _SORT_ROUTE
    if _SORT_ROUTE is None:
        keys = np.random.default_rng(0).integers(0, 2**40, _SORT_PROBE)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            best = {}
            for _ in range(3):
                for route, sort in (("numpy", lambda: _packed_argsort(keys, 2**40)),
                                    ("torch", lambda: torch.from_numpy(keys).sort(stable=True))):
                    start = time.perf_counter()
                    sort()
                    best[route] = min(best.get(route, math.inf), time.perf_counter() - start)
        finally:
            torch.set_num_threads(before)
        _SORT_ROUTE = min(best, key=best.get)
    return _SORT_ROUTE


def _packed_argsort(keys: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The stable ascending argsort of integer keys in ``[0, span)`` (np.ndarray[E]) and the sorted keys, or None
    where a key and an entry's position do not fit in 63 bits together.

    Sorts the scalars ``key·2^b + position`` (b bits hold a position; int32 when everything fits in 31 bits):
    all distinct, so any sort is stable, and numpy sorts plain integers with vectorised sorting networks
    (x86-simd-sort), several times faster than its argsort. 4.4 M splat keys of a 96³ volume in blocks of
    82 k entries: about 35 ms instead of 110 for 16-bit radix argsorts of the same blocks (one thread).
    Returns ``(order, sorted keys)``, both of the packed dtype.
    """
    e = keys.size
    bits = max(e - 1, 1).bit_length()
    width = max(span - 1, 1).bit_length() + bits
    if width > _PACKED_SORT_BITS:
        return None
    packed = keys.astype(np.int32 if width <= 31 else np.int64)  # a copy
    packed <<= bits
    packed |= np.arange(e, dtype=packed.dtype)
    packed.sort()
    order = packed & ((1 << bits) - 1)
    packed >>= bits
    return order, packed


def _rank_descending(x: Tensor) -> Tensor:
    """Position of each entry of a column of x (Tensor[K, P], small K) in a stable descending sort of that column.

    Ties go to the earlier entry, as in densecrf's rank loop. K(K-1)/2 elementwise comparisons of rows, because
    ``torch.sort`` along a dimension of 3-7 entries is slow: entry i counts the later entries j > it, entry j
    counts the earlier ones i >= it, ``j - #(j > i)`` (each comparison read as int8, no conversion pass).
    Returns Tensor[K, P] of int8 (int16 for K > 64).
    """
    k, p = x.shape
    dtype = torch.int8 if k <= 64 else torch.int16  # the caller's wrap keeps ranks within ±1.5 K
    rank = torch.arange(k, dtype=dtype, device=x.device)[:, None].repeat(1, p)
    for i in range(k):
        for j in range(i + 1, k):
            j_first = torch.gt(x[j], x[i])
            j_first = j_first.view(dtype) if dtype == torch.int8 else j_first.to(dtype)
            rank[i] += j_first
            rank[j] -= j_first
    return rank


def _sort_columns(x: Tensor) -> list[Tensor]:
    """The columns of x (Tensor[K, P], small K) sorted ascending, as K rows Tensor[P]: odd-even transposition
    sort, K rounds of elementwise min/max of neighbouring rows; a sorting network needs no scatter and no sort
    along a short dimension."""
    rows = list(x.unbind(0))
    for r in range(len(rows)):
        for i in range(r % 2, len(rows) - 1, 2):
            rows[i], rows[i + 1] = torch.minimum(rows[i], rows[i + 1]), torch.maximum(rows[i], rows[i + 1])
    return rows


@torch.no_grad()
@torch.compiler.disable  # data-dependent sizes (sort, unique): compiled code gains nothing and recompiles per size
def build_lattice(features: Tensor, valid: Tensor | None = None) -> PermutohedralLattice:
    """Builds the permutohedral lattice of a batch of feature maps.

    Always runs eagerly, also inside a ``torch.compile``'d model: the number of vertices depends on the data.
    Runs with the thread count of :mod:`.threads`' policy (by default at most the cores free now), except for
    the elevation's matrix product, whose rounding depends on the thread count: it keeps the caller's, so
    that the lattice never depends on the load.

    Args:
        features: Tensor[B, d, H, W] or Tensor[B, d, N], floating point, already divided by the kernel's
            bandwidths (the filter approximates ``exp(-|f_i - f_j|² / 2)``). Positions are computed in the
            features' precision (float32 as in densecrf, or float64).
        valid: optional bool Tensor[B, H, W] or [B, N]: only these points are on the lattice. The others get
            no vertices (their splat columns and slice rows are empty: they send and receive nothing), so a
            padded image filters its valid region exactly as the unpadded image would.

    Returns:
        The lattice, in ``features``' dtype and device, reusable for any number of filterings.
    """
    with limited_threads():
        return _build_lattice(features, valid)


def check_lattice_inputs(features: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """:func:`build_lattice`'s arguments checked (a clear error for any it cannot take) and laid out as it uses them.

    Returns:
        ``(f, valid)``: the features as Tensor[d, B·N] (points are columns, image by image) in float32 or
        float64, and the valid points as a bool Tensor[B·N], or None when every point is on the lattice (no mask,
        or a mask with all or none of the points valid).
    """
    if not isinstance(features, Tensor) or features.dim() not in (3, 4) or not features.is_floating_point():
        raise ValueError(
            f"features must be a floating-point Tensor[B, d, H, W] or [B, d, N], got shape "
            f"{tuple(getattr(features, 'shape', ()))} and dtype {getattr(features, 'dtype', type(features).__name__)}"
        )
    b, d = features.shape[:2]
    if b < 1 or d < 1 or features[0, 0].numel() < 1:
        raise ValueError(f"features need B, d, N >= 1, got shape {tuple(features.shape)}")
    if not all_finite(features):
        raise ValueError("features contain NaN or infinite values")
    dtype = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
    # N-contiguous rows: the elevation's [d+1, d] × [d, P] product runs several times faster than on the
    # point-major features that bilateral_features makes (a copy of d × P values).
    f = features.reshape(b, d, -1).transpose(0, 1).reshape(d, -1).to(dtype).contiguous()
    if valid is None:
        return f, None
    total_points = f.shape[1]
    n = total_points // b  # a map's mask is [B, H, W] or [B, N]; a list's [B, N] or [B, *grid] of N points
    shape = tuple(getattr(valid, "shape", ()))
    fits = (shape in ((b, *features.shape[2:]), (b, n))) if features.dim() == 4 else (
        len(shape) >= 2 and shape[0] == b and math.prod(shape[1:]) == n)
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or not fits:
        raise ValueError(f"valid must be a bool Tensor[B, H, W] or [B, N] (or [B, *grid] for a list of N points) "
                         f"matching features {tuple(features.shape)}, got {shape} "
                         f"{getattr(valid, 'dtype', type(valid).__name__)}")
    flat_valid = valid.reshape(-1).to(features.device)
    all_or_none = bool(flat_valid.all()) or not bool(flat_valid.any())  # then every point is on the lattice
    return f, None if all_or_none else flat_valid


def _build_lattice(features: Tensor, valid: Tensor | None) -> PermutohedralLattice:
    # Points are columns: [d, P] (P = B*N), and so are the per-point vectors below, [d+1, P].
    f, flat_valid = check_lattice_inputs(features, valid)
    b, d = features.shape[:2]
    # The elevated coordinates (at most (d+1)·|f| each) become int64 vertex keys with room for the neighbours'
    # offsets: beyond that the keys would wrap around and the filter be silently wrong.
    limit = _KEY_LIMIT / (d + 1) ** 2
    largest = float(f.abs().amax())
    if largest > limit:
        raise ValueError(f"features reach {largest:.3g} in magnitude, beyond the {limit:.3g} that the lattice's "
                         f"integer vertex keys hold for d = {d}: the guidance divided by its bandwidth is too large "
                         "(rescale the guidance or widen the bandwidth)")
    device = f.device
    total_points = f.shape[1]
    n = total_points // b
    # The points on the lattice: all, or the valid ones (kept[i] = the index of the i-th among all points).
    kept = None
    if flat_valid is not None:
        kept = flat_valid.nonzero()[:, 0]
        f = f.index_select(1, kept)
    rem0, rank, bary = _enclosing_simplices(f)
    image = torch.arange(b, device=device).repeat_interleave(n)
    vertices = _Vertices(image if kept is None else image[kept], rem0, rank, b)
    splat, slice_, alpha = _splat_and_slice(vertices, bary, kept, total_points)
    blur = _blur(vertices, f.dtype, slice_.columns.dtype)
    return PermutohedralLattice(b, n, d, vertices.num, splat, slice_, blur, alpha)


def _enclosing_simplices(f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The simplex of the permutohedral lattice that encloses each point (Adams et al. 2010, §3.1).

    Args:
        f: Tensor[d, P], the points' features (columns).

    Returns:
        ``(rem0, rank, bary)``: the nearest remainder-0 lattice point (Tensor[d+1, P] int32, int64 beyond
        ±2^30), the rank of each coordinate's differential (Tensor[d+1, P] int8; int16 for d > 63), and the
        barycentric weights of the d+1 enclosing vertices (Tensor[P, d+1], vertex k has remainder k).
    """
    d, dtype, device = f.shape[0], f.dtype, f.device
    d1 = d + 1
    # Elevate onto the hyperplane x·1 = 0 of R^{d+1}, a linear map: e_0 = Σ_k c_k, e_j = Σ_{k>j} c_k - j c_j
    # for the scaled features c_k = s_k f_k (k = 1..d).
    k = torch.arange(1, d1, device=device)[:, None]  # rows: c_k
    j = torch.arange(d1, device=device)[None, :]  # columns: e_j
    elevate = (k > j).to(dtype) - j * (k == j).to(dtype)
    with caller_threads():  # the product's rounding depends on the thread count, the lattice must not
        elevated = (_scale_factors(d, dtype, device)[:, None] * elevate).T @ f  # [d+1, P]

    # The nearest remainder-0 lattice point (ties round down, as in densecrf), and the rank of each
    # coordinate's differential; then shift the point back onto the plane x·1 = 0. Each coordinate rounds by
    # at most (d+1)/2 and the elevated coordinates sum to 0, so |Σ rem0 / (d+1)| <= (d+1)/2 and one wrap of
    # the rank into 0..d suffices (densecrf's loop makes the same single correction).
    # (in place where a [d+1, P] temporary would be made: the same operations, a third fewer passes to allocate)
    rem0 = (elevated / d1).sub_(0.5).ceil_().mul_(d1)  # ceil(elevated / (d+1) - 1/2)·(d+1)
    delta = elevated - rem0
    rank = _rank_descending(delta)  # Tensor[d+1, P] int8
    rank += torch.round(rem0.sum(0) / d1).to(rank.dtype)
    wrap = (rank < 0).view(torch.int8) - (rank > d).view(torch.int8)  # +1 below 0, -1 above d
    rank.add_(wrap, alpha=d1)
    rem0.add_(wrap, alpha=d1)

    # Barycentric weights of the d+1 enclosing vertices (vertex k has remainder k): with u_{d - rank_i} =
    # delta_i / (d+1), i.e. u = the differentials sorted ascending, b_0 = 1 - u_d + u_0 and b_k = u_k - u_{k-1}.
    u = _sort_columns(torch.sub(elevated, rem0, out=delta).div_(d1))
    bary = torch.stack([u[0] + (1.0 - u[d])] + [u[i] - u[i - 1] for i in range(1, d1)], 1)  # [P, d+1]
    # In float32 a weight that should be 0 can come out -6e-8; K·v must stay >= 0 for v >= 0 (normalisers).
    # int32 where it holds the keys (float to int64 costs several times float to int32 on the CPU)
    wide = bool(rem0.abs().amax() >= _NARROW_KEYS)
    return rem0.long() if wide else rem0.int(), rank, bary.clamp_min_(0.0)


def _splat_and_slice(
    vertices: _Vertices, bary: Tensor, kept: Tensor | None, total_points: int
) -> tuple[SparseRows | BlockedRows, SparseRows, float]:
    """The splat (Tensor[M, B*N]) and slice (Tensor[B*N, M], times ``alpha``) of points with barycentric weights
    ``bary`` (Tensor[P, d+1]) on ``vertices``; ``kept``: the indices of the points on the lattice (None: all).

    On the CPU the splat of more than _SPLAT_BLOCK points is a :class:`BlockedRows` (unless the lattice has more
    vertices than a block has entries): a vertex's entries are summed block of points by block, so that the
    rows it gathers are in the cache (a vertex of a photograph gathers pixels from all over a region of it).
    Splat alone, one thread (``benchmarks/bench_splat.py``): 500×375 pixels × 21 channels about half the time,
    a 96³ volume × 3 channels about two thirds.
    """
    p, d1 = bary.shape
    d, m, device = d1 - 1, vertices.num, bary.device
    index = index_dtype(max(m, total_points), max(m, total_points) * d1)  # for the splat and the slice
    keys = vertices.ids.to(index).reshape(-1)  # the entries, point by point: vertex e % (d+1) of point e // (d+1)
    e = keys.numel()
    blocked = cpu_route(device) and p > _SPLAT_BLOCK and m <= _SPLAT_BLOCK * d1
    span = _SPLAT_BLOCK * d1 if blocked else e  # entries per block

    # Splat: a vertex's entries are the points that touch it, in ascending order (within each block of points).
    entry, vertex = _stable_sort(keys, m, span)  # the entries in vertex order (within each block) and their vertices
    if cpu_route(device):  # numpy divides by a constant without a hardware division (3× faster on 4 M entries)
        point = torch.from_numpy(np.floor_divide(entry.numpy(), d1))
    else:
        point = entry // d1
    point = (point if kept is None else kept.index_select(0, point)).to(index)
    weights = bary.view(-1).index_select(0, entry)
    if blocked:
        splat = _blocked_splat(vertex, span, m, point, weights, total_points)
    else:
        splat = SparseRows(point, _offsets(torch.bincount(keys, minlength=m), index), weights, total_points)
    alpha = 1.0 / (1.0 + 2.0 ** (-d))
    # Slice (Tensor[B*N, M]): every point on the lattice has its d+1 vertices, the others none.
    if kept is None:
        offsets, row_length = torch.arange(0, p * d1 + 1, d1, dtype=index, device=device), d1
    else:
        offsets, row_length = torch.zeros(total_points + 1, dtype=index, device=device), None
        offsets[kept + 1] = d1
        offsets = offsets.cumsum(0, dtype=index)
    slice_ = SparseRows(keys, offsets, bary.mul_(alpha).view(-1), m, row_length)  # bary's last use: in place
    return splat, slice_, alpha


def _offsets(counts: Tensor, index: torch.dtype) -> Tensor:
    """Row offsets Tensor[R + 1] (dtype ``index``) of rows with ``counts`` (Tensor[R]) entries."""
    offsets = torch.zeros(counts.numel() + 1, dtype=index, device=counts.device)
    offsets[1:] = counts.cumsum(0)
    return offsets


def _blocked_splat(vertex: Tensor, span: int, m: int, point: Tensor, weights: Tensor,
                   total_points: int) -> BlockedRows:
    """The splat as :class:`BlockedRows` from its entries sorted by vertex within each block of ``span`` entries:
    their vertices (Tensor[E] in [0, m)), points (Tensor[E], the index dtype) and weights.

    A part is a run of equal vertices within a block, so the parts are found in one pass over the entries, already
    stored block by block; a vertex's parts, in block order, by one stable sort of the parts' vertices. (Counting
    the entries of every (block, vertex) pair instead costs blocks × M, which grows with the square of the size:
    at 96×192×192 voxels 157 ms for 216 blocks × 53 k vertices, against 15 ms at 96³; this takes 36 and 6 ms,
    one thread.) CPU only, as blocked splats are: numpy's comparison and ``flatnonzero`` take a third of the time
    of PyTorch's on 17.7 M entries.
    """
    entries = vertex.numpy()
    # where a part starts: every block starts one (a run may go on across a block's end)
    start = torch.from_numpy(np.flatnonzero(_run_starts(entries, every=span)))
    parts = SparseRows(point, torch.cat([start, start.new_full((1,), entries.size)]).to(point.dtype), weights,
                       total_points)
    part_vertex = vertex.index_select(0, start)
    columns = _stable_sort(part_vertex, m)[0].to(point.dtype)  # each vertex's parts, in block order
    ones = weights.new_ones(columns.numel())
    per_vertex = torch.bincount(part_vertex, minlength=m)
    return BlockedRows(parts, SparseRows(columns, _offsets(per_vertex, point.dtype), ones, parts.num_rows))


def _stable_sort(keys: Tensor, num_keys: int, block: int | None = None) -> tuple[Tensor, Tensor]:
    """The stable ascending sort of integer keys in ``[0, num_keys)`` within each block of ``block`` consecutive
    keys (None: one block): ``(order, sorted)``, the positions in ``keys`` (Tensor[E] int64) and the keys in that
    order (Tensor[E], the keys' dtype), which every route has at hand (gathering them after would cost a pass of
    random reads: 60 ms for the 17.7 M entries of a 96×192×192 volume).

    On the CPU one sort per block (:func:`_sort_with_order`; the blocks stay in the cache), numpy's stable argsort
    where keys too wide to pack. Elsewhere ``torch.sort``.
    """
    e = keys.numel()
    block = e if block is None else block
    if not cpu_route(keys.device):
        narrow = keys.to(torch.int16 if num_keys < 2**15 else keys.dtype)  # fewer bytes to move
        runs = [torch.sort(narrow[s : s + block], stable=True) for s in range(0, e, block)]
        order = torch.cat([run.indices + s for run, s in zip(runs, range(0, e, block))])
        return order, torch.cat([run.values for run in runs]).to(keys.dtype)
    ranks = keys.numpy()
    out, ordered = np.empty(e, dtype=np.int64), np.empty_like(ranks)
    for start in range(0, e, block):
        part = ranks[start : start + block]
        packed = _sort_with_order(part, num_keys)
        if packed is None:
            order = np.argsort(part, kind="stable")
            ordered[start : start + part.size] = part[order]
        else:
            order, ordered[start : start + part.size] = packed
        np.add(order, start, out=out[start : start + part.size])
    return torch.from_numpy(out), torch.from_numpy(ordered)


def _blur(vertices: _Vertices, dtype: torch.dtype, index: torch.dtype) -> tuple[SparseRows, ...]:
    """The [1 2 1] / 2 blur along each of the d+1 lattice directions, one Tensor[M, M] of three entries per row."""
    m, device = vertices.num, vertices.ids.device
    d = vertices.ids.shape[1] - 1
    d1 = d + 1
    # Blur along direction j: neighbours key ± (1, .., 1, -d at j, 1, .., 1); direction d moves all by ±1.
    # Three entries per row (itself, + and - neighbour); an absent neighbour is the vertex itself, weight 0.
    steps = torch.ones(d1, d, dtype=torch.long, device=device)
    steps[torch.arange(d, device=device), torch.arange(d, device=device)] = -d
    plus = vertices.neighbours(steps).to(index)  # [d+1, M]
    here = torch.arange(m, dtype=index, device=device)
    # The blur is symmetric: a's + neighbour b has a as its - neighbour (absent ones go to a spare column m).
    minus = torch.full((d1, m + 1), -1, dtype=index, device=device)
    minus.scatter_(1, torch.where(plus >= 0, plus, m).long(), here.expand(d1, m))
    # Row entries (itself, + neighbour, - neighbour), written column by column into [d+1, M, 3].
    columns = torch.empty(d1, m, 3, dtype=index, device=device)
    weights = torch.empty(d1, m, 3, dtype=dtype, device=device)
    columns[:, :, 0], weights[:, :, 0] = here, 1.0
    for k, neighbour in ((1, plus), (2, minus[:, :m])):
        present = neighbour >= 0
        torch.where(present, neighbour, here, out=columns[:, :, k])
        torch.mul(present, 0.5, out=weights[:, :, k])
    offsets = torch.arange(0, 3 * m + 1, 3, dtype=index, device=device)
    return tuple(SparseRows(columns[j].view(-1), offsets, weights[j].view(-1), m, 3) for j in range(d1))


class _LatticeGaussian(torch.autograd.Function):
    """``(K v) @ mix`` through a built lattice, differentiable w.r.t. the values, the mix and the feature scales.

    The backward pass w.r.t. the values is ``Kᵀ g mixᵀ`` (the same lattice, blur directions reversed, mixed on
    the lattice); w.r.t. ``mix`` it is a product of lattice-sized matrices. For the scales ``s`` (features
    ``f = raw · s``) it is the exact Gaussian's derivative ``∂k_ij/∂log s_k = -(f_ik - f_jk)² k_ij`` scaled to the
    lattice's mass, contracted with ``g_i · v_j`` over the kernel pairs (:mod:`.bandwidth_gradient`), not the
    lattice's own derivative (README: bandwidth gradients). A weighted lattice ``diag(a) K diag(b)`` puts its weights
    on the pair values: ``(a_i g_i) · (b_j v_j)``.
    """

    @staticmethod
    def forward(ctx, values, scale, mix, lattice: PermutohedralLattice, raw, pairs):
        assert lattice.symmetric, "the backward pass needs a transposable lattice"
        on_lattice = lattice.to_lattice(values)  # [M, C]
        out = lattice.from_lattice(on_lattice if mix is None else on_lattice @ mix)
        ctx.lattice, ctx.pairs = lattice, pairs
        ctx.save_for_backward(values, scale, mix, raw, on_lattice)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        values, scale, mix, raw, on_lattice = ctx.saved_tensors
        lattice: PermutohedralLattice = ctx.lattice
        # Symmetric lattice: slice = alpha·splatᵀ, so Kᵀ g = slice(blurᵀ(splat(g))), sliceᵀ g = alpha·splat(g).
        grad_lattice = lattice.to_lattice(grad.contiguous(), blur=False)  # splat(g), [M, C']
        grad_mix = None
        if mix is not None and ctx.needs_input_grad[2]:
            grad_mix = lattice.alpha * gram(on_lattice, grad_lattice)
        grad_values = None
        if ctx.needs_input_grad[0]:
            grad_lattice = lattice.blur_lattice(grad_lattice, transpose=True)
            grad_values = lattice.from_lattice(grad_lattice if mix is None else grad_lattice @ mix.T)  # Kᵀ g mixᵀ
        grad_scale = None
        if ctx.needs_input_grad[1]:
            left = grad if mix is None else grad @ mix.T  # the gradient w.r.t. K v
            right = values
            if lattice.unweighted is not None:
                left, right = left * lattice.after[..., None], right * lattice.before[..., None]
            pairs = ctx.pairs if ctx.pairs is not None else point_pairs(lattice, raw, scale)
            grad_scale = -pairs.contract(left, right).to(scale.dtype) / scale
        return grad_values, grad_scale, grad_mix, None, None, None


def point_pairs(lattice: PermutohedralLattice, raw_features: Tensor, scale: Tensor) -> KernelPairs | PairGroups:
    """The kernel pairs of a lattice's Gaussian for points without a grid (:func:`.bandwidth_gradient.kernel_pairs`
    with a uniform proposal above its exact size): what :func:`lattice_gaussian` uses when it is given none.

    Args:
        lattice: the lattice of ``raw_features * scale`` (or a weighted copy of it).
        raw_features: Tensor[B, N, d].
        scale: Tensor[d].
    """
    base = lattice if lattice.unweighted is None else lattice.unweighted
    with torch.no_grad():
        mass = base.filter(raw_features.new_ones(base.batch_size, base.num_points, 1))[..., 0]
        return kernel_pairs(raw_features * scale, mass, base.on_lattice(), seed=raw_features)


def lattice_gaussian(
    values: Tensor,
    raw_features: Tensor,
    scale: Tensor,
    lattice: PermutohedralLattice,
    mix: Tensor | None = None,
    *,
    pairs: KernelPairs | PairGroups | None = None,
) -> Tensor:
    """Differentiable Gaussian filtering ``Σ_j exp(-|s⊙(r_i - r_j)|² / 2) v_j`` through a built lattice.

    Args:
        values: Tensor[B, N, C], the values to filter.
        raw_features: Tensor[B, N, d], the unscaled features r (e.g. pixel positions and colours).
        scale: Tensor[d], the inverse bandwidth of each feature; ``lattice`` must have been built from
            ``raw_features * scale`` (it is not rebuilt here). Gradients w.r.t. ``scale`` are the exact
            Gaussian's derivative, scaled to the lattice's mass, over all point pairs of small images and an
            unbiased sample of pairs in larger ones (:mod:`.bandwidth_gradient`), not the lattice's own.
        lattice: the (symmetric) lattice of ``raw_features * scale``, possibly :meth:`~PermutohedralLattice.weighted`.
        mix: optional Tensor[C, C'], a channel mixing applied on the lattice: returns ``(K v) @ mix``.
        pairs: the kernel pairs of the (unweighted) lattice's Gaussian, made once by
            :func:`.bandwidth_gradient.kernel_pairs` and passed to every filtering through the lattice, so that
            sampled pairs are shared (and a grid proposal can follow the positions). None: :func:`point_pairs`
            of the lattice, made anew by every backward pass that needs the scale's gradient.

    Returns:
        Tensor[B, N, C] (C' with ``mix``).
    """
    b, n, d = lattice.batch_size, lattice.num_points, lattice.dim
    if not isinstance(raw_features, Tensor) or tuple(raw_features.shape) != (b, n, d):
        raise ValueError(f"raw_features must be the lattice's Tensor[B, N, d] = [{b}, {n}, {d}], got "
                         f"{tuple(getattr(raw_features, 'shape', ()))}")
    if not isinstance(scale, Tensor) or tuple(scale.shape) != (d,):
        raise ValueError(f"scale must be a Tensor[d] = [{d}] (one inverse bandwidth per feature), got "
                         f"{tuple(getattr(scale, 'shape', ()))}")
    return _LatticeGaussian.apply(values, scale, mix, lattice, raw_features, pairs)
