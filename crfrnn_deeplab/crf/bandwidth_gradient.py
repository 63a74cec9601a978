"""The bandwidth gradient of lattice Gaussian filtering, from exact Gaussian pair terms (issue #15; README: bandwidth
gradients).

A filter ``out_i = Σ_j k_ij v_j`` with ``k_ij = exp(-|f_i - f_j|² / 2)`` on scaled features ``f = s ⊙ r`` (the
bilateral kernel of Krähenbühl & Koltun, NIPS 2011, Eq. 3) has ``∂k_ij/∂log s_k = -(f_ik - f_jk)² k_ij``, so a
loss that reaches the filter through ``g = ∂L/∂out`` has

    ∂L/∂log s_k = -Σ_ij (g_i · v_j) k_ij (f_ik - f_jk)².                                            (1)

The permutohedral lattice (Adams, Baek & Davis 2010) approximates ``K`` well enough for the forward pass but
not (1): its forward pass is piecewise in ``s`` (points change simplex), its kernel is narrower than the
Gaussian with compact support, and in a mean-field CRF the sum of (1) over the filterings of a forward pass is
a small difference of large pair terms (the normaliser's derivative cancels most of the filter's). Evaluating
(1) with the lattice as ``K`` (the moment expansion of ``|f_i - f_j|²``) therefore gave wrong gradients,
sometimes of the wrong sign. Here (1) is evaluated with the exact Gaussian on explicit point pairs:

- **all pairs** of an image with at most :data:`EXACT_POINTS` points: (1) exactly;
- otherwise **sampled pairs**: for every point ``i``, :data:`SAMPLES_PER_POINT` partners ``j`` drawn from a
  proposal ``p(j | i)`` and weighted by ``k_ij / p(j | i)`` (importance sampling, unbiased for (1)). On a grid
  of points (pixels, voxels) whose first features are the grid positions, the proposal is the position part of
  the kernel itself — a discrete Gaussian per grid axis, of the axis' own rate (spacing / θα, so anisotropic
  voxels are followed), truncated to the grid — so ``k_ij / p(j | i)`` is the guidance part of the kernel
  times the position Gaussian's normaliser. Without a grid the proposal is uniform over the image's points.

The pairs are drawn once per lattice and shared by every filtering through it (every mean-field iteration and
the normaliser ``D = K·1``): the large pair terms that cancel between those filterings then cancel in the
estimate too, instead of leaving their sampling noise behind.

**Mass.** The lattice's kernel has less mass than the Gaussian (about half of it for 5-D image features, and
not uniformly: the ratio ``c_i = (K_lattice·1)_i / (K·1)_i`` ranges over 0.25–0.8 within one image). The CRF's
normalisations ``D^-½ K D^-½`` and ``D^-1 K`` cancel that mass in the forward pass, and the derivative must carry
the same mass for the cancellation to hold in the backward pass: with the plain Gaussian derivative the
bandwidth gradients come out about twice the exact CRF's (measured median 2.2× for θα, 2.5× for θβ). Pair
``(i, j)`` of the derivative is therefore scaled by ``√(c_i c_j)``: the symmetric kernel ``√(c_i c_j) k_ij`` has
the lattice's row sums to first order in the variation of c, and is symmetric like the lattice's kernel (its
loss is closer to the lattice CRF's than that of the row scaling ``c_i k_ij``, and on 3-D volumes the row scaling
misses the exact gradient by 2.5–3.4×). With all pairs ``c_i`` is exact per point; with sampled pairs one
point's ``(K·1)_i`` is too noisy to divide by, and every point of an image gets the image's ratio
``Σ_i (K_lattice·1)_i / Σ_i (K·1)_i`` (the Gaussian mass estimated from the same pairs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from crfrnn_deeplab.crf.sparse_rows import index_dtype

__all__ = [
    "EXACT_POINTS", "SAMPLES_PER_POINT", "KernelPairs", "PairGroups", "gaussian_", "kernel_pairs", "packed_points",
]

#: Images with at most this many points use all pairs: there the sampling noise of (1) is larger than its value
#: (the pair terms cancel), while all N² pairs (a million at most) are cheap.
EXACT_POINTS = 1024
#: Partners per point above :data:`EXACT_POINTS`, drawn once per lattice. The backward pass costs one gather of
#: each partner's values per filtering; the variance of one step's estimate falls as 1 / SAMPLES_PER_POINT.
SAMPLES_PER_POINT = 1
_ROW_BLOCK = 256  # rows of the exact N×N sums per step (bounds the [rows, N, d] temporaries)
_EXACT_CACHE = 1 << 23  # the exact pairs' weights (B·N²·d values) are kept up to this size
_POINT_BLOCK = 1 << 16  # points per step of the sampled contraction (bounds its [points, S, C] temporaries)


@dataclass(frozen=True, eq=False)
class KernelPairs:
    """Point pairs and the weights that turn pair values ``a_ij = left_i · right_j`` into (1).

    Exact form (``columns`` is None): every pair of each image; ``weights`` is Tensor[B, d, N·N] holding
    ``k_ij (f_i - f_j)²`` for pairs of valid points, or None where that would be large (then recomputed from
    ``features`` block by block). Padded images whose valid points are few enough keep only those (``points``):
    N is then their most valid points, and the arrays below hold them instead of all the image's points.
    Sampled form: S partners per point in ``columns``, and ``weights`` Tensor[d, B·N·S] holding
    ``c k_ij (f_i - f_j)² / (S p(j | i))`` (c: the image's mass ratio).

    Attributes:
        features: Tensor[B, N, d], the scaled features ``f``.
        valid: Tensor[B, N] of 0/1 in the features' dtype: the points on the lattice.
        mass: Tensor[B, N], the lattice-to-Gaussian mass ratio ``c_i`` of each point (0 off the lattice; the image's
            ratio on every point in sampled form).
        columns: Tensor[B·N·S] (int32 or int64), the partner ``j`` (a flat index over the batch) of pair ``(i, s)``,
            ordered by ``i`` then ``s``; None in exact form.
        weights: see above.
        points: Tensor[B, N] (int64) in exact form when the images' valid points are packed: the index of each
            one among its image's points (``valid`` says which slots hold one); None: every point, in order.
    """

    features: Tensor
    valid: Tensor
    mass: Tensor
    columns: Tensor | None = None
    weights: Tensor | None = None
    points: Tensor | None = None

    @property
    def exact(self) -> bool:
        """All pairs (True) or sampled pairs (False)."""
        return self.columns is None

    def contract(
        self, left: Tensor, right: Tensor, left_scale: Tensor | None = None, right_scale: Tensor | None = None
    ) -> Tensor:
        """``Σ_ij (left_i · right_j) √(c_i c_j) k_ij (f_ik - f_jk)²`` for every feature k, i.e. ``-∂/∂log s_k`` of
        ``Σ_i left_i · (K right)_i`` with the mass-consistent Gaussian derivative.

        Args:
            left: Tensor[B, N, C], e.g. the gradient w.r.t. a filter's output.
            right: Tensor[B, N, C], the filtered values.
            left_scale, right_scale: optional per-point factors (B·N values) of ``left`` and ``right`` (e.g. a
                normaliser ``diag(a) K diag(b)`` puts on them), applied to the pair values instead of the arrays.

        Returns:
            Tensor[d] in the features' dtype: exact in exact form, an unbiased estimate otherwise.
        """
        b, n, d = self.features.shape
        if self.points is not None:  # the valid points of padded images: their values
            whole = left.shape[1]
            left, right = (x.gather(1, self.points[..., None].expand(-1, -1, x.shape[-1])) for x in (left, right))
            left_scale, right_scale = (None if x is None else x.detach().reshape(b, whole).gather(1, self.points)
                                       for x in (left_scale, right_scale))
        assert left.shape[:2] == (b, n) and right.shape == left.shape, "values do not match the pairs"
        left, right = left.to(self.features.dtype), right.to(self.features.dtype)
        scales = [None if x is None else x.detach().reshape(b, n).to(self.features.dtype)
                  for x in (left_scale, right_scale)]
        if self.exact:
            return self._contract_exact(left, right, *scales)
        c = left.shape[-1]
        s = self.columns.numel() // (b * n)
        left, right = left.reshape(b * n, c), right.reshape(b * n, c)
        out = self.features.new_zeros(d)
        for start in range(0, b * n, _POINT_BLOCK):  # one gather of the partners' values serves every feature
            stop = min(start + _POINT_BLOCK, b * n)
            pairs = slice(start * s, stop * s)
            partners = right.index_select(0, self.columns[pairs]).view(stop - start, s, c)
            pair_values = (partners * left[start:stop, None, :]).sum(-1)  # a_ij, [points, S]
            if scales[0] is not None:
                pair_values *= scales[0].reshape(-1)[start:stop, None]
            if scales[1] is not None:
                pair_values *= scales[1].reshape(-1).index_select(0, self.columns[pairs]).view(stop - start, s)
            out += self.weights[:, pairs] @ pair_values.view(-1)
        return out

    def _contract_exact(
        self, left: Tensor, right: Tensor, left_scale: Tensor | None = None, right_scale: Tensor | None = None
    ) -> Tensor:
        b, n, d = self.features.shape
        out = self.features.new_zeros(d)
        for image in range(b):
            root = self.mass[image, :, None].sqrt()  # 0 off the lattice: such points send and receive nothing
            root_left = root if left_scale is None else root * left_scale[image, :, None]
            root_right = root if right_scale is None else root * right_scale[image, :, None]
            scaled_left, right_t = left[image] * root_left, (right[image] * root_right).T  # [N, C], [C, N]
            if self.weights is not None:
                out += self.weights[image] @ (scaled_left @ right_t).view(-1)
                continue
            for rows, k, sq in _exact_blocks(self.features[image], self.valid[image]):
                out += sq.mul_(k).view(d, -1) @ (scaled_left[rows] @ right_t).view(-1)
        return out


@dataclass(frozen=True, eq=False)
class PairGroups:
    """The kernel pairs of a batch whose images fall into groups, each group's chosen apart: a padded batch with
    images of at most :data:`EXACT_POINTS` valid points (all pairs) beside larger ones (sampled pairs), so that
    each image gets the pairs it has alone (:func:`kernel_pairs`). Contracts as :class:`KernelPairs` does.

    Attributes:
        groups: ``(images, pairs)`` pairs: Tensor[G] (int64), the group's images in the batch, and their
            :class:`KernelPairs`.
    """

    groups: tuple[tuple[Tensor, KernelPairs], ...]

    def __post_init__(self) -> None:
        for images, pairs in self.groups:
            if not isinstance(images, Tensor) or images.dim() != 1 or images.dtype != torch.long:
                found = f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}"
                raise ValueError(f"each group's images must be an int64 Tensor[G], got {found}")
            if not isinstance(pairs, KernelPairs) or pairs.features.shape[0] != images.numel():
                raise ValueError(f"each group needs the KernelPairs of its {images.numel()} images, got "
                                 f"{type(pairs).__name__}")

    @property
    def exact(self) -> bool:
        """All pairs in every group."""
        return all(pairs.exact for _, pairs in self.groups)

    def contract(
        self, left: Tensor, right: Tensor, left_scale: Tensor | None = None, right_scale: Tensor | None = None
    ) -> Tensor:
        """:meth:`KernelPairs.contract` over the whole batch: the sum of the groups'."""
        b = sum(images.numel() for images, _ in self.groups)
        if left.dim() != 3 or left.shape[0] != b or right.shape != left.shape:
            raise ValueError(f"left and right must be the same Tensor[{b}, N, C], got {tuple(left.shape)} and "
                             f"{tuple(right.shape)}")
        total = None
        for images, pairs in self.groups:
            scales = (None if x is None else x.reshape(b, -1).index_select(0, images)
                      for x in (left_scale, right_scale))
            term = pairs.contract(left.index_select(0, images), right.index_select(0, images), *scales)
            total = term if total is None else total + term
        return total


def gaussian_(exponent: Tensor) -> Tensor:
    """``exp(exponent)`` in place (exponents <= 0), the entries below 1.5·e^20 times the dtype's smallest normal
    number (9e-30 in float32) set to exactly 0.

    ``exp`` near and products below that number take a slow path on the CPU, many times slower (a 1024-pixel
    exact filter's inference took 144 ms instead of 26 ms); what is dropped is below the rounding of any sum it
    would join (a kernel's own entry is 1). One threshold pass after the clamp: 4× faster than a mask.
    """
    if not isinstance(exponent, Tensor) or not exponent.is_floating_point():
        raise ValueError(f"exponent must be a floating-point Tensor, got {getattr(exponent, 'dtype', type(exponent))}")
    negligible = math.log(torch.finfo(exponent.dtype).tiny) + 20.0
    return F.threshold_(exponent.clamp_(min=negligible).exp_(), 1.5 * math.exp(negligible), 0.0)


def _exact_blocks(f: Tensor, valid: Tensor) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """``(rows, k_ij, (f_i - f_j)²)`` over blocks of rows of one image (f: Tensor[N, d], valid: Tensor[N] 0/1):
    yields a slice, Tensor[rows, N] (0 where i or j is off the lattice, or k negligible: :func:`gaussian_`) and
    Tensor[d, rows, N] (a feature at a time: contiguous passes)."""
    n = f.shape[0]
    features = f.T.contiguous()  # [d, N]
    for start in range(0, n, _ROW_BLOCK):
        rows = slice(start, min(start + _ROW_BLOCK, n))
        sq = (features[:, rows, None] - features[:, None, :]).square_()
        sq.clamp_(max=torch.finfo(f.dtype).max)  # far pairs: a finite square (0·inf would be NaN)
        k = gaussian_(sq.sum(0).mul_(-0.5)).mul_(valid[rows, None]).mul_(valid[None, :])
        yield rows, k, sq


@torch.no_grad()
def kernel_pairs(
    features: Tensor,
    lattice_mass: Tensor,
    valid: Tensor | None = None,
    *,
    grid: Sequence[int] | None = None,
    rates: Sequence[float] | None = None,
    exact_points: int | None = None,
    samples: int | None = None,
    seed: Tensor | None = None,
) -> KernelPairs | PairGroups:
    """Chooses and weighs the pairs of :class:`KernelPairs` for a batch of (scaled) feature maps.

    Sampling is deterministic given ``torch.manual_seed``: each image draws from its own generator, seeded by
    one draw from torch's default (CPU) generator per call and by the image's ``seed`` values
    (:func:`_image_generators`), so an image's pairs do not depend on the other images of its batch — a batch
    split over DistributedDataParallel ranks draws what one process with the whole batch draws. Seeded by the
    unscaled features, they do not depend on the bandwidths' last bits either (a DDP run's rounding of an
    averaged gradient moves those), as they would seeded by the scaled ones.

    Args:
        features: Tensor[B, N, d], scaled features ``f = s ⊙ r`` (float32 or float64).
        lattice_mass: Tensor[B, N] (or any shape of B·N values), ``(K_lattice·1)_i`` of the lattice that filters
            with these features (0 off the lattice).
        valid: Tensor[B, N] (or [B, *grid]) bool, the points on the lattice, or None (all).
        grid: the shape the N points of each image form, row-major (``(H, W)``, ``(D, H, W)``), or None: a list of
            points. Only the sampling proposal depends on it.
        rates: with ``grid``, the distance in feature space of one step along each grid axis (``spacing_a / θα``
            for the CRF's position features), assuming the features hold the positions linearly; None: uniform
            along every axis.
        exact_points: all pairs up to this many points per image (default :data:`EXACT_POINTS`).
        samples: partners per point when sampling (default :data:`SAMPLES_PER_POINT`).
        seed: Tensor[B, ...] (B·anything values, any float dtype), what each image's generator is seeded from,
            e.g. the unscaled features; None: ``features``.

    Returns:
        Exact pairs when N <= ``exact_points``, or when no image has more than ``exact_points`` valid points
        (then of those alone, packed), otherwise sampled ones. Where a padded batch holds images of both kinds,
        a :class:`PairGroups` of the two (each image's pairs are then those it has alone).
    """
    b, n, d = features.shape
    grid = (n,) if grid is None else tuple(int(x) for x in grid)
    if math.prod(grid) != n:
        raise ValueError(f"grid {grid} does not hold the {n} points of each image")
    if rates is not None and len(rates) != len(grid):
        raise ValueError(f"rates must give one value per grid axis {grid}, got {tuple(rates)}")
    if seed is not None and (not isinstance(seed, Tensor) or seed.dim() < 1 or seed.shape[0] != b
                             or seed.device != features.device):
        got = f"{tuple(seed.shape)} on {seed.device}" if isinstance(seed, Tensor) else type(seed).__name__
        raise ValueError(f"seed must be a Tensor[{b}, ...] (one row of values per image) on {features.device}, "
                         f"got {got}")
    exact_points = EXACT_POINTS if exact_points is None else exact_points
    samples = SAMPLES_PER_POINT if samples is None else samples
    # Padded images: those with few valid points get all pairs of those, also beside larger ones
    counts = None if valid is None or n <= exact_points else valid.reshape(b, n).sum(1)
    if counts is not None and bool((counts > exact_points).any()):
        small = (counts > 0) & (counts <= exact_points)
        if bool(small.any()):  # each group's pairs apart
            options = dict(grid=grid, rates=rates, exact_points=exact_points, samples=samples)
            mass = lattice_mass.reshape(b, n)
            return PairGroups(tuple(
                (images, kernel_pairs(features[images], mass[images], valid[images],
                                      seed=None if seed is None else seed[images], **options))
                for images in (small.nonzero()[:, 0], (~small).nonzero()[:, 0])
            ))
    f = features.detach()
    valid_f = f.new_ones(b, n) if valid is None else valid.reshape(b, n).to(f.dtype)
    lattice_mass = lattice_mass.detach().reshape(b, n).to(f.dtype) * valid_f
    points = None
    if counts is not None and 0 < int(counts.max()) <= exact_points:  # every image small: its valid points, packed
        points, slots = packed_points(valid_f > 0)
        f, lattice_mass = f.gather(1, points[..., None].expand(-1, -1, d)), lattice_mass.gather(1, points)
        valid_f = slots.to(f.dtype)
    if f.shape[1] <= exact_points:
        m = f.shape[1]
        gaussian_mass = torch.empty_like(valid_f)  # (K·1)_i over valid points, 0 elsewhere
        keep = b * m * m * d <= _EXACT_CACHE  # the pair weights, kept for the later filterings
        weights = f.new_empty(b, d, m, m) if keep else None
        for image in range(b):
            for rows, k, sq in _exact_blocks(f[image], valid_f[image]):
                gaussian_mass[image, rows] = k.sum(1)
                if keep:
                    torch.mul(sq, k, out=weights[image, :, rows])
        mass = _mass_ratio(lattice_mass, gaussian_mass)
        weights = None if weights is None else weights.view(b, d, m * m)
        return KernelPairs(f, valid_f, mass, weights=weights, points=points)

    generators = _image_generators(f if seed is None else seed)
    partner, log_prob = _propose(b, n, grid, rates, samples, generators)  # [B, N, S]: index in the image, log p(j|i)
    flat = partner + (torch.arange(b, device=f.device) * n)[:, None, None]  # index over the batch
    sq = (f[:, :, None, :] - f.reshape(b * n, d)[flat.view(-1)].view(b, n, samples, d)).square()  # [B, N, S, d]
    sq.clamp_(max=torch.finfo(f.dtype).max)  # far pairs: k = 0 and a finite square (0·inf would be NaN)
    both_valid = valid_f[:, :, None] * valid_f.reshape(-1)[flat.view(-1)].view(b, n, samples)
    ratio = torch.exp(-0.5 * sq.sum(-1).double() - log_prob).to(f.dtype)  # k_ij / p(j | i)
    ratio = torch.where(torch.isfinite(log_prob), ratio, 0.0) * both_valid
    not_self = partner != torch.arange(n, device=f.device)[None, :, None]
    # The self pair (k = 1, no derivative) is counted exactly in the mass rather than sampled.
    gaussian_mass = valid_f * (1.0 + (ratio * not_self).mean(-1))
    image_ratio = _mass_ratio(lattice_mass.sum(1, keepdim=True), gaussian_mass.sum(1, keepdim=True))
    mass = image_ratio * valid_f
    weights = (ratio * (mass[..., None] / samples))[..., None] * sq  # [B, N, S, d]
    columns = flat.view(-1).to(index_dtype(b * n, b * n * int(samples)))
    return KernelPairs(f, valid_f, mass, columns, weights.view(-1, d).T.contiguous())


def packed_points(valid: Tensor) -> tuple[Tensor, Tensor]:
    """The valid points of each image (bool Tensor[B, N]), packed: ``(points, slots)``, Tensor[B, V] of point
    indices, ascending (V = the most valid points of an image; an image with fewer repeats index 0 in its last
    slots), and bool Tensor[B, V], which slots hold a valid point."""
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.dim() != 2:
        raise ValueError(f"valid must be a bool Tensor[B, N], got {getattr(valid, 'dtype', type(valid).__name__)} "
                         f"{tuple(getattr(valid, 'shape', ()))}")
    counts = valid.sum(1)
    most = int(counts.max())
    slots = torch.arange(most, device=valid.device)[None, :] < counts[:, None]
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :most]  # valid points first, in order
    return torch.where(slots, order, 0), slots


def _mass_ratio(lattice_mass: Tensor, gaussian_mass: Tensor) -> Tensor:
    """``lattice_mass / gaussian_mass`` where the latter is positive, else 0 (points off the lattice)."""
    tiny = torch.finfo(lattice_mass.dtype).tiny
    return torch.where(gaussian_mass > 0, lattice_mass / gaussian_mass.clamp_min(tiny), 0.0)


def _image_generators(features: Tensor) -> list[torch.Generator]:
    """One random generator per image of Tensor[B, N, d], on the features' device, seeded by one draw from
    torch's default generator and an exact integer checksum of the image's features (their float32 bits, weighted
    by position, summed in int64: independent of the thread count and of the other images)."""
    b = features.shape[0]
    base = int(torch.randint(0, 2**62, (1,)))
    bits = features.detach().float().contiguous().view(torch.int32).reshape(b, -1).to(torch.int64)
    position = torch.arange(1, bits.shape[1] + 1, device=bits.device, dtype=torch.int64)
    checksums = (bits * position).sum(1).tolist()
    generators = []
    for checksum in checksums:
        generator = torch.Generator(device=features.device)
        generator.manual_seed((base ^ checksum) % 2**63)
        generators.append(generator)
    return generators


def _propose(
    b: int, n: int, grid: tuple[int, ...], rates: Sequence[float] | None, samples: int,
    generators: Sequence[torch.Generator],
) -> tuple[Tensor, Tensor]:
    """``samples`` partners per point from ``p(j | i) = Π_a exp(-rate_a² t_a² / 2) / Z_a(i_a)`` over the grid
    offsets ``t`` that stay inside the grid (uniform along every axis where ``rates`` is None), by inverse
    transform sampling on one float64 table of cumulative weights per axis; image i draws from ``generators[i]``.

    Returns:
        (Tensor[B, N, S] int64 partner indices within the image, Tensor[B, N, S] float64 ``log p(j | i)``; an
        offset whose weight underflows to 0 is only drawn by the rounding of a draw at the end of the interval,
        and then has ``-inf`` and gets no weight).
    """
    device = generators[0].device
    point = torch.arange(n, device=device)
    partner = point[None, :, None].repeat(b, 1, samples)
    log_prob = torch.zeros(b, n, samples, dtype=torch.float64, device=device)
    stride = 1
    for axis in reversed(range(len(grid))):  # the last axis varies fastest
        length = grid[axis]
        if length > 1:
            # Offsets t = -(L-1)..L-1 and their cumulative weights; the point at position p may move -p..L-1-p.
            offsets = torch.arange(-(length - 1), length, device=device, dtype=torch.float64)
            rate = 0.0 if rates is None else float(rates[axis])
            log_weight = -0.5 * (rate * offsets) ** 2
            cdf = torch.cat([offsets.new_zeros(1), log_weight.exp().cumsum(0)])
            first = (length - 1) - point // stride % length
            low, z = cdf[first], cdf[first + length] - cdf[first]  # [N]
            u = torch.stack([torch.rand(n, samples, generator=g, device=device, dtype=torch.float64)
                             for g in generators])
            k = torch.searchsorted(cdf, low[:, None] + u * z[:, None], right=True) - 1
            k = torch.minimum(torch.maximum(k, first[:, None]), (first + length - 1)[:, None])  # rounding at ends
            partner += (k - (length - 1)) * stride
            log_prob += log_weight[k] - z.log()[:, None]
        stride *= length
    return partner, log_prob
