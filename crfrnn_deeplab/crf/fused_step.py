"""Mean-field training iterations as single autograd nodes (``symmetric`` normalisation).

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

:func:`~crfrnn_deeplab.crf.mean_field.mean_field_step` uses it when it applies (:func:`applies`), and
:class:`~crfrnn_deeplab.crf.mean_field.MeanFieldCRF` runs its T training iterations as one node of the same
steps (:func:`fixed_bandwidth_iterations`), which also sums the T gradient terms of ``z_0`` in place. With
learned bandwidths the normalisers and θ are differentiable too: :func:`learned_iterations` runs the T
iterations as one node that also returns their gradients (see there). The tests check the outputs and every
gradient of each node against autograd's nodes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crfrnn_deeplab.crf.fast_inference import class_softmax
from crfrnn_deeplab.crf.kernels import CRFKernels
from crfrnn_deeplab.crf.products import gram
from crfrnn_deeplab.crf.spatial import gaussian_backward, gaussian_passes, spatial_gaussian

__all__ = ["applies", "fixed_bandwidth_iterations", "fixed_bandwidth_step", "learned_iterations"]


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
    if not applies(kernels):
        raise ValueError(
            "fixed_bandwidth_iterations needs the symmetric normalisation and bandwidths without gradient, got "
            f"normalization={kernels.normalization!r} and bandwidths that require grad: use mean_field_step"
        )
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    return _FixedBandwidthIterations.apply(unary, pairwise[0], pairwise[1], kernels, iterations)


def _step(unary: Tensor, logits: Tensor, kernels: CRFKernels, w_spatial: Tensor, w_bilateral: Tensor):
    """One iteration's forward: ``(z_{t+1}, q, s, lattice values)``, the last three what its backward needs."""
    b, c = unary.shape[0], unary.shape[-1]
    p = unary.numel() // c
    ns = kernels.norm_spatial.reshape(p, 1)
    folded = kernels.folded()
    q = class_softmax(logits.contiguous())
    s = spatial_gaussian(q * kernels.norm_spatial, kernels.theta_gamma, spacing=kernels.spacing).view(p, c)
    on_lattice = folded.to_lattice(q.view(b, -1, c))  # [M, C]
    out = torch.sub(unary.reshape(p, c), folded.from_lattice(on_lattice @ w_bilateral.T).view(p, c))
    out.addcmul_(ns, s @ w_spatial.T, value=-1.0)
    return out.view(unary.shape), q, s, on_lattice


def _step_backward(grad: Tensor, q: Tensor, s: Tensor, on_lattice: Tensor, kernels: CRFKernels, w_spatial: Tensor,
                   w_bilateral: Tensor, needs: tuple[bool, bool, bool]):
    """One iteration's backward for ``grad = ∂L/∂z_{t+1}``: ``(∂L/∂z_t, ∂L/∂W_s, ∂L/∂W_b)``, each None unless
    ``needs`` says so (in that order)."""
    folded = kernels.folded()
    b, c = q.shape[0], q.shape[-1]
    p = q.numel() // c
    ns = kernels.norm_spatial.reshape(p, 1)
    g = grad.contiguous().view(p, c)
    scaled = g * ns  # ns ⊙ g
    splat = folded.to_lattice(g.view(b, -1, c), blur=False)  # [M, C]
    grad_spatial = -gram(scaled, s) if needs[1] else None
    grad_bilateral = -folded.alpha * gram(splat, on_lattice) if needs[2] else None
    grad_logits = None
    if needs[0]:
        spatial = spatial_gaussian((scaled @ -w_spatial).view(q.shape), kernels.theta_gamma, spacing=kernels.spacing)
        lattice = folded.blur_lattice(splat, transpose=True) @ -w_bilateral
        grad_q = folded.from_lattice(lattice).view(p, c).addcmul_(ns, spatial.view(p, c))
        grad_logits = torch._softmax_backward_data(grad_q.view(q.shape), q, q.dim() - 1, q.dtype)
    return grad_logits, grad_spatial, grad_bilateral


class _FixedBandwidthStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unary: Tensor, logits: Tensor, w_spatial: Tensor, w_bilateral: Tensor, kernels: CRFKernels):
        out, q, s, on_lattice = _step(unary, logits, kernels, w_spatial, w_bilateral)
        ctx.kernels = kernels
        ctx.save_for_backward(q, s, on_lattice, w_spatial, w_bilateral)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        q, s, on_lattice, w_spatial, w_bilateral = ctx.saved_tensors
        grads = _step_backward(grad, q, s, on_lattice, ctx.kernels, w_spatial, w_bilateral, ctx.needs_input_grad[1:4])
        return grad, *grads, None


class _FixedBandwidthIterations(torch.autograd.Function):
    """The T iterations; each iteration's arrays (q, s, lattice values) are kept on ``ctx`` and released as the
    backward pass is done with them, as autograd releases separate nodes' (a second backward through a retained
    graph recomputes them from the inputs)."""

    @staticmethod
    def forward(ctx, unary: Tensor, w_spatial: Tensor, w_bilateral: Tensor, kernels: CRFKernels, iterations: int):
        z, ctx.iterates = _FixedBandwidthIterations.run(unary, w_spatial, w_bilateral, kernels, iterations)
        ctx.kernels, ctx.iterations = kernels, iterations
        ctx.save_for_backward(unary, w_spatial, w_bilateral)
        return z

    @staticmethod
    def run(unary, w_spatial, w_bilateral, kernels, iterations):
        """``(z_T, [(q, s, lattice values) of every iteration]``."""
        z, iterates = unary, []
        for _ in range(iterations):
            z, *kept = _step(unary, z, kernels, w_spatial, w_bilateral)
            iterates.append(kept)
        return z, iterates

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        unary, w_spatial, w_bilateral = ctx.saved_tensors
        iterates = ctx.iterates
        if iterates is None:  # released by an earlier backward pass (retain_graph=True): recomputed
            iterates = _FixedBandwidthIterations.run(unary, w_spatial, w_bilateral, ctx.kernels, ctx.iterations)[1]
        ctx.iterates = None
        need_unary, need_spatial, need_bilateral = ctx.needs_input_grad[:3]
        total = grad_spatial = grad_bilateral = None
        g = grad.contiguous()  # (the layer's output is a channels-first view: its gradient may be too)
        for t in reversed(range(ctx.iterations)):  # g = ∂L/∂z_{t+1}; z_0 appears in every z_{t+1} and as z_1's input
            q, s, on_lattice = iterates.pop()
            needs = (need_unary or t > 0, need_spatial, need_bilateral)
            g_logits, d_spatial, d_bilateral = _step_backward(g, q, s, on_lattice, ctx.kernels, w_spatial,
                                                              w_bilateral, needs)
            del q, s, on_lattice
            if need_unary:  # Σ of ∂L/∂z_{t+1} over t, and ∂L/∂z_0 through the first softmax
                total = g + g_logits if total is None else total.add_(g_logits)
            grad_spatial = _add(grad_spatial, d_spatial)
            grad_bilateral = _add(grad_bilateral, d_bilateral)
            g = g_logits
        return total, grad_spatial, grad_bilateral, None, None


def _add(total: Tensor | None, term: Tensor | None) -> Tensor | None:
    return term if total is None else total + term


def learned_iterations(unary: Tensor, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor], iterations: int) -> Tensor:
    """``iterations`` (>= 1) mean-field iterations with the ``symmetric`` normalisation as one autograd node that
    also differentiates the normalisers and the bandwidths (learned θ): the values and gradients of as many
    :func:`~crfrnn_deeplab.crf.mean_field.mean_field_step` calls through autograd's nodes.

    An iteration is ``z' = z_0 - (ns ⊙ K_s(ns ⊙ q)) W_sᵀ - nb ⊙ K_b(nb ⊙ q) W_bᵀ``. Autograd records each product
    with a normaliser as a node with a pass over the [P, C] values forward and two or three backward (the
    normaliser's gradient a row sum of a product), and adds the gradients of ``q`` and of ``z_0`` into new arrays.
    Here the bilateral normaliser is folded into the lattice's splat and slice weights (as without learned
    bandwidths), the spatial message's mix and subtraction are one matrix product into the output, the row
    products of the normalisers' gradients are accumulated over the iterations with one ``addcmul`` each and
    summed once, and the gradients of ``q`` and ``z_0`` are summed in place. The bandwidths' gradients are those of
    the separate nodes: θγ's the exact derivative of the separable filter (:func:`.spatial.gaussian_backward`),
    θα's and θβ's the kernel pairs' contraction (:meth:`.bandwidth_gradient.KernelPairs.contract`, the normaliser
    on the pair values). A normaliser's gradient is returned as 0 where the normaliser is 0 (masked voxels, whose
    normaliser is a constant the layer selects with ``torch.where``, so no gradient reaches it there).

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
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    return _LearnedIterations.apply(unary, pairwise[0], pairwise[1], kernels.norm_spatial, kernels.norm_bilateral,
                                    kernels.theta_gamma, kernels.scale, kernels, iterations)


def _divided(total: Tensor, norm: Tensor) -> Tensor:
    """``total / norm`` where ``norm > 0``, else 0 (masked voxels: their normaliser is 0 and gets no gradient)."""
    return torch.where(norm > 0, total / torch.where(norm > 0, norm, 1.0), 0.0)


class _LearnedIterations(torch.autograd.Function):
    """The T iterations; as :class:`_FixedBandwidthIterations`, each iteration's arrays are released as the backward
    pass is done with them (recomputed by a second backward through a retained graph)."""

    @staticmethod
    def forward(ctx, unary, w_spatial, w_bilateral, norm_spatial, norm_bilateral, theta_gamma, scale,
                kernels: CRFKernels, iterations: int):
        b = unary.shape[0]
        weights = norm_bilateral.detach().reshape(b, -1)
        folded = kernels.lattice.weighted(weights, weights)  # nb on both sides of the lattice
        ctx.kernels, ctx.folded, ctx.iterations, ctx.keep_states = kernels, folded, iterations, ctx.needs_input_grad[5]
        z, ctx.iterates = _LearnedIterations.run(ctx, unary, w_spatial, w_bilateral, norm_spatial, theta_gamma)
        ctx.save_for_backward(unary, w_spatial, w_bilateral, norm_spatial, norm_bilateral, theta_gamma, scale)
        return z

    @staticmethod
    def run(ctx, unary, w_spatial, w_bilateral, norm_spatial, theta_gamma):
        """``(z_T, [(q, ns ⊙ K_s(ns ⊙ q), lattice values, bilateral message, the spatial passes' inputs or None)
        of every iteration])``."""
        b, c = unary.shape[0], unary.shape[-1]
        p = unary.numel() // c
        ns = norm_spatial.reshape(p, 1)
        z, iterates = unary, []
        for _ in range(ctx.iterations):
            q = class_softmax(z.contiguous())
            a = q * norm_spatial
            if ctx.keep_states:
                k, states = gaussian_passes(a, theta_gamma, ctx.kernels.spacing)
            else:
                k, states = spatial_gaussian(a, theta_gamma, spacing=ctx.kernels.spacing), None
            spatial = k.view(p, c) * ns  # ns ⊙ K_s(ns ⊙ q)
            on_lattice = ctx.folded.to_lattice(q.view(b, -1, c))  # [M, C]
            bilateral = ctx.folded.from_lattice(on_lattice @ w_bilateral.T).view(p, c)  # nb ⊙ K_b(nb ⊙ q) W_bᵀ
            out = torch.sub(unary.reshape(p, c), bilateral).addmm_(spatial, w_spatial.T, alpha=-1.0)
            iterates.append([q, spatial, on_lattice, bilateral, states])
            z = out.view(unary.shape)
        return z, iterates

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        unary, w_spatial, w_bilateral, norm_spatial, norm_bilateral, theta_gamma, scale = ctx.saved_tensors
        iterates = ctx.iterates
        if iterates is None:  # released by an earlier backward pass (retain_graph=True): recomputed
            iterates = _LearnedIterations.run(ctx, unary, w_spatial, w_bilateral, norm_spatial, theta_gamma)[1]
        ctx.iterates = None
        kernels: CRFKernels = ctx.kernels
        need = ctx.needs_input_grad
        b, c = grad.shape[0], grad.shape[-1]
        p = grad.numel() // c
        ns, nb = norm_spatial.reshape(p, 1), norm_bilateral.reshape(p, 1)
        folded = ctx.folded
        sizes = grad.shape[1:-1]
        through = need[0] or any(need[3:7])  # gradients that need each iteration's whole backward pass
        # Row products of the normalisers' gradients, summed over the iterations (divided by the normaliser at
        # the end where the product is of the scaled array): spatial (outer, inner), bilateral (both outer).
        spatial_outer = grad.new_zeros(p, c) if need[3] else None
        spatial_inner = grad.new_zeros(p, c) if need[3] else None
        bilateral_rows = grad.new_zeros(p, c) if need[4] else None
        total = grad_ws = grad_wb = None
        grad_theta = theta_gamma.new_zeros(()) if need[5] else None
        grad_scale = scale.new_zeros(scale.shape) if need[6] else None
        g = grad.contiguous()  # (the layer's output is a channels-first view: its gradient may be too)
        for t in reversed(range(ctx.iterations)):  # g = ∂L/∂z_{t+1}
            q, spatial, on_lattice, bilateral, kept = iterates.pop()
            g2 = g.contiguous().view(p, c)
            if need[1]:
                grad_ws = _add(grad_ws, -gram(g2, spatial))
            splat = folded.to_lattice(g2.view(b, -1, c), blur=False)  # [M, C]
            if need[2]:
                grad_wb = _add(grad_wb, -folded.alpha * gram(splat, on_lattice))
            if not (through or t > 0):  # only the mixes' gradients: iteration 1 has given them
                break
            u = g2 @ w_spatial  # -∂L/∂(ns ⊙ k)
            if need[3]:
                spatial_outer.addcmul_(u, spatial)  # Σ_c u_c (ns k)_c: ns ×(-∂L/∂ns), outer product
            filtered, theta_part = gaussian_backward((u * ns).view(q.shape), theta_gamma, kept, sizes,
                                                     kernels.spacing)
            if need[5]:
                grad_theta -= theta_part
            filtered = filtered.view(p, c)  # -∂L/∂a, a = ns ⊙ q
            if need[3]:
                spatial_inner.addcmul_(filtered, q.view(p, c))
            grad_q = folded.from_lattice(folded.blur_lattice(splat, transpose=True) @ -w_bilateral).view(p, c)
            if need[4]:  # ∂L/∂nb = Σ_c [grad_q ⊙ q - g ⊙ bilateral]_c / nb
                bilateral_rows.addcmul_(grad_q, q.view(p, c)).addcmul_(g2, bilateral, value=-1.0)
            if need[6]:  # left: ∂L/∂(K_b v) mixed back, right: v = nb ⊙ q, the normaliser on the pair values
                flat = (b, -1, c)
                grad_scale += kernels.pairs.contract((g2 @ w_bilateral).view(flat), q.view(flat), nb, nb) / scale
            if t == 0 and not need[0]:  # ∂L/∂z_0 through the first softmax: not wanted
                break
            grad_q.addcmul_(ns, filtered, value=-1.0)
            g_logits = torch._softmax_backward_data(grad_q.view(q.shape), q, q.dim() - 1, q.dtype)
            if need[0]:  # z_0 is in every z_{t+1} and is z_1's input
                total = g + g_logits if total is None else total.add_(g_logits)
            g = g_logits
        grad_ns = grad_nb = None
        if need[3]:
            grad_ns = -(_divided(spatial_outer.sum(1, keepdim=True), ns) + spatial_inner.sum(1, keepdim=True))
            grad_ns = grad_ns.view(norm_spatial.shape)
        if need[4]:
            grad_nb = _divided(bilateral_rows.sum(1, keepdim=True), nb).view(norm_bilateral.shape)
        return total, grad_ws, grad_wb, grad_ns, grad_nb, grad_theta, grad_scale, None, None
