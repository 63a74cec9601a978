"""Exact O(N²) dense CRF, float64: the reference the fast layer is tested against (small images only).

Every kernel matrix is formed explicitly from the exact Gaussians of DESIGN §2 (no truncation, no lattice),
so this is slow and memory-hungry by design, and differentiable by plain autograd in every argument.
"""

from __future__ import annotations

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
) -> Tensor:
    """Mean-field inference of the fully-connected CRF with explicit kernel matrices.

    Args:
        logits: Tensor[B, C, H, W] unary logits ``z_0``.
        image: Tensor[B, 3, H, W] raw RGB 0–255.
        spatial_weight, bilateral_weight, compatibility: Tensor[C, C] (``W_m`` and ``μ``).
        theta_alpha, theta_beta, theta_gamma: Tensor[] bandwidths.
        iterations: T.
        normalization: "symmetric" or "after".
        valid_mask: Tensor[B, H, W] bool or None.

    Returns:
        Tensor[B, C, H, W] logits ``z_T``.
    """
    b, c, h, w = logits.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=logits.dtype), torch.arange(w, dtype=logits.dtype), indexing="ij"
    )
    pos = torch.stack([xs, ys], -1).reshape(-1, 2)  # [N, 2]
    out = []
    for i in range(b):
        rgb = image[i].reshape(3, -1).T.to(logits.dtype)  # [N, 3]
        kernels = [
            (spatial_weight, dense_gaussian(pos / theta_gamma)),
            (bilateral_weight, dense_gaussian(torch.cat([pos / theta_alpha, rgb / theta_beta], 1))),
        ]
        m = torch.ones(h * w, dtype=logits.dtype) if valid_mask is None else valid_mask[i].reshape(-1).to(logits.dtype)
        unary = logits[i].reshape(c, -1).T  # [N, C]
        z = unary
        for _ in range(iterations):
            q = torch.softmax(z, -1) * m[:, None]
            message = torch.zeros_like(unary)
            for weight, k in kernels:
                k = k * m[:, None] * m[None, :]
                d = k.sum(1, keepdim=True)
                if normalization == "symmetric":
                    n = torch.where(m[:, None] > 0, d.clamp_min(1e-300).rsqrt(), 0.0)
                    filtered = n * (k @ (n * q))
                else:
                    filtered = torch.where(m[:, None] > 0, (k @ q) / d.clamp_min(1e-300), 0.0)
                message = message + filtered @ (compatibility @ weight).T
            z = unary - message
        out.append(z.T.reshape(c, h, w))
    return torch.stack(out)
