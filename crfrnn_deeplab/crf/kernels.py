"""The CRF's two kernel filters for one batch, built once per forward call and applied every iteration.

Krähenbühl & Koltun, NIPS 2011: the spatial (smoothness) kernel ``exp(-|p_i-p_j|² / 2θγ²)`` and the bilateral
(appearance) kernel ``exp(-|p_i-p_j|² / 2θα² - |I_i-I_j|² / 2θβ²)``, each with its normalisation ``symmetric``
``D^-½ K D^-½`` (densecrf) or ``after`` ``D^-1 K`` (the CRF-as-RNN code), ``D = K·1``. The spatial kernel is an
exact separable convolution (:mod:`.spatial`); the bilateral kernel is the permutohedral lattice (:mod:`.lattice`),
shared by every iteration, class channel, the normaliser and the backward pass. Tensors are channels-last
(``[B, *S, C]``), the layout both filters want.

Beyond 2-D RGB (README: 3-D volumes): positions span 2 or 3 spatial axes, in physical units (voxel index × ``spacing``),
and the guidance I has K >= 1 channels split into groups, each with its own θβ, so the bilateral features are
``(p·s/θα, I_g/θβ_g for each group g)``. The 2-D RGB image is the case ``S = (H, W)``, one group of 3 channels,
spacing 1.

Learned bandwidths: θγ's gradient is the exact derivative of the separable filter (:mod:`.spatial`); θα's and
θβ's are the exact Gaussian's derivative over explicit pixel pairs (:mod:`.bandwidth_gradient`), chosen once
per batch here, where the grid, its spacing and the valid mask are known, and shared by every filtering.
"""

from __future__ import annotations

import numbers
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from crfrnn_deeplab.crf.bandwidth_gradient import KernelPairs, PairGroups, kernel_pairs
from crfrnn_deeplab.crf.exact_filter import BilateralFilter, bilateral_lattice, exact_images
from crfrnn_deeplab.crf.lattice import PermutohedralLattice, lattice_gaussian
from crfrnn_deeplab.crf.products import channel_mix
from crfrnn_deeplab.crf.spatial import axis_bandwidths, gaussian_1d, spatial_gaussian
from crfrnn_deeplab.images import all_finite

__all__ = [
    "BilateralFilter",
    "CRFKernels",
    "Normalization",
    "bilateral_features",
    "bilateral_scale",
    "bilateral_pairs",
    "build_kernels",
    "check_guidance_groups",
    "check_normalization",
    "normaliser",
    "unmasked_spatial",
]

Normalization = Literal["symmetric", "after"]
_EPS = 1e-20  # densecrf's guard in D^-½


@dataclass(eq=False)
class CRFKernels:
    """The two normalised kernel filters of one batch, built once and applied every iteration.

    Attributes:
        lattice: the bilateral kernel's lattice (features ``(x/θα, y/θα, rgb/θβ)`` for an RGB image).
        raw: Tensor[B, N, S + K], the unscaled bilateral features: positions in physical units, x (the last
            axis) first as in densecrf, then the K guidance channels (``(x, y, r, g, b)`` for an RGB image).
        scale: Tensor[S + K], the inverse bandwidth of each feature, ``(1/θα ×S, 1/θβ_g for every channel of
            group g)`` (differentiable).
        theta_gamma: Tensor[], the spatial bandwidth in physical units (differentiable).
        shape: (B, *S).
        mask: Tensor[B, *S, 1] of 0/1 (valid voxels), or None.
        normalization: "symmetric" or "after".
        norm_spatial, norm_bilateral: Tensor[B, *S, 1], ``D^-½`` (symmetric) or ``D^-1`` (after), zero on
            masked voxels.
        spacing: the physical voxel size along each spatial axis (axes' order), or None (1 everywhere).
        pairs: the pixel pairs of the bilateral kernel's bandwidth gradient (:func:`bilateral_pairs`), or None
            when θα and θβ are not learned.
    """

    lattice: PermutohedralLattice
    raw: Tensor
    scale: Tensor
    theta_gamma: Tensor
    shape: tuple[int, ...]
    mask: Tensor | None
    normalization: Normalization
    norm_spatial: Tensor
    norm_bilateral: Tensor
    spacing: tuple[float, ...] | None = None
    pairs: KernelPairs | PairGroups | None = None
    _folded: PermutohedralLattice | None = None

    def bilateral(self, q: Tensor, mix: Tensor | None = None) -> Tensor:
        """Unnormalised bilateral filtering (then ``@ mix``, applied on the lattice): Tensor[B, *S, C(')]."""
        flat = q.reshape(q.shape[0], -1, q.shape[-1])
        out = lattice_gaussian(flat, self.raw, self.scale, self.lattice, mix=mix, pairs=self.pairs)
        return out.view(*q.shape[:-1], -1)

    def spatial(self, q: Tensor) -> Tensor:
        """Unnormalised spatial filtering: Tensor[B, *S, C] -> Tensor[B, *S, C]."""
        return spatial_gaussian(q, self.theta_gamma, spacing=self.spacing)

    def folded(self) -> PermutohedralLattice:
        """The lattice of ``D^-½ K D^-½`` (symmetric normalisation, the normaliser folded into splat and slice),
        built once per batch; its weights are constants (they carry no gradient)."""
        if self._folded is None:
            n = self.norm_bilateral.detach().view(self.shape[0], -1)
            self._folded = self.lattice.weighted(n, n)
        return self._folded

    def message(self, q: Tensor, pairwise: tuple[Tensor, Tensor]) -> Tensor:
        """``Σ_m (μ W_m) K̃_m q`` for ``pairwise = (μ W_spatial, μ W_bilateral)``: Tensor[B, *S, C]."""
        b, c = q.shape[0], q.shape[-1]
        ns, nb = self.norm_spatial, self.norm_bilateral
        if self.normalization == "symmetric":
            spatial = ns * self.spatial(ns * q)
            if not nb.requires_grad:  # fixed bandwidths: D^-½ K D^-½ and μ W folded into the lattice
                flat = q.reshape(b, -1, c)
                bilateral = lattice_gaussian(flat, self.raw, self.scale, self.folded(), mix=pairwise[1].T)
                return _mix(spatial, pairwise[0].T) + bilateral.view(*q.shape[:-1], -1)
            bilateral = nb * self.bilateral(nb * q, mix=pairwise[1].T)
        else:
            sent = q if self.mask is None else q * self.mask
            spatial, bilateral = ns * self.spatial(sent), nb * self.bilateral(sent, mix=pairwise[1].T)
        return _mix(spatial, pairwise[0].T) + bilateral


def _mix(values: Tensor, mix: Tensor) -> Tensor:
    """``values @ mix`` over the channels of Tensor[..., C] (:func:`.products.channel_mix`)."""
    return channel_mix(values.reshape(-1, values.shape[-1]), mix).view(*values.shape[:-1], mix.shape[1])


def check_normalization(normalization: object) -> Normalization:
    """``normalization`` if it is one of :data:`Normalization`'s values, else a ValueError naming them."""
    if normalization not in typing.get_args(Normalization):
        raise ValueError(f"normalization must be 'symmetric' or 'after', got {normalization!r}")
    return normalization


def check_guidance_groups(groups: object) -> tuple[int, ...]:
    """Guidance groups as a tuple of channel counts, each >= 1 (e.g. ``(3,)`` RGB, ``(1, 1)`` T1 + T2 MRI,
    ``(3, 1)`` RGB + depth)."""
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or len(groups) == 0:
        raise ValueError(f"guidance_groups must be a non-empty sequence of channel counts >= 1, got {groups!r}")
    for g in groups:
        if isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 1:
            raise ValueError(
                f"guidance_groups must hold channel counts >= 1 (K = their sum >= 1), got {tuple(groups)!r}"
            )
    return tuple(int(g) for g in groups)


def bilateral_features(image: Tensor, spacing: Sequence[float] | None = None) -> Tensor:
    """The unscaled bilateral features of a batch: positions in physical units, then the guidance channels.

    Args:
        image: Tensor[B, K, *S] (S of 2 or 3 axes), the guidance (the raw RGB image: K = 3).
        spacing: the voxel size along each spatial axis, in the axes' order, or None (1: positions in voxels).

    Returns:
        Tensor[B, N, S + K] (N = ∏S), contiguous: ``(x, y[, z], I_1 .. I_K)`` with x the last axis' index
        times its spacing, densecrf's order for 2-D images (x = column, y = row).
    """
    b, k, *sizes = image.shape
    dtype, device = image.dtype, image.device
    axes = torch.meshgrid(*(torch.arange(n, dtype=dtype, device=device) for n in sizes), indexing="ij")
    position = torch.stack(axes[::-1])  # [S, *S], x (the last axis) first
    if spacing is not None:
        position = position * torch.tensor(spacing[::-1], dtype=dtype, device=device).view(-1, *[1] * len(sizes))
    position = position.expand(b, len(sizes), *sizes)
    return torch.cat([position, image], 1).reshape(b, len(sizes) + k, -1).transpose(1, 2).contiguous()  # [B, N, S+K]


def bilateral_scale(
    theta_alpha: Tensor, theta_beta: Tensor, *, spatial_dims: int, guidance_groups: Sequence[int]
) -> Tensor:
    """The inverse bandwidth of every bilateral feature: Tensor[S + K], ``(1/θα ×S, 1/θβ_g ×|g| for each g)``.

    Args:
        theta_alpha: Tensor[], the position bandwidth (physical units).
        theta_beta: Tensor[] (one group) or Tensor[G], one bandwidth per guidance group (guidance units).
        spatial_dims: S.
        guidance_groups: the groups' channel counts, adding up to K.
    """
    channels = sum(guidance_groups)
    if theta_beta.dim() == 0:
        beta = (1.0 / theta_beta).expand(channels)
    else:
        if theta_beta.shape != (len(guidance_groups),):
            raise ValueError(f"theta_beta must be a Tensor[] or one value per guidance group "
                             f"{tuple(guidance_groups)}, got shape {tuple(theta_beta.shape)}")
        sizes = torch.tensor(guidance_groups, device=theta_beta.device)
        beta = (1.0 / theta_beta).repeat_interleave(sizes, output_size=channels)
    return torch.cat([(1.0 / theta_alpha).expand(spatial_dims), beta])


@torch.compiler.disable  # the lattice and the normalisers: eager even inside a compiled model (see build_lattice)
def build_kernels(
    image: Tensor,
    *,
    theta_alpha: Tensor,
    theta_beta: Tensor,
    theta_gamma: Tensor,
    valid_mask: Tensor | None = None,
    normalization: Normalization = "symmetric",
    guidance_groups: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    bilateral_filter: BilateralFilter = "auto",
) -> CRFKernels:
    """Builds the bilateral lattice (or exact filter) and both normalisers for a batch.

    Args:
        image: Tensor[B, K, *S], floating point: the raw RGB image in 0–255 (K = 3, S = (H, W)), or any guidance
            (S = (H, W) or (D, H, W)).
        theta_alpha: Tensor[], the bilateral position bandwidth (physical units: voxels times ``spacing``).
        theta_beta: Tensor[] (all K channels one group) or Tensor[G] (one per guidance group), in the
            guidance's units.
        theta_gamma: Tensor[], the spatial bandwidth (physical units).
        valid_mask: Tensor[B, *S] bool, or None (all valid).
        normalization: "symmetric" (densecrf) or "after" (CRF-as-RNN).
        guidance_groups: the channel counts of the guidance groups (adding up to K), or None: one group.
        spacing: the voxel size along each spatial axis (axes' order), or None (1).
        bilateral_filter: "lattice": the permutohedral lattice (densecrf's filter); "exact": the exact Gaussian
            (:mod:`.exact_filter`, memory B·N²); "auto": exact for each image of at most
            :data:`~crfrnn_deeplab.crf.exact_filter.EXACT_FILTER_POINTS` valid pixels, the lattice for larger
            ones (:func:`~crfrnn_deeplab.crf.exact_filter.exact_images`; a batch of both takes one lattice of
            both filters, :func:`~crfrnn_deeplab.crf.exact_filter.bilateral_lattice`).

    Returns:
        The kernels, ready for :func:`~crfrnn_deeplab.crf.mean_field.mean_field_step`.
    """
    b, k, *sizes = image.shape
    dtype, device = image.dtype, image.device
    check_normalization(normalization)
    if valid_mask is not None:
        valid_mask = valid_mask.contiguous()  # the filters view it flat: a transposed mask is a mask too
    if image.requires_grad:
        raise ValueError("the guidance image requires grad, but the CRF does not differentiate its guidance (the "
                         "kernels' features): pass image.detach()")
    theta_alpha, theta_beta, theta_gamma = _check_bandwidths(theta_alpha, theta_beta, theta_gamma, dtype)
    raw = bilateral_features(image, spacing)  # [B, N, S + K]
    groups = (k,) if guidance_groups is None else tuple(guidance_groups)
    scale = bilateral_scale(theta_alpha, theta_beta, spatial_dims=len(sizes), guidance_groups=groups).to(dtype)
    features = raw.new_empty(b, raw.shape[2], raw.shape[1])  # [B, S + K, N]: N-contiguous, the lattice's layout
    torch.mul(raw.transpose(1, 2), scale.detach()[:, None], out=features)
    if not all_finite(features):
        if not all_finite(image):
            raise ValueError("the guidance image contains NaN or infinite values")
        raise ValueError(f"the bilateral features (positions / theta_alpha, guidance / theta_beta) overflow {dtype}: "
                         f"theta_alpha={float(theta_alpha.detach()):.6g} and theta_beta={theta_beta.detach().tolist()} are too "
                         f"small for these positions (spacing {spacing}) and guidance values")
    exact = exact_images(bilateral_filter, b, raw.shape[1], valid_mask)
    lattice = bilateral_lattice(features, valid_mask, exact)

    mask = None if valid_mask is None else valid_mask.to(dtype)[..., None]  # [B, *S, 1]
    ones = torch.ones(b, *sizes, 1, dtype=dtype, device=device) if mask is None else mask
    theta_gamma = theta_gamma.to(dtype)
    spacing = None if spacing is None else tuple(float(s) for s in spacing)
    kernels = CRFKernels(lattice, raw, scale, theta_gamma, (b, *sizes), mask, normalization, ones, ones, spacing)
    if torch.is_grad_enabled() and scale.requires_grad:
        kernels.pairs = bilateral_pairs(lattice, raw, scale, sizes, valid_mask, spacing)
    # D = K·1 over valid voxels; for an unmasked batch the spatial one is an outer product of 1-D sums.
    if mask is None:
        d_spatial = unmasked_spatial(theta_gamma, (b, *sizes), "ones", spacing=spacing)
    else:
        d_spatial = kernels.spatial(ones)
    d_bilateral = kernels.bilateral(ones)
    kernels.norm_spatial = normaliser(d_spatial, mask, normalization)
    kernels.norm_bilateral = normaliser(d_bilateral, mask, normalization)
    return kernels


def _check_bandwidths(theta_alpha: object, theta_beta: object, theta_gamma: object,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The three bandwidths as tensors (numbers are taken too), or a ValueError naming each one that is not a
    finite value > 0 in ``dtype`` (where a bandwidth of 1e-50 is 0 and one of 1e39 infinite in float32)."""
    thetas = [t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=dtype)
              for t in (theta_alpha, theta_beta, theta_gamma)]
    for name, t in zip(("theta_alpha", "theta_beta", "theta_gamma"), thetas):
        if not t.is_floating_point() or t.dim() > (1 if name == "theta_beta" else 0):
            raise ValueError(f"{name} must be a floating-point Tensor[]{'(or [G])' if name == 'theta_beta' else ''}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    values = [t.detach().to(dtype) for t in thetas]
    good = torch.stack([(torch.isfinite(v) & (v > 0)).all() for v in values]).tolist()
    bad = [f"{name}={v.tolist()}" for name, v, ok in zip(("theta_alpha", "theta_beta", "theta_gamma"), values, good)
           if not ok]
    if bad:
        raise ValueError(f"bandwidths must be finite and > 0 in {dtype}, got {', '.join(bad)}")
    return thetas[0], thetas[1], thetas[2]


def bilateral_pairs(
    lattice: PermutohedralLattice,
    raw: Tensor,
    scale: Tensor,
    sizes: Sequence[int],
    valid_mask: Tensor | None,
    spacing: Sequence[float] | None,
) -> KernelPairs | PairGroups:
    """The pixel (voxel) pairs of the bilateral kernel's bandwidth gradient (:mod:`.bandwidth_gradient`).

    Sampled partners follow the position Gaussian along each grid axis, whose rate is ``spacing_a / θα`` per
    voxel step: the position features are the first S of ``raw`` (x, the last axis, first).

    Args:
        lattice: the bilateral lattice of ``raw * scale``.
        raw: Tensor[B, N, S + K], the unscaled features (:func:`bilateral_features`).
        scale: Tensor[S + K], their inverse bandwidths.
        sizes: the grid S, axes' order.
        valid_mask: Tensor[B, *S] bool, or None.
        spacing: the voxel size per axis (axes' order), or None (1).
    """
    s = len(sizes)
    steps = [1.0] * s if spacing is None else [float(v) for v in spacing]
    position_scale = scale.detach()[:s].flip(0).tolist()  # axes' order
    rates = [step * r for step, r in zip(steps, position_scale)]
    with torch.no_grad():
        mass = lattice.filter(raw.new_ones(raw.shape[0], raw.shape[1], 1))[..., 0]  # K_lattice·1
        return kernel_pairs(raw * scale.detach(), mass, valid_mask, grid=tuple(sizes), rates=rates, seed=raw)


def unmasked_spatial(
    theta: Tensor, shape: Sequence[int], of: Literal["ones", "rsqrt"], *, spacing: Sequence[float] | None = None
) -> Tensor:
    """``K_s(1)`` (= D) or ``K_s(D^-½)`` of an unmasked batch of ``shape`` (B, *S), Tensor[B, *S, 1], from 1-D
    filterings: ``K_s`` of an outer product is the outer product of the filtered factors, and ``D`` is one."""
    b, *sizes = shape
    outer = None
    for length, axis_theta in zip(sizes, axis_bandwidths(theta, len(sizes), spacing)):
        factor = gaussian_1d(torch.ones(length, dtype=theta.dtype, device=theta.device), axis_theta)
        if of == "rsqrt":
            factor = gaussian_1d(factor.rsqrt(), axis_theta)
        outer = factor if outer is None else outer[..., None] * factor
    return outer.expand(b, *sizes)[..., None]


def normaliser(d: Tensor, valid: Tensor | None, normalization: Normalization) -> Tensor:
    """``D^-½`` or ``D^-1`` on valid pixels, exactly 0 on masked ones (``valid`` None: every pixel valid).

    Masked pixels far from any valid one have ``D`` = 0 up to rounding (the lattice's barycentric weights can be
    -1e-9 in float32), where ``D^-½`` would be NaN and 0·NaN stays NaN: select instead of multiplying.
    """
    d = d.clamp_min(0.0) + _EPS
    value = d.rsqrt() if normalization == "symmetric" else d.reciprocal()
    return value if valid is None else torch.where(valid > 0, value, torch.zeros_like(value))
