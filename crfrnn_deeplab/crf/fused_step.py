"""Mean-field training iterations as one autograd node (``symmetric`` normalisation).

An iteration is ``z' = z_0 - (ns ⊙ K_s(ns ⊙ q)) W_sᵀ - nb ⊙ K_b(nb ⊙ q) W_bᵀ`` (``q = softmax(z)``). Autograd
records it as a dozen nodes with a pass over the [P, C] values each (the normalisers' products, the sum of the
two messages, the subtraction, their gradients' negation and accumulation) and adds the gradients of ``q`` and
of ``z_0`` into new arrays. :class:`_Iterations` computes the same values and gradients for T iterations with
fewer passes:

- forward: the bilateral normaliser is folded into the lattice's splat and slice weights
  (:meth:`~crfrnn_deeplab.crf.kernels.CRFKernels.folded`); the spatial row scaling commutes with the mix,
  ``(ns ⊙ s) W_sᵀ = ns ⊙ (s W_sᵀ)``, so the spatial message is one matrix product and one ``addcmul`` into
  ``z_0 - bilateral``;
- backward, for ``g = ∂L/∂z'``: ``∂L/∂W_s = -(ns ⊙ g)ᵀ s``, ``∂L/∂W_b = -α (splat g)ᵀ (lattice values)``, and
  ``∂L/∂q = -ns ⊙ K_s((ns ⊙ g) W_s) - slice(blurᵀ(splat g) W_b)`` (``K_s`` is symmetric, the folded lattice
  transposable); the gradients of ``z_0`` (one term per iteration) are summed in place;
- with learned bandwidths the normalisers and θ are differentiable too: the normalisers' gradients (row sums of
  products) are accumulated over the iterations with one ``addcmul`` per term and summed once; θγ's gradient is
  the exact derivative of the separable filter (:func:`.spatial.gaussian_backward`), θα's and θβ's the kernel
  pairs' contraction (:meth:`.bandwidth_gradient.KernelPairs.contract`, the normaliser on the pair values), as
  through the separate nodes.

:func:`~crfrnn_deeplab.crf.mean_field.mean_field_step` runs one iteration through it when the bandwidths are fixed
(:func:`applies`, :func:`fixed_bandwidth_step`); :class:`~crfrnn_deeplab.crf.mean_field.MeanFieldCRF` runs its T
training iterations through it (:func:`fixed_bandwidth_iterations`, :func:`learned_iterations`). The tests check
the outputs and every gradient against autograd's nodes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crfrnn_deeplab.crf.fast_inference import check_iterations, class_softmax
from crfrnn_deeplab.crf.kernels import CRFKernels
from crfrnn_deeplab.crf.products import gram
from crfrnn_deeplab.crf.spatial import gaussian_backward, gaussian_passes, spatial_gaussian

__all__ = ["applies", "check_iterations", "fixed_bandwidth_iterations", "fixed_bandwidth_step", "learned_iterations"]


def applies(kernels: CRFKernels) -> bool:
    """Whether :func:`fixed_bandwidth_step` computes this batch's iteration: symmetric normalisation and no
    gradient wanted for the bandwidths (nor, therefore, the normalisers)."""
    return kernels.normalization == "symmetric" and not _bandwidths_learned(kernels)


def _bandwidths_learned(kernels: CRFKernels) -> bool:
    """Whether the bandwidths, and so the normalisers, want a gradient."""
    depend_on_bandwidths = (kernels.norm_spatial, kernels.norm_bilateral, kernels.theta_gamma, kernels.scale)
    return any(t.requires_grad for t in depend_on_bandwidths)


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
    _require_fixed(kernels, "fixed_bandwidth_step")
    return _apply(unary, logits, kernels, pairwise, 1)


def fixed_bandwidth_iterations(unary: Tensor, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor],
                               iterations: int) -> Tensor:
    """``iterations`` (>= 1) mean-field iterations from ``z_0 = unary`` as one autograd node (:func:`applies` must
    hold): the values and gradients of as many :func:`fixed_bandwidth_step` calls.

    One node for the whole loop sums the gradient w.r.t. ``z_0`` (one term per iteration) in place, where
    autograd would add each iteration's term into a new [P, C] array; each iteration's backward is the same.

    Args:
        unary: Tensor[B, *S, C], ``z_0``.
        kernels: the batch's kernel filters.
        pairwise: ``(μ W_spatial, μ W_bilateral)``, each Tensor[C, C].
        iterations: T >= 1.

    Returns:
        Tensor[B, *S, C], ``z_T``.
    """
    _require_fixed(kernels, "fixed_bandwidth_iterations")
    check_iterations(iterations)
    return _apply(unary, None, kernels, pairwise, iterations)


def learned_iterations(unary: Tensor, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor], iterations: int) -> Tensor:
    """``iterations`` (>= 1) mean-field iterations with the ``symmetric`` normalisation as one autograd node that
    also differentiates the normalisers and the bandwidths (learned θ): the values and gradients of as many
    :func:`~crfrnn_deeplab.crf.mean_field.mean_field_step` calls through autograd's nodes (see the module).

    A normaliser's gradient is returned as 0 where the normaliser is 0 (masked voxels, whose normaliser is a
    constant the layer selects with ``torch.where``, so no gradient reaches it there).

    Args:
        unary: Tensor[B, *S, C], ``z_0``.
        kernels: the batch's kernel filters, ``symmetric`` normalisation.
        pairwise: ``(μ W_spatial, μ W_bilateral)``, each Tensor[C, C].
        iterations: T >= 1.

    Returns:
        Tensor[B, *S, C], ``z_T``.
    """
    if kernels.normalization != "symmetric":
        raise ValueError(f"learned_iterations needs the symmetric normalisation, got {kernels.normalization!r}")
    check_iterations(iterations)
    return _apply(unary, None, kernels, pairwise, iterations)


def _require_fixed(kernels: CRFKernels, caller: str) -> None:
    """Raises where :func:`applies` does not hold, naming what fails."""
    if applies(kernels):
        return
    found = [] if kernels.normalization == "symmetric" else [f"normalization={kernels.normalization!r}"]
    if _bandwidths_learned(kernels):
        found.append("bandwidths that require grad")
    raise ValueError(f"{caller} needs the symmetric normalisation and bandwidths without gradient, got "
                     f"{' and '.join(found)}: use mean_field_step")


def _apply(unary: Tensor, logits: Tensor | None, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor],
           iterations: int) -> Tensor:
    return _Iterations.apply(unary, logits, pairwise[0], pairwise[1], kernels.norm_spatial, kernels.norm_bilateral,
                             kernels.theta_gamma, kernels.scale, kernels, iterations)


def _divided(total: Tensor, norm: Tensor) -> Tensor:
    """``total / norm`` where ``norm > 0``, else 0 (masked voxels: their normaliser is 0 and gets no gradient)."""
    return torch.where(norm > 0, total / torch.where(norm > 0, norm, 1.0), 0.0)


def _add(total: Tensor | None, term: Tensor | None) -> Tensor | None:
    return term if total is None else total + term


class _Iterations(torch.autograd.Function):
    """T iterations from ``z_0 = unary``, the first one's softmax taken of ``logits`` (None: of ``unary``).

    ``norm_bilateral`` must be the kernels' own (the forward filters through ``kernels.folded()``). Each
    iteration's arrays are kept on ``ctx`` and released as the backward pass is done with them, as autograd
    releases separate nodes' (a second backward through a retained graph recomputes them from the inputs).
    """

    @staticmethod
    def forward(ctx, unary, logits, w_spatial, w_bilateral, norm_spatial, norm_bilateral, theta_gamma, scale,
                kernels: CRFKernels, iterations: int):
        need = ctx.needs_input_grad
        ctx.kernels, ctx.iterations = kernels, iterations
        ctx.keep_states, ctx.keep_bilateral = need[6], need[5]  # for θγ's gradient; for nb's
        z, ctx.iterates = _Iterations.run(ctx, unary, logits, w_spatial, w_bilateral, norm_spatial, theta_gamma)
        ctx.save_for_backward(unary, logits, w_spatial, w_bilateral, norm_spatial, norm_bilateral, theta_gamma, scale)
        return z

    @staticmethod
    def run(ctx, unary, logits, w_spatial, w_bilateral, norm_spatial, theta_gamma):
        """``(z_T, [(q, K_s(ns ⊙ q), lattice values, bilateral message or None, the spatial passes' inputs or None)
        of every iteration])``."""
        b, c = unary.shape[0], unary.shape[-1]
        p = unary.numel() // c
        ns = norm_spatial.reshape(p, 1)
        folded = ctx.kernels.folded()  # nb on both sides of the lattice
        z, iterates = (unary if logits is None else logits), []
        for _ in range(ctx.iterations):
            q = class_softmax(z.contiguous())
            a = q * norm_spatial
            if ctx.keep_states:
                k, states = gaussian_passes(a, theta_gamma, ctx.kernels.spacing)
            else:
                k, states = spatial_gaussian(a, theta_gamma, spacing=ctx.kernels.spacing), None
            del a
            k = k.view(p, c)
            on_lattice = folded.to_lattice(q.view(b, -1, c))  # [M, C]
            bilateral = folded.from_lattice(on_lattice @ w_bilateral.T).view(p, c)  # nb ⊙ K_b(nb ⊙ q) W_bᵀ
            # the row scaling commutes with the mix: (ns ⊙ k) W_sᵀ = ns ⊙ (k W_sᵀ)
            out = torch.sub(unary.reshape(p, c), bilateral).addcmul_(ns, k @ w_spatial.T, value=-1.0)
            iterates.append([q, k, on_lattice, bilateral if ctx.keep_bilateral else None, states])
            z = out.view(unary.shape)
            del q, k, on_lattice, bilateral, states, out
        return z, iterates

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        unary, logits, w_spatial, w_bilateral, norm_spatial, norm_bilateral, theta_gamma, scale = ctx.saved_tensors
        iterates = ctx.iterates
        if iterates is None:  # released by an earlier backward pass (retain_graph=True): recomputed
            iterates = _Iterations.run(ctx, unary, logits, w_spatial, w_bilateral, norm_spatial, theta_gamma)[1]
        ctx.iterates = None
        kernels: CRFKernels = ctx.kernels
        need = ctx.needs_input_grad
        b, c = grad.shape[0], grad.shape[-1]
        p = grad.numel() // c
        ns, nb = norm_spatial.reshape(p, 1), norm_bilateral.reshape(p, 1)
        folded = kernels.folded()
        sizes = grad.shape[1:-1]
        first_softmax = need[0] if logits is None else need[1]  # ∂L/∂(the first iteration's input)
        through = need[0] or first_softmax or any(need[4:8])  # gradients that need every iteration's whole backward
        # Row products of the normalisers' gradients, summed over the iterations (divided by the normaliser at
        # the end where the product is of the scaled array): spatial (outer, inner), bilateral (both outer).
        spatial_outer = grad.new_zeros(p, c) if need[4] else None
        spatial_inner = grad.new_zeros(p, c) if need[4] else None
        bilateral_rows = grad.new_zeros(p, c) if need[5] else None
        grad_ws = grad_wb = grad_logits = None
        grad_theta = theta_gamma.new_zeros(()) if need[6] else None
        grad_scale = scale.new_zeros(scale.shape) if need[7] else None
        total, own = None, False  # Σ_t ∂L/∂z_{t+1} (z_0 is in every z_{t+1}); own: an array of ours, added in place

        def add_to_unary(term: Tensor) -> None:
            nonlocal total, own
            if total is None:  # the incoming gradient is not ours to change; a contiguous copy of it is
                total, own = term, term is not grad
            elif own:
                total.add_(term)
            else:
                total, own = total + term, True

        g = grad.contiguous()  # (the layer's output is a channels-first view: its gradient may be too)
        for t in reversed(range(ctx.iterations)):  # g = ∂L/∂z_{t+1}
            q, k, on_lattice, bilateral, kept = iterates.pop()
            if need[0]:
                add_to_unary(g)
            g2 = g.view(p, c)
            scaled = g2 * ns  # ns ⊙ g
            if need[2]:
                grad_ws = _add(grad_ws, -gram(scaled, k))
            splat = folded.to_lattice(g2.view(b, -1, c), blur=False)  # [M, C]
            if need[3]:
                grad_wb = _add(grad_wb, -folded.alpha * gram(splat, on_lattice))
            if not (through or t > 0):  # only the mixes' gradients: iteration 1 has given them
                break
            e = scaled @ w_spatial  # -∂L/∂k = ns ⊙ (g W_s)
            del scaled  # (each array is let go at its last use: the peak holds fewer [P, C] arrays)
            if need[4]:
                spatial_outer.addcmul_(e, k)  # Σ_c e_c k_c = ns ×(-∂L/∂ns), outer product
            if need[6]:
                filtered, theta_part = gaussian_backward(e.view(q.shape), theta_gamma, kept, sizes, kernels.spacing)
                grad_theta -= theta_part
            else:
                filtered = spatial_gaussian(e.view(q.shape), theta_gamma, spacing=kernels.spacing)
            filtered = filtered.view(p, c)  # -∂L/∂a, a = ns ⊙ q
            del e
            if need[4]:
                spatial_inner.addcmul_(filtered, q.view(p, c))
            grad_q = folded.from_lattice(folded.blur_lattice(splat, transpose=True) @ -w_bilateral).view(p, c)
            if need[5]:  # ∂L/∂nb = Σ_c [grad_q ⊙ q - g ⊙ bilateral]_c / nb
                bilateral_rows.addcmul_(grad_q, q.view(p, c)).addcmul_(g2, bilateral, value=-1.0)
            if need[7]:  # left: ∂L/∂(K_b v) mixed back, right: v = nb ⊙ q, the normaliser on the pair values
                flat = (b, -1, c)
                grad_scale += kernels.pairs.contract((g2 @ w_bilateral).view(flat), q.view(flat), nb, nb) / scale
            if t == 0 and not first_softmax:
                break
            grad_q.addcmul_(ns, filtered, value=-1.0)
            del filtered, g2, g, k, on_lattice, bilateral, kept
            g = torch._softmax_backward_data(grad_q.view(q.shape), q, q.dim() - 1, q.dtype)  # ∂L/∂z_t
            del grad_q, q
            if t == 0:
                if logits is None:
                    add_to_unary(g)
                else:
                    grad_logits = g
        grad_ns = grad_nb = None
        if need[4]:
            grad_ns = -(_divided(spatial_outer.sum(1, keepdim=True), ns) + spatial_inner.sum(1, keepdim=True))
            grad_ns = grad_ns.view(norm_spatial.shape)
        if need[5]:
            grad_nb = _divided(bilateral_rows.sum(1, keepdim=True), nb).view(norm_bilateral.shape)
        return total, grad_logits, grad_ws, grad_wb, grad_ns, grad_nb, grad_theta, grad_scale, None, None
