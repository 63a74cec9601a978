"""Mean-field inference without autograd: the fast path of :class:`~crfrnn_deeplab.crf.MeanFieldCRF` in eval mode
and of ``DenseCRF``.

It computes what repeated :func:`~crfrnn_deeplab.crf.mean_field.mean_field_step` (the reference path, used with
autograd) computes, to float rounding, with the work restructured around the lattice; the tests check the two
paths equal for Potts and learned compatibilities, both normalisations and masked batches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from crfrnn_deeplab.crf.kernels import CRFKernels, unmasked_spatial
from crfrnn_deeplab.crf.routes import cpu_route
from crfrnn_deeplab.crf.sparse_rows import BlockedRows, SparseRows, index_dtype
from crfrnn_deeplab.crf.spatial import spatial_gaussian
from crfrnn_deeplab.crf.threads import caller_threads, limited_threads

__all__ = [
    "check_iterations", "check_mean_field_inputs", "check_mixes", "class_softmax", "mean_field_inference",
    "potts_form", "update_gather",
]

_TILE = 64  # voxels per tile of the classes-first softmax
_FEW_CLASSES = 16  # below: the classes-first softmax


@torch.no_grad()
@torch.compiler.disable  # data-dependent (the lattice's size, the Potts test): eager even in a compiled model
def mean_field_inference(
    unary: Tensor, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor], iterations: int
) -> Tensor:
    """``iterations`` mean-field steps without autograd, in fewer passes over the pixels.

    Computes what repeated :func:`~crfrnn_deeplab.crf.mean_field.mean_field_step` computes (to float rounding),
    restructured for speed:

    - the normalisers become splat/slice weights, and the bilateral compatibility mixes channels on the
      lattice (far fewer rows than pixels);
    - the update ``z_0 - ns·(spatial @ mix) - slice(lattice values)`` is one weighted gather
      (:class:`SparseRows`) from a table holding ``z_0``, the (mixed) spatial message and the lattice values;
      the spatial filter's last pass writes into the table;
    - a Potts-form mix ``α·J + β·I`` (J all ones: every fixed-weight CRF) needs no mixing at all:
      ``Σ_c q_c = 1`` makes its ``α`` part the same for every class and iteration, added to ``z_0`` once, as
      densecrf's Potts compatibility does (Krähenbühl & Koltun 2011, §4); its ``β`` part is a weight of the
      gather;
    - the spatial filter and the lattice read the same ``before ⊙ q`` (the splat weighs it by ``nb / ns``), so
      ``q`` itself is never formed;
    - the softmax is ``exp(z - top)`` over its row sums: ``top``, computed once from ``z_0``, bounds every
      iterate's logits from above and comes within ``width`` of each pixel's largest one (the messages move a
      logit by ``-Σ_c' X_c' M_c'c``, ``X >= 0`` summing to the same ``reach`` for every ``q``, so within the
      mix's smallest and largest entries times ``reach``). So no iteration takes a maximum (PyTorch's softmax
      over 21 classes costs 2–3 times ``exp``); where ``width`` could flush a whole row (> 43 in float32: large
      kernel weights) the loop takes :func:`class_softmax`.

    Runs with the thread count of :mod:`.threads`' policy (by default at most the cores free now); the
    matrix products of a learned (non-Potts) mix keep the caller's count, as their rounding may depend on it.

    Args:
        unary: Tensor[B, *S, C], ``z_0`` (S: 2 or 3 spatial axes).
        kernels: the batch's kernel filters.
        pairwise: ``(μ W_spatial, μ W_bilateral)``, each Tensor[C, C].
        iterations: T.

    Returns:
        Tensor[B, *S, C], ``z_T``.
    """
    check_mean_field_inputs(unary, kernels, pairwise, iterations)
    with limited_threads():
        return _mean_field_inference(unary, kernels, pairwise, iterations)


def check_mean_field_inputs(unary: object, kernels: CRFKernels, pairwise: object, iterations: object = 0) -> None:
    """Raises a clear error unless ``unary`` is a float32 or float64 Tensor[B, *S, C] of the kernels' grid (channels
    last), ``pairwise`` two Tensor[C, C] of its dtype that pass :func:`check_mixes`, and ``iterations`` an int >= 0:
    what the mean-field loops take."""
    if not isinstance(unary, Tensor) or unary.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"unary must be a float32 or float64 Tensor[B, *S, C] (the CRF computes in one of them), got "
                        f"{getattr(unary, 'dtype', type(unary))}")
    if tuple(unary.shape[:-1]) != tuple(kernels.shape):
        raise ValueError(f"unary must be Tensor[B, *S, C] with (B, *S) = {tuple(kernels.shape)}, the kernels' grid "
                         f"(channels last), got {tuple(unary.shape)}")
    c = unary.shape[-1]
    if (not isinstance(pairwise, (tuple, list)) or len(pairwise) != 2
            or any(not isinstance(m, Tensor) or tuple(m.shape) != (c, c) for m in pairwise)):
        shapes = [tuple(getattr(m, "shape", ())) for m in pairwise] if isinstance(pairwise, (tuple, list)) else pairwise
        raise ValueError(f"pairwise must be (μ W_spatial, μ W_bilateral), two Tensor[{c}, {c}], got {shapes}")
    if any(m.dtype != unary.dtype for m in pairwise):
        raise TypeError(f"pairwise must have the unary's dtype {unary.dtype}, got {[m.dtype for m in pairwise]}")
    check_iterations(iterations, minimum=0)
    check_mixes(pairwise, unary.dtype)


def check_mixes(pairwise: tuple[Tensor, Tensor], dtype: torch.dtype) -> None:
    """Raises ValueError unless each mix ``μ W_m`` is finite and small enough that no message can overflow
    ``dtype``: a logit moves by at most a column's absolute sum times the message's largest value, which the
    normalisations keep far below 2⁴⁰ (a symmetric one below √N). So the limit, 2⁻⁴⁰ of ``dtype``'s largest value
    (3.1e26 in float32), is never near a weight anyone sets, and above it the output could be inf or NaN."""
    limit = torch.finfo(dtype).max * 2.0**-40
    reach = torch.stack([m.detach().abs().sum(0).amax().double() for m in pairwise]).tolist()
    for kind, r in zip(("spatial", "bilateral"), reach):
        if not r <= limit:
            found = f"has a column whose |entries| sum to {r:.3g}" if math.isfinite(r) else "is not finite"
            raise ValueError(f"μ W_{kind} (the compatibility times the {kind} kernel weights) {found}: above "
                             f"{limit:.3g} (2^-40 of {str(dtype).removeprefix('torch.')}'s largest value) the messages "
                             f"could overflow; the kernel weights or the compatibility are too large")


def check_iterations(iterations: object, minimum: int = 1) -> None:
    """Raises ValueError unless ``iterations`` is an int (not a bool) >= ``minimum``."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < minimum:
        raise ValueError(f"iterations must be an int >= {minimum}, got {iterations!r}")


def _mean_field_inference(
    unary: Tensor, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor], iterations: int
) -> Tensor:
    b, *sizes, c = unary.shape
    p = unary.numel() // c
    if iterations == 0:
        return unary.clone(memory_format=torch.contiguous_format)
    ns, nb = kernels.norm_spatial.view(p, 1), kernels.norm_bilateral.view(-1)
    # Each iteration filters a = before ⊙ q, what the pixels send: ns ⊙ q (symmetric), q ⊙ mask or q (after).
    # The lattice reads it too: its splat weights take nb / ns (symmetric), so q itself is never formed.
    if kernels.normalization == "symmetric":
        before = ns
        splat = kernels.lattice.splat.scale_columns(torch.where(ns.view(-1) > 0, nb / ns.view(-1), 0.0))
    else:
        before = None if kernels.mask is None else kernels.mask.view(p, 1)
        splat = kernels.lattice.splat
    mix_spatial, mix_bilateral = pairwise[0].T, pairwise[1].T.contiguous()
    spatial_potts, bilateral_potts = potts_form(mix_spatial), potts_form(mix_bilateral)
    shift, top = _constant_shift_and_top(unary, kernels, before, splat, (mix_spatial, mix_bilateral),
                                         (spatial_potts, bilateral_potts))
    shifted = top is not None
    m = kernels.lattice.num_vertices
    # Table rows: z_0 + shift (- top) | spatial message (mixed unless Potts) | lattice values (mixed unless Potts).
    # With top, each softmax is exp(z_t - top) over its row sums: no maximum per iteration, nothing overflows; the
    # last update gathers z_0 + shift again, so z_T is rounded as without the bound.
    table = unary.new_empty(2 * p + m, c)
    torch.add(unary, shift - top if shifted else shift, out=table[:p].view(b, *sizes, c))
    update = update_gather(
        kernels.lattice.slice,
        nb if bilateral_potts is None else bilateral_potts[1] * nb,
        -ns.view(-1) if spatial_potts is None else -spatial_potts[1] * ns.view(-1),
    )
    z, class_sums = table[:p], unary.new_ones(c, 1)
    for t in range(iterations):  # (each [P, C] array is let go at its last use, not when its name is bound again)
        if shifted:
            a = torch.exp(z) if t == 0 else z.exp_()  # (the first z is the table's)
            with caller_threads():  # products round by thread count: never by the load
                total = a @ class_sums
            a.mul_(total.reciprocal_() if before is None else before / total)
        else:  # the first softmax reads z_0 itself: z_0 + shift (|shift| ~ the kernel weights) would round z_0 away
            a = class_softmax(unary.reshape(p, c) if t == 0 else z)
            if before is not None:
                a.mul_(before)
        del z
        on_lattice = kernels.lattice.blur_lattice(splat @ a)
        if bilateral_potts is None:
            with caller_threads():
                torch.mm(on_lattice, mix_bilateral, out=table[-m:])
        else:
            table[-m:] = on_lattice
        del on_lattice
        if spatial_potts is None:
            filtered = spatial_gaussian(a.view(b, *sizes, c), kernels.theta_gamma, spacing=kernels.spacing)
            with caller_threads():
                torch.mm(filtered.view(p, c), mix_spatial, out=table[p : 2 * p])
            del filtered
        else:
            spatial_gaussian(a.view(b, *sizes, c), kernels.theta_gamma, spacing=kernels.spacing,
                             out=table[p : 2 * p].view(b, *sizes, c))
        del a
        if shifted and t == iterations - 1:  # z_T itself, rounded as z_0 + shift - messages
            torch.add(unary, shift, out=table[:p].view(b, *sizes, c))
        z = update @ table
    return z.view(b, *sizes, c)


def _constant_shift_and_top(
    unary: Tensor, kernels: CRFKernels, before: Tensor | None, splat: SparseRows | BlockedRows,
    mixes: tuple[Tensor, Tensor],
    potts: tuple[tuple[float, float] | None, tuple[float, float] | None],
) -> tuple[Tensor, Tensor | None]:
    """``(shift, top)`` for :func:`_mean_field_inference`, each Tensor[B, *S, 1].

    ``shift``: what a Potts-form mix ``α·J + β·I`` sends every class of a pixel in every iteration, ``-α·reach``
    (``reach``: Σ_c of the unmixed message per unit of q, the same for every q as Σ_c q_c = 1), added to z_0
    once. ``top``: an upper bound of every iterate's logits that comes within the messages' ``width`` of each
    pixel's largest one — the iterate moves from ``z_0 + shift`` by ``-Σ_c' X_c' M_c'c`` with ``X >= 0`` summing
    to ``reach`` (M: the per-iteration mix, ``β·I`` for a Potts form), so within ``[-reach·max M, -reach·min M]``
    — or None where that width could flush a whole row of ``exp(z - top)`` (> 43 in float32) or ``top`` is not
    finite.
    """
    b, *sizes, _ = unary.shape
    ns, nb = kernels.norm_spatial.view(-1, 1), kernels.norm_bilateral.view(-1, 1)
    if kernels.mask is None:  # K_s(before): outer products of 1-D filterings
        of = "rsqrt" if kernels.normalization == "symmetric" else "ones"
        spatial = unmasked_spatial(kernels.theta_gamma, (b, *sizes), of, spacing=kernels.spacing)
    else:  # K_s(ns) (symmetric) or K_s(mask) (after)
        spatial = spatial_gaussian(before.view(b, *sizes, 1), kernels.theta_gamma, spacing=kernels.spacing)
    sent = torch.ones_like(ns) if before is None else before
    bilateral = kernels.lattice.slice @ kernels.lattice.blur_lattice(splat @ sent)
    reaches = (ns.view(b, *sizes, 1) * spatial, (nb * bilateral).view(b, *sizes, 1))
    shift, rise, width = (unary.new_zeros(b, *sizes, 1) for _ in range(3))
    for form, mix, reach in zip(potts, mixes, reaches):
        if form is not None:
            shift -= form[0] * reach
            low, high = min(form[1], 0.0), max(form[1], 0.0)
        else:
            low, high = float(mix.min()), float(mix.max())
        rise -= low * reach
        width += (high - low) * reach
    top = unary.amax(-1, keepdim=True) + shift + rise
    finite = bool(torch.isfinite(top).all())
    if not finite and not bool(torch.isfinite(unary).all()):  # (NaN or +inf in z_0 make top so: checked only then)
        raise ValueError("mean_field_inference: the unary holds NaN or infinite values")
    limit = -0.5 * math.log(torch.finfo(unary.dtype).tiny)  # 43.7 in float32: q_c < e^-43 may be flushed
    return shift, (top if finite and float(width.max()) <= limit else None)


def class_softmax(z: Tensor) -> Tensor:
    """The softmax over the classes (last dimension) of Tensor[..., C], contiguous; differentiable.

    PyTorch's last-dimension kernel vectorises over the classes of one voxel, which wastes most of the vector for
    fewer classes than its width: below _FEW_CLASSES classes the softmax runs on tiles of _TILE voxels viewed
    classes-first (vectorised over the voxels of a tile, each tile small enough for its transposes to stay in
    cache). Measured on 400 k voxels, one thread: 2 / 3 / 5 / 8 / 12 classes 3.9 / 6.1 / 10.7 / 14.2 / 23.8 ms
    instead of 25 / 32 / 46 / 66 / 91 ms; at 16 / 21 / 32 classes the last-dimension kernel is the faster one
    (9.6 / 17 / 15 ms against 31 / 31 / 61 ms).
    """
    c = z.shape[-1]
    flat = z.reshape(-1, c)
    p = flat.shape[0]
    head = p - p % _TILE
    if c >= _FEW_CLASSES or head == 0 or not cpu_route(z.device):
        return torch.softmax(z, dim=-1)
    tiles = flat[:head].view(head // _TILE, _TILE, c).transpose(1, 2).contiguous()  # [P / tile, C, tile]
    out = torch.empty_like(flat)  # (autograd records the copies into it)
    out[:head].view(head // _TILE, _TILE, c).copy_(torch.softmax(tiles, dim=1).transpose(1, 2))
    if head < p:
        out[head:] = torch.softmax(flat[head:], dim=-1)
    return out.view(z.shape)


def potts_form(mix: Tensor) -> tuple[float, float] | None:
    """``(α, β)`` when ``mix = α·J + β·I`` exactly (J all ones: a Potts compatibility times ``w·I``), else None."""
    c = mix.shape[0]
    diagonal = mix.diagonal()
    if c == 1:
        return 0.0, float(diagonal[0])
    off = mix.masked_select(~torch.eye(c, dtype=torch.bool, device=mix.device))
    if bool((off == off[0]).all()) and bool((diagonal == diagonal[0]).all()):
        return float(off[0]), float(diagonal[0] - off[0])
    return None


def update_gather(slice_: SparseRows, after: Tensor, spatial: Tensor | None = None) -> SparseRows:
    """Row i of the mean-field update as a gather from the table ``[z_0; spatial message; lattice values]``:
    ``z_0[i] + spatial_i · message[i] - after_i Σ_k slice_ik · lattice[k]`` (without the message when ``spatial``
    is None; ``after``, ``spatial``: Tensor[P], P = the slice's rows)."""
    if not isinstance(slice_, SparseRows):
        raise TypeError(f"update_gather takes the lattice's slice as SparseRows, got {type(slice_).__name__}")
    p = slice_.num_rows
    for name, rows in (("after", after), ("spatial", spatial)):
        if (rows is not None or name == "after") and (not isinstance(rows, Tensor) or rows.shape != (p,)):
            shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"update_gather: {name} must be a Tensor[{p}] (one per slice row), got {shape}")
    device, dtype = slice_.weights.device, slice_.weights.dtype
    head = 1 if spatial is None else 2  # the entries before the lattice's
    num_columns = head * p + slice_.num_columns
    index = index_dtype(num_columns, head * p + slice_.columns.numel())
    pixels = torch.arange(p, device=device, dtype=index)
    if slice_.row_length is not None:  # every row the same length: [P, head + length] entries
        k = slice_.row_length
        columns = torch.empty(p, head + k, dtype=index, device=device)
        weights = torch.empty(p, head + k, dtype=dtype, device=device)
        columns[:, 0], weights[:, 0] = pixels, 1.0
        if spatial is not None:
            columns[:, 1], weights[:, 1] = pixels + p, spatial
        torch.add(slice_.columns.view(p, k), head * p, out=columns[:, head:])
        torch.mul(slice_.weights.view(p, k), after.view(p, 1), out=weights[:, head:]).neg_()
        offsets = torch.arange(0, p * (k + head) + 1, k + head, dtype=index, device=device)
        return SparseRows(columns.view(-1), offsets, weights.view(-1), num_columns, k + head)
    rows = slice_.rows()
    offsets = slice_.offsets.long() + head * torch.arange(p + 1, device=device)
    first = offsets[:-1]
    columns = torch.empty(int(offsets[-1]), dtype=index, device=device)
    weights = torch.empty(int(offsets[-1]), dtype=dtype, device=device)
    columns[first], weights[first] = pixels, 1.0
    if spatial is not None:
        columns[first + 1], weights[first + 1] = pixels + p, spatial
    rest = torch.arange(rows.numel(), device=device) + head * (rows + 1)
    columns[rest] = slice_.columns.to(index) + head * p
    weights[rest] = -slice_.weights * after[rows]
    return SparseRows(columns, offsets.to(index), weights, num_columns)
