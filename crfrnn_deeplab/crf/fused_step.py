"""One mean-field iteration as a single autograd node, for training with fixed bandwidths.

With the bandwidths fixed (the kernels and their normalisers are constants of the batch) and the ``symmetric``
normalisation, an iteration ``z' = z_0 - (ns ⊙ K_s(ns ⊙ q)) W_sᵀ - K̃_b(q) W_bᵀ`` (``q = softmax(z)``, ``K̃_b``
the lattice with ``nb`` folded into its splat and slice) is differentiable w.r.t. ``z_0``, ``z`` and the two
C×C matrices only. Autograd records it as a dozen nodes with a pass over the [P, C] values each (the
normalisers' products, the sum of the two messages, the subtraction, their gradients' negation and
accumulation); :class:`_FixedBandwidthStep` computes the same values and gradients with fewer passes:

- forward: the row scaling commutes with the mix, ``(ns ⊙ s) W_sᵀ = ns ⊙ (s W_sᵀ)``, so the spatial message is
  one matrix product and one ``addcmul`` into ``z_0 - bilateral``;
- backward, for ``g = ∂L/∂z'``: ``∂L/∂W_s = -(ns ⊙ g)ᵀ s``, ``∂L/∂W_b = -α (splat g)ᵀ (lattice values)``, and
  ``∂L/∂q = -ns ⊙ K_s((ns ⊙ g) W_s) - slice(blurᵀ(splat g) W_b)``, the signs carried by the C×C matrices
  (``K_s`` is symmetric, the folded lattice transposable).

:func:`~crfrnn_deeplab.crf.mean_field.mean_field_step` uses it when it applies (:func:`applies`); the tests check
its outputs and every gradient against the autograd path's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crfrnn_deeplab.crf.fast_inference import class_softmax
from crfrnn_deeplab.crf.kernels import CRFKernels
from crfrnn_deeplab.crf.spatial import spatial_gaussian

__all__ = ["applies", "fixed_bandwidth_step"]


def applies(kernels: CRFKernels) -> bool:
    """Whether :func:`fixed_bandwidth_step` computes this batch's iteration: symmetric normalisation and no
    gradient wanted for the bandwidths (nor, therefore, the normalisers)."""
    constant = (kernels.norm_spatial, kernels.norm_bilateral, kernels.theta_gamma, kernels.scale)
    return kernels.normalization == "symmetric" and not any(t.requires_grad for t in constant)


def fixed_bandwidth_step(unary: Tensor, logits: Tensor, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor]) -> Tensor:
    """``z_0 - Σ_m (μ W_m) K̃_m softmax(z_t)`` as one autograd node (:func:`applies` must hold).

    Args:
        unary: Tensor[B, *S, C], ``z_0``.
        logits: Tensor[B, *S, C], ``z_t``.
        kernels: the batch's kernel filters.
        pairwise: ``(μ W_spatial, μ W_bilateral)``, each Tensor[C, C].

    Returns:
        Tensor[B, *S, C], ``z_{t+1}``.

    Raises:
        ValueError: where the node does not compute the iteration (learned bandwidths or ``after``
            normalisation: its gradients would miss the normalisers', its forward the other normalisation).
    """
    if not applies(kernels):
        raise ValueError(
            "fixed_bandwidth_step needs the symmetric normalisation and bandwidths without gradient, got "
            f"normalization={kernels.normalization!r} and bandwidths that require grad: use mean_field_step"
        )
    return _FixedBandwidthStep.apply(unary, logits, pairwise[0], pairwise[1], kernels)


class _FixedBandwidthStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unary: Tensor, logits: Tensor, w_spatial: Tensor, w_bilateral: Tensor, kernels: CRFKernels):
        b, c = unary.shape[0], unary.shape[-1]
        p = unary.numel() // c
        ns = kernels.norm_spatial.reshape(p, 1)
        folded = kernels.folded()
        q = class_softmax(logits.contiguous())
        s = spatial_gaussian(q * kernels.norm_spatial, kernels.theta_gamma, spacing=kernels.spacing).view(p, c)
        on_lattice = folded.to_lattice(q.view(b, -1, c))  # [M, C]
        out = torch.sub(unary.reshape(p, c), folded.from_lattice(on_lattice @ w_bilateral.T).view(p, c))
        out.addcmul_(ns, s @ w_spatial.T, value=-1.0)
        ctx.kernels = kernels
        ctx.save_for_backward(q, s, on_lattice, w_spatial, w_bilateral)
        return out.view(unary.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        q, s, on_lattice, w_spatial, w_bilateral = ctx.saved_tensors
        kernels: CRFKernels = ctx.kernels
        folded = kernels.folded()
        b, c = q.shape[0], q.shape[-1]
        p = q.numel() // c
        ns = kernels.norm_spatial.reshape(p, 1)
        g = grad.contiguous().view(p, c)
        scaled = g * ns  # ns ⊙ g
        splat = folded.to_lattice(g.view(b, -1, c), blur=False)  # [M, C]
        grad_spatial = -(scaled.T @ s) if ctx.needs_input_grad[2] else None
        grad_bilateral = -folded.alpha * (splat.T @ on_lattice) if ctx.needs_input_grad[3] else None
        grad_logits = None
        if ctx.needs_input_grad[1]:
            spatial = spatial_gaussian((scaled @ -w_spatial).view(q.shape), kernels.theta_gamma,
                                       spacing=kernels.spacing)
            lattice = folded.blur_lattice(splat, transpose=True) @ -w_bilateral
            grad_q = folded.from_lattice(lattice).view(p, c).addcmul_(ns, spatial.view(p, c))
            grad_logits = torch._softmax_backward_data(grad_q.view(q.shape), q, q.dim() - 1, q.dtype)
        return grad, grad_logits, grad_spatial, grad_bilateral, None
