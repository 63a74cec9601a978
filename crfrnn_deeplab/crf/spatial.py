"""Exact Gaussian filtering over pixel positions (the CRF's spatial kernel), by separable convolution.

The spatial kernel ``k(i, j) = exp(-|p_i - p_j|² / 2θγ²)`` depends on positions only, so it factorises into
a row and a column filter. Both are depthwise convolutions on channels-last memory, which is what the
mean-field CRF keeps its tensors in. Taps are kept to ``truncate · θ`` pixels (and never further than the
image reaches, where taps only meet zero padding), so the filter is exact up to ``exp(-truncate² / 2)``.
Gradients w.r.t. θ come from autograd through the taps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["channel_blocks", "gaussian_1d", "gaussian_taps", "spatial_gaussian"]

TRUNCATE = 4.0
# On the CPU the depthwise convolutions cost least per channel in blocks of 16 channels (a multiple of the
# vector width), so wider maps are filtered 16 channels at a time.
_CPU_BLOCK = 16


def gaussian_taps(theta: Tensor, length: int, *, truncate: float = TRUNCATE) -> Tensor:
    """Taps ``exp(-t² / 2θ²)`` for ``t = -r..r``, ``r = min(ceil(truncate·θ), length - 1)``.

    Args:
        theta: Tensor[] bandwidth in pixels (differentiable).
        length: image extent along the filtered axis.

    Returns:
        Tensor[2r + 1].
    """
    radius = min(math.ceil(truncate * float(theta.detach())), length - 1)
    t = torch.arange(-radius, radius + 1, dtype=theta.dtype, device=theta.device)
    return torch.exp(-0.5 * (t / theta) ** 2)


def spatial_gaussian(
    values: Tensor,
    theta: Tensor,
    *,
    truncate: float = TRUNCATE,
) -> Tensor:
    """``out_i = Σ_j exp(-|p_i - p_j|² / 2θ²) v_j`` over the pixel grid (zero outside the image).

    Args:
        values: Tensor[B, H, W, C] (channels last; any number of channels).
        theta: Tensor[] bandwidth in pixels, > 0.

    Returns:
        Tensor[B, H, W, C], contiguous.
    """
    b, h, w, c = values.shape
    x = values.permute(0, 3, 1, 2)  # [B, C, H, W] view of channels-last memory
    row = gaussian_taps(theta, w, truncate=truncate).to(values.dtype)
    col = gaussian_taps(theta, h, truncate=truncate).to(values.dtype)
    row = row.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous()  # depthwise: one filter per channel
    x = F.conv2d(x, row, padding=[0, row.shape[-1] // 2], groups=c)
    # The column pass mixes rows only, so a row of W pixels × C channels may be read as W·C/L pixels × L
    # channels: fewer than _CPU_BLOCK channels fill the vector lanes that way.
    lanes = _CPU_BLOCK if c < _CPU_BLOCK and (w * c) % _CPU_BLOCK == 0 else c
    x = x.permute(0, 2, 3, 1).reshape(b, h, w * c // lanes, lanes).permute(0, 3, 1, 2)
    col = col.view(1, 1, -1, 1).expand(lanes, 1, -1, 1).contiguous()
    x = F.conv2d(x, col, padding=[col.shape[-2] // 2, 0], groups=lanes)
    return x.permute(0, 2, 3, 1).reshape(b, h, w, c).contiguous()


def gaussian_1d(values: Tensor, theta: Tensor, *, truncate: float = TRUNCATE) -> Tensor:
    """The spatial Gaussian along one axis, zero outside: Tensor[L] -> Tensor[L].

    ``spatial_gaussian`` of an outer product ``a bᵀ`` is ``gaussian_1d(a) gaussian_1d(b)ᵀ``: the normalisers of
    an unmasked image are computed this way, in O(H + W).
    """
    if values.dim() != 1 or not values.is_floating_point():
        raise ValueError(f"values must be a floating-point Tensor[L], got {tuple(values.shape)} {values.dtype}")
    taps = gaussian_taps(theta, values.numel(), truncate=truncate).to(values.dtype)
    return F.conv1d(values.view(1, 1, -1), taps.view(1, 1, -1), padding=taps.numel() // 2).view(-1)


def channel_blocks(num_channels: int, device: torch.device) -> list[tuple[int, int, int]]:
    """How to split C channels for :func:`spatial_gaussian`'s fastest layout: ``(start, stop, first)`` blocks.

    Each block filters channels ``start:stop`` together and owns the results for ``first:stop``. On the CPU:
    blocks of 16, the remainder in a last block of 8 or 16 that ends at C (overlapping the one before, so no
    zero padding is filtered); elsewhere, or for C <= 16, one block.
    """
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"num_channels must be an int >= 1, got {num_channels!r}")
    if torch.device(device).type != "cpu" or num_channels <= _CPU_BLOCK:
        return [(0, num_channels, 0)]
    blocks = [(start, start + _CPU_BLOCK, start) for start in range(0, num_channels - _CPU_BLOCK + 1, _CPU_BLOCK)]
    done = blocks[-1][1]
    if done < num_channels:
        width = _CPU_BLOCK // 2 if num_channels - done <= _CPU_BLOCK // 2 else _CPU_BLOCK
        blocks.append((num_channels - width, num_channels, done))
    return blocks
