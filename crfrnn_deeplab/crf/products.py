"""Products of tall value arrays (Tensor[N, C], N pixels or lattice vertices, C classes) that the CPU's default
matrix product runs slowly: the Gram product ``aᵀ b``, the gradient of a C×C channel mix.

``aᵀ b`` of two [N, 21] arrays is one matrix product with a reduction over all N rows and a 21×21 result, a
shape the CPU's matrix product handles poorly (2.5 ms for N = 103 041 at two threads, where reading the two
arrays takes a fraction of that). Split into blocks of rows, it is a batch of small products, each in cache,
whose C×C results are summed: 0.85 ms. Mean-field training computes one such product per channel mix and
iteration (the gradients of ``W_spatial`` and ``W_bilateral``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from crfrnn_deeplab.crf.routes import cpu_route

__all__ = ["channel_mix", "gram"]

_BLOCK_ROWS = 4096  # rows per block of the Gram product: both blocks of 21 channels in the L2 cache


def gram(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ b`` for Tensor[N, C] and Tensor[N, C'] (same N): Tensor[C, C'].

    On the CPU the rows are taken in blocks of :data:`_BLOCK_ROWS` (a batched product, then the sum of the
    blocks' C×C' results, then the remaining rows); elsewhere one matrix product. Equal to ``a.T @ b`` up to the
    order of the additions.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"gram takes Tensor[N, C] and Tensor[N, C'], got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[0]
    if not cpu_route(a.device) or n < 2 * _BLOCK_ROWS:
        return a.T @ b
    head = n - n % _BLOCK_ROWS
    a, b = a.contiguous(), b.contiguous()
    blocks = torch.bmm(a[:head].view(-1, _BLOCK_ROWS, a.shape[1]).transpose(1, 2),
                       b[:head].view(-1, _BLOCK_ROWS, b.shape[1]))
    out = blocks.sum(0)
    if head < n:
        out.addmm_(a[head:].T, b[head:])
    return out


def channel_mix(x: Tensor, mix: Tensor) -> Tensor:
    """``x @ mix`` for tall Tensor[N, C] values and Tensor[C, C'], differentiable; the gradient w.r.t. ``mix`` is
    :func:`gram` ``(x, grad)`` (autograd's own is the single slow product)."""
    if x.dim() != 2 or mix.dim() != 2 or x.shape[1] != mix.shape[0]:
        raise ValueError(f"channel_mix takes Tensor[N, C] and Tensor[C, C'], got {tuple(x.shape)} and "
                         f"{tuple(mix.shape)}")
    return _ChannelMix.apply(x, mix)


class _ChannelMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mix: Tensor) -> Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, mix if ctx.needs_input_grad[0] else None)
        return x @ mix

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, mix = ctx.saved_tensors
        grad_x = grad @ mix.T if ctx.needs_input_grad[0] else None
        grad_mix = gram(x, grad) if ctx.needs_input_grad[1] else None
        return grad_x, grad_mix
