"""Exact Gaussian filtering over voxel positions (the CRF's spatial kernel), by separable convolution.

The spatial kernel ``k(i, j) = exp(-|(p_i - p_j)·s|² / 2θγ²)`` (positions p in voxels, s the physical spacing of
each axis) depends on positions only, so it factorises into one 1-D filter per axis with bandwidth ``θγ / s_a``
voxels along axis a. Every pass is a depthwise convolution on channels-last memory, which is what the
mean-field CRF keeps its tensors in; 2-D images and 3-D volumes share the passes. Taps are kept to
``truncate · θ`` voxels (and never further than the image reaches, where taps only meet zero padding), so the
filter is exact up to ``exp(-truncate² / 2)``. The gradient w.r.t. θ is the exact derivative of the truncated
taps, applied as more separable passes (:class:`_SpatialGaussian`; autograd's route, the weight gradient of a
depthwise convolution, costs several times more on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from crfrnn_deeplab.crf.routes import cpu_route

__all__ = [
    "axis_bandwidths", "gaussian_1d", "gaussian_backward", "gaussian_passes", "gaussian_taps",
    "spatial_gaussian",
]

TRUNCATE = 4.0
# The CPU's vector width in float32 values (AVX-512): a leading-axis convolution of fewer channels reads its rows as
# pixels × 16 channels (:func:`_leading_axis`).
_CPU_BLOCK = 16
# Output rows per block of the banded passes along a leading axis (:func:`_banded_rows`), and the fewest values
# per image they run for: below, the products are too small for their per-call cost (the H pass of a 96³ volume,
# 96 images of 96 × 288 values, took 2.5× the convolution's time).
_BAND_ROWS = 16
_BAND_MIN_VALUES = 1 << 17


def gaussian_taps(theta: Tensor, length: int, *, truncate: float = TRUNCATE) -> Tensor:
    """Taps ``exp(-t² / 2θ²)`` for ``t = -r..r``, ``r = min(ceil(truncate·θ), length - 1)``.

    Args:
        theta: Tensor[] bandwidth in pixels (differentiable).
        length: image extent along the filtered axis.

    Returns:
        Tensor[2r + 1].
    """
    value = float(theta.detach())
    if not (math.isfinite(value) and value > 0 and math.isfinite(truncate) and truncate > 0):
        raise ValueError(f"the spatial Gaussian needs a bandwidth (theta / spacing along an axis, in voxels) and a "
                         f"truncation that are finite and > 0, got {value!r} and {truncate!r}")
    radius = min(math.ceil(truncate * value), length - 1)
    t = torch.arange(-radius, radius + 1, dtype=theta.dtype, device=theta.device)
    with torch.no_grad():
        taps = torch.exp(-0.5 * (t / theta) ** 2)
        if not theta.requires_grad:
            return taps
        # autograd's chain through t / θ would multiply a tap's 0 by an infinite 1 / θ² for a tiny θ (NaN)
        slope = _tap_slopes(taps, theta, theta)
    return taps + slope * (theta - theta.detach())  # the taps' values, with the exact derivative w.r.t. θ


def _tap_slopes(taps: Tensor, theta_axis: Tensor, theta: Tensor) -> Tensor:
    """``∂taps/∂θ = taps · (t / θ_a)² / θ`` for taps of bandwidth ``θ_a = θ / spacing_a`` along their axis (t: the
    taps' offsets), exactly 0 where a tap is 0: there ``(t / θ_a)²`` may overflow to inf, and 0 · inf is NaN. Where
    a tap is > 0, ``(t / θ_a)² < 1500``."""
    t = torch.arange(taps.numel(), dtype=taps.dtype, device=taps.device) - taps.numel() // 2
    return torch.where(taps > 0, taps * (t / theta_axis).square() / theta, 0.0)


def spatial_gaussian(
    values: Tensor,
    theta: Tensor,
    *,
    spacing: Sequence[float] | None = None,
    truncate: float = TRUNCATE,
    out: Tensor | None = None,
) -> Tensor:
    """``out_i = Σ_j exp(-|(p_i - p_j)·s|² / 2θ²) v_j`` over the voxel grid (zero outside the image).

    Args:
        values: Tensor[B, H, W, C] or Tensor[B, D, H, W, C] (channels last; any number of channels).
        theta: Tensor[] (or a number) bandwidth in physical units (voxels when ``spacing`` is None), finite and > 0.
        spacing: the physical size of a voxel along each spatial axis, in the axes' order (``(s_D, s_H, s_W)``
            or ``(s_H, s_W)``); None: 1 along every axis.
        truncate: the taps reach ``truncate · θ`` (finite and > 0; the default 4 leaves out ``exp(-8)``, 3.4e-4,
            of the kernel's peak).
        out: a contiguous tensor of the values' shape and dtype, not overlapping them, to write the result into
            (the last pass writes there directly); not while autograd records.

    Returns:
        Tensor of the shape of ``values``, contiguous (``out`` when given).
    """
    _check_values(values)
    if not isinstance(theta, Tensor):  # a number
        theta = torch.tensor(float(theta), dtype=values.dtype, device=values.device)
    grad = torch.is_grad_enabled() and (theta.requires_grad or values.requires_grad)
    if out is not None:
        _check_out(out, values, grad)
    if grad:  # (the passes write into views)
        spacing = None if spacing is None else tuple(float(s) for s in spacing)
        return _SpatialGaussian.apply(values, theta, spacing, truncate)
    x = values
    passes = _passes(theta, values.shape[1:-1], spacing, truncate)
    for i, (axis, taps) in enumerate(passes):
        x = _axis_pass(x, taps, axis, out if i == len(passes) - 1 else None)
    return x


def _check_values(values: Tensor) -> None:
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise TypeError(f"values must be a floating-point Tensor, got {getattr(values, 'dtype', type(values).__name__)}")
    if values.dim() not in (4, 5):
        raise ValueError(f"values must be a Tensor[B, H, W, C] or [B, D, H, W, C], got {tuple(values.shape)}")


def _check_out(out: Tensor, values: Tensor, grad: bool) -> None:
    if grad:
        raise ValueError("spatial_gaussian: out= cannot be used while autograd records the filter")
    if not isinstance(out, Tensor) or out.shape != values.shape or out.dtype != values.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"spatial_gaussian: out must be a tensor of the values' shape {tuple(values.shape)} and "
                         f"dtype {values.dtype}, got {got}")
    if not out.is_contiguous() or out.device != values.device:
        raise ValueError("spatial_gaussian: out must be contiguous and on the values' device")
    if out.untyped_storage().data_ptr() == values.untyped_storage().data_ptr():
        low, high = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
        v_low, v_high = values.data_ptr(), values.data_ptr() + values.numel() * values.element_size()
        if low < v_high and v_low < high:
            raise ValueError("spatial_gaussian: out overlaps the values")


def axis_bandwidths(theta: Tensor, spatial_dims: int, spacing: Sequence[float] | None) -> list[Tensor]:
    """The bandwidth in voxels along each spatial axis, ``θ / s_a`` (θ itself where ``spacing`` is None)."""
    if spacing is None:
        return [theta] * spatial_dims
    if len(spacing) != spatial_dims:
        raise ValueError(f"spacing must give {spatial_dims} values (one per spatial axis), got {tuple(spacing)}")
    return [theta / float(s) for s in spacing]


def _passes(
    theta: Tensor, sizes: Sequence[int], spacing: Sequence[float] | None, truncate: float
) -> list[tuple[int, Tensor]]:
    """The 1-D passes of the separable filter in the order they run: ``(axis, taps)`` from the last spatial axis
    (the rows' own, W) to the first; ``taps`` in θ's dtype, differentiable w.r.t. θ."""
    thetas = axis_bandwidths(theta, len(sizes), spacing)
    return [(a, gaussian_taps(thetas[a], sizes[a], truncate=truncate)) for a in reversed(range(len(sizes)))]


def _leading_axis(x: Tensor, taps: Tensor, c: int, out: Tensor | None = None) -> Tensor:
    """Filters channels-last values viewed as Tensor[B, L, M] (M = the rest × C channels) along axis 1 with
    ``taps`` (Tensor[2r + 1], zero outside).

    The pass mixes whole rows of M values only. On the CPU, for images of at least _BAND_MIN_VALUES values, it is
    a banded matrix product (:func:`_banded_rows`); otherwise a depthwise convolution, where a row may be read as
    M/lanes pixels × lanes channels: fewer than _CPU_BLOCK channels fill the vector lanes that way. Returns
    Tensor[B, L, M] (not necessarily contiguous; ``out``, a contiguous Tensor[B, L, M], when given).
    """
    taps = taps.to(x.dtype)
    b, length, m = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    if cpu_route(x.device) and length * m >= _BAND_MIN_VALUES:
        return _banded_rows(x.reshape(b, length, m).contiguous(), taps, out)
    lanes = _CPU_BLOCK if c < _CPU_BLOCK and m % _CPU_BLOCK == 0 else c
    x = x.reshape(b, length, m // lanes, lanes).permute(0, 3, 1, 2)
    taps = taps.view(1, 1, -1, 1).expand(lanes, 1, -1, 1).contiguous()
    x = F.conv2d(x, taps, padding=[taps.shape[-2] // 2, 0], groups=lanes)
    x = x.permute(0, 2, 3, 1).reshape(b, length, m)
    return x if out is None else out.copy_(x)


def _banded_rows(x: Tensor, taps: Tensor, out: Tensor | None = None) -> Tensor:
    """``out[:, i] = Σ_t taps[t] · x[:, i + t - r]`` (zero outside) for contiguous Tensor[B, L, M], as products of
    a band of the filter's Toeplitz matrix with blocks of rows.

    Every block of :data:`_BAND_ROWS` output rows is the same ``[rows, rows + 2r]`` band times the ``rows + 2r``
    input rows around it, so the interior blocks are one batched matrix product over overlapping windows of the
    input (a strided view: nothing is copied or padded); the blocks at the ends, whose windows leave the image,
    take the columns of the band that stay inside. A matrix product fills the CPU's vector units for any M and
    keeps its operands in cache, where the depthwise convolution fills them only when the channels are a multiple
    of the vector width and streams 2r + 1 rows per output row: though the band's zeros make ``rows + 2r``
    multiplications per value of the 2r + 1, ``python benchmarks/bench_spatial.py`` (2026-11-30, one thread)
    measured 0.31× the convolution's time for 500×375 × 21 channels at θ = 3, 0.70× for 16, 0.85× for 8, 0.20×
    at θ = 8, with bitwise equal float32 results in every case.
    """
    b, length, m = x.shape
    r = taps.numel() // 2
    rows = _BAND_ROWS
    out = torch.empty_like(x) if out is None else out
    first = -(-r // rows)  # the first block whose window starts inside the image
    stop = (length - r) // rows  # one past the last block whose window ends inside it
    edges = [(0, length)]
    if stop > first:
        band = _toeplitz(taps, rows, rows + 2 * r, 0)
        count, start = stop - first, first * rows
        windows = x.as_strided((b, count, rows + 2 * r, m), (length * m, rows * m, m, 1),
                               x.storage_offset() + (start - r) * m)
        for image in range(b):
            torch.matmul(band, windows[image], out=out[image, start : stop * rows].view(count, rows, m))
        edges = [(0, start), (stop * rows, length)]
    for low, high in edges:  # output rows [low, high) from input rows [low - r, high + r) inside the image
        if high > low:
            begin, end = max(low - r, 0), min(high + r, length)
            part = _toeplitz(taps, high - low, end - begin, r + begin - low)
            for image in range(b):
                torch.matmul(part, x[image, begin:end], out=out[image, low:high])
    return out


def _toeplitz(taps: Tensor, rows: int, columns: int, shift: int) -> Tensor:
    """Tensor[rows, columns] with entry ``(i, k) = taps[k - i + shift]`` where that index lies in the taps, else 0."""
    index = torch.arange(columns, device=taps.device)[None, :] - torch.arange(rows, device=taps.device)[:, None]
    index = index + shift
    inside = (index >= 0) & (index < taps.numel())
    return torch.where(inside, taps[index.clamp(0, taps.numel() - 1)], taps.new_zeros(()))


def gaussian_1d(values: Tensor, theta: Tensor, *, truncate: float = TRUNCATE) -> Tensor:
    """The spatial Gaussian along one axis, zero outside: Tensor[L] -> Tensor[L].

    ``spatial_gaussian`` of an outer product ``a bᵀ`` is ``gaussian_1d(a) gaussian_1d(b)ᵀ``: the normalisers of
    an unmasked image are computed this way, in O(H + W).
    """
    if values.dim() != 1 or not values.is_floating_point():
        raise ValueError(f"values must be a floating-point Tensor[L], got {tuple(values.shape)} {values.dtype}")
    taps = gaussian_taps(theta, values.numel(), truncate=truncate).to(values.dtype)
    return F.conv1d(values.view(1, 1, -1), taps.view(1, 1, -1), padding=taps.numel() // 2).view(-1)


def _axis_pass(values: Tensor, taps: Tensor, axis: int, out: Tensor | None = None) -> Tensor:
    """Filters channels-last Tensor[B, *S, C] along spatial axis ``axis`` (0-based among S) with ``taps``
    (Tensor[2r + 1], zero outside the grid): returns a contiguous tensor of the same shape (``out`` when given).

    The last axis (W) is a depthwise convolution along the width of the ``[B', C, H, W]`` view of the
    channels-last memory (B' = B times any leading axes); any other axis mixes whole rows of the values after
    it (:func:`_leading_axis`).
    """
    shape = values.shape
    taps = taps.to(values.dtype)
    if axis == len(shape) - 3:
        c, r = shape[-1], taps.numel() // 2
        x = values.reshape(-1, *shape[-3:]).permute(0, 3, 1, 2)  # [B', C, H, W] view
        x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), padding=[0, r], groups=c)
        x = x.permute(0, 2, 3, 1)
        return x.reshape(shape).contiguous() if out is None else out.copy_(x.reshape(shape))
    before, after = math.prod(shape[: 1 + axis]), math.prod(shape[2 + axis :])  # after includes C
    rows = None if out is None else out.view(before, shape[1 + axis], after)
    return _leading_axis(values.reshape(before, shape[1 + axis], after), taps, shape[-1], rows).reshape(shape).contiguous()


def gaussian_passes(
    values: Tensor, theta: Tensor, spacing: Sequence[float] | None = None, truncate: float = TRUNCATE
) -> tuple[Tensor, list[Tensor]]:
    """:func:`spatial_gaussian` without autograd, keeping what :func:`gaussian_backward` needs for θ's gradient:
    ``(K v, [x_1, ..., x_S])``, the inputs of the S separable passes (``x_1 = v``)."""
    _check_values(values)
    states = [values]
    for axis, taps in _passes(theta.detach(), values.shape[1:-1], spacing, truncate):
        states.append(_axis_pass(states[-1], taps, axis))
    return states[-1], states[:-1]


def gaussian_backward(
    grad: Tensor,
    theta: Tensor,
    states: Sequence[Tensor] | None,
    sizes: Sequence[int],
    spacing: Sequence[float] | None = None,
    truncate: float = TRUNCATE,
) -> tuple[Tensor, Tensor | None]:
    """The backward pass of :func:`spatial_gaussian` for ``grad`` = ∂L/∂(K v): ``(K grad, ∂L/∂θ)``, the latter
    None when ``states`` (from :func:`gaussian_passes`) is None. See :class:`_SpatialGaussian` for the formula."""
    _check_values(grad)
    if tuple(grad.shape[1:-1]) != tuple(sizes) or (states is not None and len(states) != len(sizes)):
        raise ValueError(f"grad {tuple(grad.shape)} and {0 if states is None else len(states)} states do not match "
                         f"the filtered grid {tuple(sizes)} (one state per spatial axis, or None)")
    theta_d = theta.detach()
    passes = _passes(theta_d, sizes, spacing, truncate)
    thetas = axis_bandwidths(theta_d, len(sizes), spacing)
    total = grad.new_zeros(())
    suffix = grad.contiguous()  # P_{s+1} ··· P_S g, from s = S down to 1; then K g
    for (axis, taps), state in zip(reversed(passes), reversed(states or [None] * len(passes))):
        if states is not None:
            derivative = _tap_slopes(taps, thetas[axis], theta_d)
            total = total + torch.dot(suffix.reshape(-1), _axis_pass(state, derivative, axis).reshape(-1))
        suffix = _axis_pass(suffix, taps, axis)
    return suffix, (None if states is None else total.to(theta.dtype).reshape(theta.shape))


class _SpatialGaussian(torch.autograd.Function):
    """:func:`spatial_gaussian` with the exact θ-derivative of the truncated filter, by separable passes.

    The forward pass runs the 1-D passes ``P_1, ..., P_S`` (symmetric; :func:`_passes`' order) and keeps its
    partial results ``x_s = P_{s-1} ··· P_1 v`` (``x_1 = v``). With ``P'_s = ∂P_s/∂θ`` (the taps' derivative
    ``exp(-t² / 2θ_a²) (t / θ_a)² / θ`` at a fixed radius, ``θ_a = θ / spacing_a``)::

        ∂/∂θ Σ g·(K v) = Σ_s (P_{s+1} ··· P_S g) · P'_s x_s

    and the gradient w.r.t. the values is ``K g = P_1 ··· P_S g``, whose partial products (the passes in reverse
    order) are the left factors: 2S passes in all, S of them the values' gradient that autograd would run anyway.
    """

    @staticmethod
    def forward(ctx, values: Tensor, theta: Tensor, spacing: tuple[float, ...] | None, truncate: float) -> Tensor:
        out, states = gaussian_passes(values, theta, spacing, truncate)
        ctx.spacing, ctx.truncate, ctx.sizes = spacing, truncate, values.shape[1:-1]
        ctx.save_for_backward(theta, *(states if ctx.needs_input_grad[1] else ()))  # states: for ∂/∂θ only
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        theta, *states = ctx.saved_tensors
        grad_values, grad_theta = gaussian_backward(grad, theta, states if ctx.needs_input_grad[1] else None,
                                                    ctx.sizes, ctx.spacing, ctx.truncate)
        return grad_values if ctx.needs_input_grad[0] else None, grad_theta, None, None
