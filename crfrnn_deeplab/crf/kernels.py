"""The CRF's two kernel filters for one batch, built once per forward call and applied every iteration.

Krähenbühl & Koltun, NIPS 2011: the spatial (smoothness) kernel ``exp(-|p_i-p_j|² / 2θγ²)`` and the bilateral
(appearance) kernel ``exp(-|p_i-p_j|² / 2θα² - |I_i-I_j|² / 2θβ²)``, each with its normalisation ``symmetric``
``D^-½ K D^-½`` (densecrf) or ``after`` ``D^-1 K`` (the CRF-as-RNN code), ``D = K·1``. The spatial kernel is an
exact separable convolution (:mod:`.spatial`); the bilateral kernel is the permutohedral lattice (:mod:`.lattice`),
shared by every iteration, class channel, the normaliser and the backward pass. Tensors are channels-last
(``[B, H, W, C]``), the layout both filters want.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from crfrnn_deeplab.crf.lattice import PermutohedralLattice, build_lattice, lattice_gaussian
from crfrnn_deeplab.crf.spatial import gaussian_1d, spatial_gaussian

__all__ = ["CRFKernels", "Normalization", "build_kernels", "normaliser", "unmasked_spatial"]

Normalization = Literal["symmetric", "after"]
_EPS = 1e-20  # densecrf's guard in D^-½


@dataclass(eq=False)
class CRFKernels:
    """The two normalised kernel filters of one batch, built once and applied every iteration.

    Attributes:
        lattice: the bilateral kernel's lattice (features ``(x/θα, y/θα, rgb/θβ)``).
        raw: Tensor[B, N, 5], the unscaled bilateral features ``(x, y, r, g, b)``.
        scale: Tensor[5], ``(1/θα, 1/θα, 1/θβ, 1/θβ, 1/θβ)`` (differentiable).
        theta_gamma: Tensor[], the spatial bandwidth (differentiable).
        shape: (B, H, W).
        mask: Tensor[B, H, W, 1] of 0/1 (valid pixels), or None.
        normalization: "symmetric" or "after".
        norm_spatial, norm_bilateral: Tensor[B, H, W, 1], ``D^-½`` (symmetric) or ``D^-1`` (after), zero on
            masked pixels.
    """

    lattice: PermutohedralLattice
    raw: Tensor
    scale: Tensor
    theta_gamma: Tensor
    shape: tuple[int, int, int]
    mask: Tensor | None
    normalization: Normalization
    norm_spatial: Tensor
    norm_bilateral: Tensor
    _folded: PermutohedralLattice | None = None

    def bilateral(self, q: Tensor, mix: Tensor | None = None) -> Tensor:
        """Unnormalised bilateral filtering (then ``@ mix``, applied on the lattice): Tensor[B, H, W, C(')]."""
        b, h, w, c = q.shape
        out = lattice_gaussian(q.reshape(b, h * w, c), self.raw, self.scale, self.lattice, mix=mix)
        return out.view(b, h, w, -1)

    def spatial(self, q: Tensor) -> Tensor:
        """Unnormalised spatial filtering: Tensor[B, H, W, C] -> Tensor[B, H, W, C]."""
        return spatial_gaussian(q, self.theta_gamma)

    def message(self, q: Tensor, pairwise: tuple[Tensor, Tensor]) -> Tensor:
        """``Σ_m (μ W_m) K̃_m q`` for ``pairwise = (μ W_spatial, μ W_bilateral)``: Tensor[B, H, W, C]."""
        b, h, w, c = q.shape
        ns, nb = self.norm_spatial, self.norm_bilateral
        if self.normalization == "symmetric":
            spatial = ns * self.spatial(ns * q)
            if not nb.requires_grad:  # fixed bandwidths: D^-½ K D^-½ and μ W folded into the lattice
                if self._folded is None:
                    n = nb.view(b, -1)
                    self._folded = self.lattice.weighted(n, n)
                flat = q.reshape(b, h * w, c)
                bilateral = lattice_gaussian(flat, self.raw, self.scale, self._folded, mix=pairwise[1].T)
                return spatial @ pairwise[0].T + bilateral.view(b, h, w, -1)
            bilateral = nb * self.bilateral(nb * q, mix=pairwise[1].T)
        else:
            sent = q if self.mask is None else q * self.mask
            spatial, bilateral = ns * self.spatial(sent), nb * self.bilateral(sent, mix=pairwise[1].T)
        return spatial @ pairwise[0].T + bilateral


@torch.compiler.disable  # the lattice and the normalisers: eager even inside a compiled model (see build_lattice)
def build_kernels(
    image: Tensor,
    *,
    theta_alpha: Tensor,
    theta_beta: Tensor,
    theta_gamma: Tensor,
    valid_mask: Tensor | None = None,
    normalization: Normalization = "symmetric",
) -> CRFKernels:
    """Builds the bilateral lattice and both normalisers for a batch.

    Args:
        image: Tensor[B, 3, H, W], raw RGB in 0–255, floating point.
        theta_alpha, theta_beta: Tensor[] bilateral bandwidths (pixels, intensity units).
        theta_gamma: Tensor[] spatial bandwidth (pixels).
        valid_mask: Tensor[B, H, W] bool, or None (all valid).
        normalization: "symmetric" (densecrf) or "after" (CRF-as-RNN).

    Returns:
        The kernels, ready for :func:`~crfrnn_deeplab.crf.mean_field.mean_field_step`.
    """
    b, _, h, w = image.shape
    dtype, device = image.dtype, image.device
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=dtype, device=device), torch.arange(w, dtype=dtype, device=device), indexing="ij"
    )
    position = torch.stack([xs, ys]).expand(b, 2, h, w)  # densecrf's order: x (column), y (row)
    raw = torch.cat([position, image], 1).reshape(b, 5, h * w).transpose(1, 2).contiguous()  # [B, N, 5]
    scale = torch.cat([(1.0 / theta_alpha).expand(2), (1.0 / theta_beta).expand(3)]).to(dtype)
    lattice = build_lattice((raw * scale.detach()).transpose(1, 2), valid_mask)

    mask = None if valid_mask is None else valid_mask.to(dtype)[..., None]  # [B, H, W, 1]
    ones = torch.ones(b, h, w, 1, dtype=dtype, device=device) if mask is None else mask
    theta_gamma = theta_gamma.to(dtype)
    kernels = CRFKernels(lattice, raw, scale, theta_gamma, (b, h, w), mask, normalization, ones, ones)
    # D = K·1 over valid pixels; for an unmasked image the spatial one is an outer product of 1-D sums.
    d_spatial = unmasked_spatial(theta_gamma, b, h, w, "ones") if mask is None else kernels.spatial(ones)
    d_bilateral = kernels.bilateral(ones)
    kernels.norm_spatial = normaliser(d_spatial, ones, normalization)
    kernels.norm_bilateral = normaliser(d_bilateral, ones, normalization)
    return kernels


def unmasked_spatial(theta: Tensor, b: int, h: int, w: int, of: Literal["ones", "rsqrt"]) -> Tensor:
    """``K_s(1)`` (= D) or ``K_s(D^-½)`` of an unmasked image, Tensor[B, H, W, 1], from 1-D filterings:
    ``K_s`` of an outer product is the outer product of the filtered factors, and ``D`` = ``r cᵀ`` is one."""
    r = gaussian_1d(torch.ones(h, dtype=theta.dtype, device=theta.device), theta)
    c = gaussian_1d(torch.ones(w, dtype=theta.dtype, device=theta.device), theta)
    if of == "rsqrt":
        r, c = gaussian_1d(r.rsqrt(), theta), gaussian_1d(c.rsqrt(), theta)
    return (r[:, None] * c[None, :]).expand(b, h, w)[..., None]


def normaliser(d: Tensor, valid: Tensor, normalization: Normalization) -> Tensor:
    """``D^-½`` or ``D^-1`` on valid pixels, exactly 0 on masked ones.

    Masked pixels far from any valid one have ``D`` = 0 up to rounding (the lattice's barycentric weights can be
    -1e-9 in float32), where ``D^-½`` would be NaN and 0·NaN stays NaN: select instead of multiplying.
    """
    d = d.clamp_min(0.0) + _EPS
    value = d.rsqrt() if normalization == "symmetric" else d.reciprocal()
    return torch.where(valid > 0, value, torch.zeros_like(value))
