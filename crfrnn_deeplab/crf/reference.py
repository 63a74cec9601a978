"""Exact O(N²) dense CRF, float64: the reference the fast layer is tested against (small images and volumes only).

Every kernel matrix is formed explicitly from the exact Gaussians of DESIGN §2 (no truncation, no lattice),
so this is slow and memory-hungry by design, and differentiable by plain autograd in every argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["dense_gaussian", "dense_crf"]


def dense_gaussian(features: Tensor) -> Tensor:
    """``K_ij = exp(-|f_i - f_j|² / 2)`` for features Tensor[N, d] (already divided by bandwidths): Tensor[N, N]."""
    diff = features[:, None, :] - features[None, :, :]
    return torch.exp(-0.5 * (diff * diff).sum(-1))


def dense_crf(
    logits: Tensor,
    image: Tensor,
    *,
    spatial_weight: Tensor,
    bilateral_weight: Tensor,
    compatibility: Tensor,
    theta_alpha: Tensor,
    theta_beta: Tensor,
    theta_gamma: Tensor,
    iterations: int,
    normalization: str = "symmetric",
    valid_mask: Tensor | None = None,
    guidance_groups: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
) -> Tensor:
    """Mean-field inference of the fully-connected CRF with explicit kernel matrices, for any spatial
    dimension and guidance (DESIGN §4).

    Args:
        logits: Tensor[B, C, *S] unary logits ``z_0`` (S: any number of spatial axes).
        image: Tensor[B, K, *S] guidance (raw RGB 0–255 for the default CRF).
        spatial_weight, bilateral_weight, compatibility: Tensor[C, C] (``W_m`` and ``μ``).
        theta_alpha, theta_gamma: Tensor[] bandwidths in physical units (voxels × ``spacing``).
        theta_beta: Tensor[] (one guidance group) or Tensor[G] (one per group of ``guidance_groups``).
        iterations: T.
        normalization: "symmetric" or "after".
        valid_mask: Tensor[B, *S] bool or None.
        guidance_groups: the channel counts of the guidance groups (adding up to K); None: one group.
        spacing: the voxel size along each spatial axis (axes' order); None: 1.

    Returns:
        Tensor[B, C, *S] logits ``z_T``.
    """
    b, c, *sizes = logits.shape
    k = image.shape[1]
    axes = torch.meshgrid(*(torch.arange(n, dtype=logits.dtype) for n in sizes), indexing="ij")
    pos = torch.stack(axes, -1).reshape(-1, len(sizes))  # [N, S], the axes' order (the kernel ignores it)
    if spacing is not None:
        pos = pos * torch.tensor(spacing, dtype=logits.dtype)
    groups = (k,) if guidance_groups is None else tuple(guidance_groups)
    beta = theta_beta.expand(len(groups)) if theta_beta.dim() == 0 else theta_beta
    beta = torch.cat([beta[g].expand(n) for g, n in enumerate(groups)])  # [K], each channel's group bandwidth
    out = []
    for i in range(b):
        guidance = image[i].reshape(k, -1).T.to(logits.dtype)  # [N, K]
        kernels = [
            (spatial_weight, dense_gaussian(pos / theta_gamma)),
            (bilateral_weight, dense_gaussian(torch.cat([pos / theta_alpha, guidance / beta], 1))),
        ]
        m = torch.ones(pos.shape[0], dtype=logits.dtype)
        if valid_mask is not None:
            m = valid_mask[i].reshape(-1).to(logits.dtype)
        unary = logits[i].reshape(c, -1).T  # [N, C]
        z = unary
        for _ in range(iterations):
            q = torch.softmax(z, -1) * m[:, None]
            message = torch.zeros_like(unary)
            for weight, kernel in kernels:
                kernel = kernel * m[:, None] * m[None, :]
                d = kernel.sum(1, keepdim=True)
                if normalization == "symmetric":
                    n = torch.where(m[:, None] > 0, d.clamp_min(1e-300).rsqrt(), 0.0)
                    filtered = n * (kernel @ (n * q))
                else:
                    filtered = torch.where(m[:, None] > 0, (kernel @ q) / d.clamp_min(1e-300), 0.0)
                message = message + filtered @ (compatibility @ weight).T
            z = unary - message
        out.append(z.T.reshape(c, *sizes))
    return torch.stack(out)
