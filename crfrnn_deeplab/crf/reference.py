"""Exact O(N²) dense CRF, float64: the reference the fast layer is tested against (small images and volumes only).

Every kernel matrix is formed explicitly from the exact Gaussians of the CRF's definition (README: the CRF layer),
with no truncation and no lattice, so this is slow and memory-hungry by design, and differentiable by plain autograd
in every argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from crfrnn_deeplab.crf.fast_inference import check_iterations
from crfrnn_deeplab.crf.kernels import check_normalization

__all__ = ["DenseKernelPairs", "dense_crf", "dense_gaussian", "dense_mean_field"]


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
    dimension and guidance (README: 3-D volumes).

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
        mask = None if valid_mask is None else valid_mask[i].reshape(-1)
        z = dense_mean_field(logits[i].reshape(c, -1).T, kernels, compatibility, iterations, normalization, mask)
        out.append(z.T.reshape(c, *sizes))
    return torch.stack(out)


def dense_mean_field(
    unary: Tensor,
    kernels: Sequence[tuple[Tensor, Tensor]],
    compatibility: Tensor,
    iterations: int,
    normalization: str = "symmetric",
    valid: Tensor | None = None,
) -> Tensor:
    """Mean-field inference of one image with explicit kernel matrices: :func:`dense_crf`'s iterations, for any
    kernels (the exact Gaussians there; a lattice's explicit matrix in the benchmarks).

    Args:
        unary: Tensor[N, C], ``z_0``.
        kernels: ``(W_m, K_m)`` pairs, Tensor[C, C] and Tensor[N, N].
        compatibility: Tensor[C, C], ``μ``.
        iterations: T.
        normalization: "symmetric" or "after", with ``D = K·1`` of the masked kernel.
        valid: bool Tensor[N] or None; masked points neither send nor receive.

    Returns:
        Tensor[N, C], ``z_T``.

    Raises:
        ValueError: naming the argument whose shape, count or value does not fit.
    """
    if unary.dim() != 2:
        raise ValueError(f"unary must be a Tensor[N, C], got shape {tuple(unary.shape)}")
    n, c = unary.shape
    for weight, kernel in kernels:
        if weight.shape != (c, c) or kernel.shape != (n, n):
            raise ValueError(f"each kernel must be a (Tensor[{c}, {c}], Tensor[{n}, {n}]) pair for {n} points and "
                             f"{c} classes, got {tuple(weight.shape)} and {tuple(kernel.shape)}")
    if compatibility.shape != (c, c):
        raise ValueError(f"compatibility must be a Tensor[{c}, {c}], got {tuple(compatibility.shape)}")
    check_iterations(iterations, minimum=0)
    check_normalization(normalization)
    if valid is not None and (valid.dtype != torch.bool or valid.shape != (n,)):
        raise ValueError(f"valid must be a bool Tensor[{n}] or None, got {valid.dtype} {tuple(valid.shape)}")
    m = torch.ones(n, dtype=unary.dtype) if valid is None else valid.to(unary.dtype)
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
    return z


class DenseKernelPairs:
    """The bandwidth derivative of Gaussian filtering over all pairs, by autograd through :func:`dense_gaussian`:
    a drop-in for :class:`~crfrnn_deeplab.crf.bandwidth_gradient.KernelPairs` in tests, to define the *ideal*
    gradient of the layer's own forward pass.

    ``contract(left, right) = Σ_ij (left_i · right_j) m_ij ∂k_ij/∂(-log s_k)`` with ``k_ij`` the exact Gaussian,
    ``c_i = (K_lattice·1)_i / (K·1)_i`` each point's lattice-to-Gaussian mass ratio, and ``m_ij`` by ``mass``:

    - ``"pair"``: ``√(c_i c_j)``, the *mass-consistent* ideal and the estimator's target: the symmetric kernel
      ``√(c_i c_j) k_ij`` has (to first order in the variation of c) the lattice's row sums, and models the
      symmetric lattice's kernel better than a row scaling does.
    - ``"row"``: ``c_i``, whose row sums are exactly the lattice's but which is not symmetric.
    - ``"image"``: the ratio of the image's total masses, the same for every pair (what sampled pairs use).
    - ``"none"``: 1, the plain Gaussian derivative (the *literal* ideal; the lattice's kernel has about half
      the Gaussian's mass, so the CRF's gradient comes out about twice the exact CRF's).

    Args:
        features: Tensor[B, N, d], scaled features.
        lattice_mass: Tensor[B, N] (any shape of B·N values), ``(K_lattice·1)_i``.
        valid: Tensor of B·N bools, or None (all points valid).
        mass: "pair", "row", "image" or "none".
    """

    def __init__(self, features: Tensor, lattice_mass: Tensor, valid: Tensor | None = None, mass: str = "pair"):
        if mass not in ("pair", "row", "image", "none"):
            raise ValueError(f"mass must be 'pair', 'row', 'image' or 'none', got {mass!r}")
        b, n, _ = features.shape
        self.features, self.mass = features.detach().double(), mass
        self.lattice_mass = lattice_mass.detach().reshape(b, n).double()
        self.valid = torch.ones(b, n, dtype=torch.float64) if valid is None else valid.reshape(b, n).double()

    def ratio(self, image: int) -> Tensor:
        """``c_i`` of one image's points, Tensor[N] (0 off the lattice)."""
        v = self.valid[image]
        gaussian_mass = (dense_gaussian(self.features[image]) * v[:, None] * v[None, :]).sum(1)
        return torch.where(gaussian_mass > 0, self.lattice_mass[image] * v / gaussian_mass, 0.0)

    def pair_mass(self, image: int) -> Tensor:
        """``m_ij`` of one image, Tensor[N, N]."""
        v = self.valid[image]
        c = self.ratio(image)
        if self.mass == "pair":
            return (c[:, None] * c[None, :]).sqrt()
        if self.mass == "row":
            return c[:, None] * v[None, :]
        if self.mass == "image":
            gaussian_mass = (dense_gaussian(self.features[image]) * v[:, None] * v[None, :]).sum()
            return (self.lattice_mass[image] * v).sum() / gaussian_mass * v[:, None] * v[None, :]
        return v[:, None] * v[None, :]

    def contract(
        self, left: Tensor, right: Tensor, left_scale: Tensor | None = None, right_scale: Tensor | None = None
    ) -> Tensor:
        """Tensor[d]: see the class; left, right: Tensor[B, N, C]; left_scale, right_scale: optional per-point
        factors of left and right (B·N values), as in ``KernelPairs.contract``."""
        b, n = self.features.shape[:2]
        if left_scale is not None:
            left = left * left_scale.detach().reshape(b, n, 1)
        if right_scale is not None:
            right = right * right_scale.detach().reshape(b, n, 1)
        with torch.enable_grad():  # called from a backward pass
            log_scale = torch.zeros(self.features.shape[-1], dtype=torch.float64, requires_grad=True)
            total = 0.0
            for image in range(b):
                k = dense_gaussian(self.features[image] * log_scale.exp()) * self.pair_mass(image)
                total = total + (left[image].double() * (k @ right[image].double())).sum()
            (grad,) = torch.autograd.grad(total, log_scale)
        return (-grad).to(left.dtype)
