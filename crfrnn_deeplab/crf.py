"""The fully-connected CRF as a differentiable layer: mean-field inference unrolled (CRF-as-RNN).

Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials", NIPS 2011;
Zheng et al., "Conditional Random Fields as Recurrent Neural Networks", ICCV 2015. See DESIGN §2.

One mean-field iteration (Zheng et al., Algorithm 1), repeated T times from ``z_0`` = the network's logits::

    Q       = softmax(z_t)                          over classes
    M       = Σ_m W_m · (K̃_m Q)                     W_m: C×C, one per kernel (spatial, bilateral)
    z_{t+1} = z_0 - μ · M                           μ: C×C label compatibility

``K̃_m`` is the Gaussian kernel filter with its normalisation, ``symmetric`` ``D^-½ K D^-½`` (densecrf) or
``after`` ``D^-1 K`` (the CRF-as-RNN code), ``D = K·1``. The spatial kernel is an exact separable
convolution (:mod:`.spatial_filter`); the bilateral kernel is the permutohedral lattice (:mod:`.permutohedral`),
built once per forward call and shared by every iteration, class channel, the normaliser and the backward.

All the layer's tensors are kept channels-last (``[B, H, W, C]``), the layout both filters want.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .permutohedral import PermutohedralLattice, SparseRows, _all_finite, build_lattice, lattice_gaussian
from .spatial_filter import channel_blocks, gaussian_1d, spatial_gaussian

__all__ = [
    "MeanFieldCRF",
    "CRFKernels",
    "build_kernels",
    "check_crf_inputs",
    "fixed_crf",
    "mean_field_inference",
    "mean_field_step",
]

logger = logging.getLogger(__name__)

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
        The kernels, ready for :func:`mean_field_step`.
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
    d_spatial = _unmasked_spatial(theta_gamma, b, h, w, "ones") if mask is None else kernels.spatial(ones)
    d_bilateral = kernels.bilateral(ones)
    kernels.norm_spatial = _normaliser(d_spatial, ones, normalization)
    kernels.norm_bilateral = _normaliser(d_bilateral, ones, normalization)
    return kernels


def _unmasked_spatial(theta: Tensor, b: int, h: int, w: int, of: Literal["ones", "rsqrt"]) -> Tensor:
    """``K_s(1)`` (= D) or ``K_s(D^-½)`` of an unmasked image, Tensor[B, H, W, 1], from 1-D filterings:
    ``K_s`` of an outer product is the outer product of the filtered factors, and ``D`` = ``r cᵀ`` is one."""
    r = gaussian_1d(torch.ones(h, dtype=theta.dtype, device=theta.device), theta)
    c = gaussian_1d(torch.ones(w, dtype=theta.dtype, device=theta.device), theta)
    if of == "rsqrt":
        r, c = gaussian_1d(r.rsqrt(), theta), gaussian_1d(c.rsqrt(), theta)
    return (r[:, None] * c[None, :]).expand(b, h, w)[..., None]


def _normaliser(d: Tensor, valid: Tensor, normalization: Normalization) -> Tensor:
    """``D^-½`` or ``D^-1`` on valid pixels, exactly 0 on masked ones.

    Masked pixels far from any valid one have ``D`` = 0 up to rounding (the lattice's barycentric weights can be
    -1e-9 in float32), where ``D^-½`` would be NaN and 0·NaN stays NaN: select instead of multiplying.
    """
    d = d.clamp_min(0.0) + _EPS
    value = d.rsqrt() if normalization == "symmetric" else d.reciprocal()
    return torch.where(valid > 0, value, torch.zeros_like(value))


def mean_field_step(unary: Tensor, logits: Tensor, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor]) -> Tensor:
    """One mean-field iteration (Zheng et al. 2015, Alg. 1): ``z_0 - Σ_m (μ W_m) K̃_m softmax(z_t)``.

    Args:
        unary: Tensor[B, H, W, C], ``z_0``.
        logits: Tensor[B, H, W, C], ``z_t``.
        kernels: the batch's kernel filters.
        pairwise: ``(μ W_spatial, μ W_bilateral)``, each Tensor[C, C].

    Returns:
        Tensor[B, H, W, C], ``z_{t+1}``. Masked pixels get no message: their output is ``z_0``.
    """
    return unary - kernels.message(torch.softmax(logits, dim=-1), pairwise)


@torch.no_grad()
@torch.compiler.disable  # data-dependent (the lattice's size, the Potts test): eager even in a compiled model
def mean_field_inference(
    unary: Tensor, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor], iterations: int
) -> Tensor:
    """``iterations`` mean-field steps without autograd, in fewer passes over the pixels.

    Computes what repeated :func:`mean_field_step` computes (to float rounding), restructured for speed:

    - the normalisers become splat/slice weights, and the bilateral compatibility mixes channels on the
      lattice (far fewer rows than pixels);
    - the spatial filter runs on the channel blocks it is fastest for (:func:`.spatial_filter.channel_blocks`);
    - the update ``z_0 - ns·(spatial @ mix) - slice(lattice values)`` is one weighted gather
      (:class:`SparseRows`) from a table holding ``z_0``, the mixed spatial message and the lattice values;
    - a Potts-form mix ``α·J + β·I`` (J all ones: every fixed-weight CRF) needs no mixing at all:
      ``Σ_c q_c = 1`` makes its ``α`` part the same for every class and iteration, added to ``z_0`` once, as
      densecrf's Potts compatibility does (Krähenbühl & Koltun 2011, §4); the ``β`` part of the spatial mix
      is added to the gathered update by channel block, that of the bilateral mix is a weight of the gather.

    Args:
        unary: Tensor[B, H, W, C], ``z_0``.
        kernels: the batch's kernel filters.
        pairwise: ``(μ W_spatial, μ W_bilateral)``, each Tensor[C, C].
        iterations: T.

    Returns:
        Tensor[B, H, W, C], ``z_T``.
    """
    b, h, w, c = unary.shape
    p = b * h * w
    if iterations == 0:
        return unary.clone(memory_format=torch.contiguous_format)
    ns, nb = kernels.norm_spatial.view(p, 1), kernels.norm_bilateral.view(-1)
    sent = None if kernels.mask is None else kernels.mask.view(-1)  # 'after': what each pixel sends
    if kernels.normalization == "symmetric":
        splat, before = kernels.lattice.splat.scale_columns(nb), ns
    else:
        splat = kernels.lattice.splat if sent is None else kernels.lattice.splat.scale_columns(sent)
        before = None if sent is None else sent.view(p, 1)
    mix_spatial, mix_bilateral = pairwise[0].T, pairwise[1].T.contiguous()
    blocks = channel_blocks(c, unary.device)
    buffers = [unary.new_empty(p, stop - start) for start, stop, _ in blocks]

    def to_blocks(q: Tensor) -> None:
        """Writes ``before ⊙ q`` into the channel blocks' buffers."""
        for (start, stop, _), buffer in zip(blocks, buffers):
            if before is None:
                buffer.copy_(q[:, start:stop])
            else:
                torch.mul(q[:, start:stop], before, out=buffer)

    def spatial_blocks():
        """``K_s`` of the blocks' buffers: (first, stop, Tensor[P, stop - first]) for channels first:stop."""
        for (start, stop, first), buffer in zip(blocks, buffers):
            filtered = spatial_gaussian(buffer.view(b, h, w, -1), kernels.theta_gamma).view(p, -1)
            yield first, stop, filtered[:, first - start :]

    # A Potts-form mix α·J + β·I sends every class of a pixel the same α·K̃1 in every iteration (Σ_c q_c = 1):
    # those terms are added to z_0 once (the table's first rows), and only β·K̃q is computed per iteration.
    spatial_potts, bilateral_potts = _potts_form(mix_spatial), _potts_form(mix_bilateral)
    shift = unary.new_zeros(b, h, w, 1)
    if spatial_potts is not None:  # K_s(before): K_s(ns) (symmetric) or K_s(1) (after) or K_s(mask)
        if kernels.mask is None:  # outer products of 1-D filterings
            of = "rsqrt" if kernels.normalization == "symmetric" else "ones"
            constant = _unmasked_spatial(kernels.theta_gamma, b, h, w, of)
        else:
            constant = spatial_gaussian(before.view(b, h, w, 1), kernels.theta_gamma)
        shift -= spatial_potts[0] * ns.view(b, h, w, 1) * constant
    if bilateral_potts is not None:
        ones = torch.ones_like(nb)[:, None]
        lattice_ones = kernels.lattice.slice @ kernels.lattice.blur_lattice(splat @ ones)
        shift -= bilateral_potts[0] * (nb[:, None] * lattice_ones).view(b, h, w, 1)
    m = kernels.lattice.num_vertices
    # Table rows: z_0 + shift | spatial message (mixed; unless Potts) | lattice values (mixed, unless Potts).
    table = unary.new_empty((p if spatial_potts is not None else 2 * p) + m, c)
    torch.add(unary, shift, out=table[:p].view(b, h, w, c))
    update = _update_gather(
        kernels.lattice.slice,
        nb if bilateral_potts is None else bilateral_potts[1] * nb,
        -ns.view(-1) if spatial_potts is None else None,
    )
    # The first softmax reads z_0 from the table: the shift there is the same for every class of a pixel,
    # and softmax ignores such a shift.
    z = table[:p]
    for _ in range(iterations):
        q = torch.softmax(z, dim=-1)
        to_blocks(q)  # while q is in cache
        on_lattice = kernels.lattice.blur_lattice(splat @ q)
        if bilateral_potts is None:
            torch.mm(on_lattice, mix_bilateral, out=table[-m:])
        else:
            table[-m:] = on_lattice
        if spatial_potts is None:
            spatial = table[p : 2 * p]
            for i, (first, stop, filtered) in enumerate(spatial_blocks()):
                if i == 0:
                    torch.mm(filtered, mix_spatial[first:stop], out=spatial)
                else:
                    spatial.addmm_(filtered, mix_spatial[first:stop])
            z = update @ table
        else:
            spatial = list(spatial_blocks())
            z = update @ table
            for first, stop, filtered in spatial:
                z[:, first:stop].addcmul_(ns, filtered, value=-spatial_potts[1])
    return z.view(b, h, w, c)


def _potts_form(mix: Tensor) -> tuple[float, float] | None:
    """``(α, β)`` when ``mix = α·J + β·I`` exactly (J all ones: a Potts compatibility times ``w·I``), else None."""
    c = mix.shape[0]
    diagonal = mix.diagonal()
    if c == 1:
        return 0.0, float(diagonal[0])
    off = mix.masked_select(~torch.eye(c, dtype=torch.bool, device=mix.device))
    if bool((off == off[0]).all()) and bool((diagonal == diagonal[0]).all()):
        return float(off[0]), float(diagonal[0] - off[0])
    return None


def _update_gather(slice_: SparseRows, after: Tensor, spatial: Tensor | None = None) -> SparseRows:
    """Row i of the mean-field update as a gather from the table ``[z_0; spatial message; lattice values]``:
    ``z_0[i] + spatial_i · message[i] - after_i Σ_k slice_ik · lattice[k]`` (without the message when ``spatial``
    is None; ``after``, ``spatial``: Tensor[P], P = the slice's rows)."""
    p = slice_.num_rows
    device, dtype = slice_.weights.device, slice_.weights.dtype
    head = 1 if spatial is None else 2  # the entries before the lattice's
    num_columns = head * p + slice_.num_columns
    index = slice_.columns.dtype if num_columns < 2**31 else torch.long
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
    columns[rest], weights[rest] = slice_.columns.to(index) + head * p, -slice_.weights * after[rows]
    return SparseRows(columns, offsets.to(index), weights, num_columns)


@torch.compiler.disable  # data-dependent checks: eager also inside a compiled model
def check_crf_inputs(logits: Tensor, image: Tensor, valid_mask: Tensor | None) -> None:
    """Raises a clear error for inputs the CRF cannot take (shapes, dtypes, ranges, non-finite values), and
    warns about an image that looks normalised to 0-1."""
    if not isinstance(logits, Tensor) or logits.dim() != 4:
        raise ValueError(f"logits must be a Tensor[B, C, H, W], got shape {tuple(getattr(logits, 'shape', ()))}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(
            f"image must be a raw RGB Tensor[B, 3, H, W] in 0-255, got shape {tuple(getattr(image, 'shape', ()))}"
        )
    b, _, h, w = logits.shape
    if image.shape[0] != b or image.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"image {tuple(image.shape)} does not match logits {tuple(logits.shape)}: expected ({b}, 3, {h}, {w})"
        )
    if image.dtype == torch.bool or image.is_complex():
        raise TypeError(f"image must be real RGB values in 0-255, got {image.dtype}")
    if valid_mask is not None:
        if not isinstance(valid_mask, Tensor) or tuple(valid_mask.shape) != (b, h, w):
            raise ValueError(
                f"valid_mask must be a Tensor[B, H, W] = ({b}, {h}, {w}), got {tuple(getattr(valid_mask, 'shape', ()))}"
            )
        if valid_mask.dtype != torch.bool:
            raise TypeError(f"valid_mask must be a bool tensor, got {valid_mask.dtype}")
        if valid_mask.device != logits.device:
            raise ValueError(f"valid_mask is on {valid_mask.device}, logits on {logits.device}")
    if image.device != logits.device:
        raise ValueError(f"image is on {image.device}, logits on {logits.device}")
    if not _all_finite(logits):
        raise ValueError("logits contain NaN or infinite values")
    if image.is_floating_point() and not _all_finite(image):
        raise ValueError("image contains NaN or infinite values")
    if image.is_floating_point() and image.numel() and 0 < float(image.max()) <= 1.0:
        logger.warning("CRF image has max %.3g <= 1: expected raw RGB in 0-255", float(image.max()))
    if image.numel() and image.min() < 0:
        raise ValueError(
            f"image has negative values (min {float(image.min()):.3g}): the CRF expects the raw RGB image in "
            "0-255, not the normalised network input"
        )


class MeanFieldCRF(nn.Module):
    """A fully-connected CRF with Gaussian edge potentials as a trainable layer (CRF-as-RNN).

    With its initial parameters (``W_m = w_m·I``, Potts ``μ = 1 - I``) and ``symmetric`` normalisation it
    computes densecrf's ``inference(T)`` on unaries ``-logits`` (Krähenbühl & Koltun 2011, Eq. 3–4 and §4);
    every parameter can then be learned by backpropagation (Zheng et al. 2015), including the bandwidths.

    Args:
        num_classes: C.
        spatial_weight: ``w`` of the spatial (smoothness) kernel.
        bilateral_weight: ``w`` of the bilateral (appearance) kernel.
        theta_alpha: bilateral position bandwidth (pixels).
        theta_beta: bilateral colour bandwidth (0–255 intensity units).
        theta_gamma: spatial bandwidth (pixels).
        normalization: "symmetric" (``D^-½ K D^-½``, densecrf) or "after" (``D^-1 K``, CRF-as-RNN).
        train_iterations: mean-field iterations in training mode.
        eval_iterations: mean-field iterations in eval mode.
        learn_kernel_weights: learn the C×C matrices ``W_m``.
        learn_compatibility: learn ``μ``.
        learn_bandwidths: learn θα, θβ, θγ (log-parameterised, so always positive).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        spatial_weight: float = 3.0,
        bilateral_weight: float = 10.0,
        theta_alpha: float = 80.0,
        theta_beta: float = 13.0,
        theta_gamma: float = 3.0,
        normalization: Normalization = "symmetric",
        train_iterations: int = 5,
        eval_iterations: int = 10,
        learn_kernel_weights: bool = True,
        learn_compatibility: bool = True,
        learn_bandwidths: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        for name, value in (("theta_alpha", theta_alpha), ("theta_beta", theta_beta), ("theta_gamma", theta_gamma)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite bandwidth > 0, got {value!r}")
        for name, value in (("train_iterations", train_iterations), ("eval_iterations", eval_iterations)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if normalization not in ("symmetric", "after"):
            raise ValueError(f"normalization must be 'symmetric' or 'after', got {normalization!r}")
        eye = torch.eye(num_classes)
        self.num_classes = num_classes
        self.normalization: Normalization = normalization
        self.train_iterations = train_iterations
        self.eval_iterations = eval_iterations
        self.spatial_weight = nn.Parameter(spatial_weight * eye, requires_grad=learn_kernel_weights)
        self.bilateral_weight = nn.Parameter(bilateral_weight * eye, requires_grad=learn_kernel_weights)
        self.compatibility = nn.Parameter(1.0 - eye, requires_grad=learn_compatibility)
        self.log_theta_alpha = nn.Parameter(torch.tensor(math.log(theta_alpha)), requires_grad=learn_bandwidths)
        self.log_theta_beta = nn.Parameter(torch.tensor(math.log(theta_beta)), requires_grad=learn_bandwidths)
        self.log_theta_gamma = nn.Parameter(torch.tensor(math.log(theta_gamma)), requires_grad=learn_bandwidths)

    @property
    def bandwidths(self) -> dict[str, float]:
        """The current bandwidths ``{"theta_alpha", "theta_beta", "theta_gamma"}`` as floats."""
        return {
            "theta_alpha": float(self.log_theta_alpha.detach().exp()),
            "theta_beta": float(self.log_theta_beta.detach().exp()),
            "theta_gamma": float(self.log_theta_gamma.detach().exp()),
        }

    def extra_repr(self) -> str:
        bw = ", ".join(f"{k}={v:.4g}" for k, v in self.bandwidths.items())
        return (
            f"num_classes={self.num_classes}, {bw}, normalization={self.normalization!r}, "
            f"iterations=(train {self.train_iterations}, eval {self.eval_iterations})"
        )

    def kernels(self, image: Tensor, valid_mask: Tensor | None = None) -> CRFKernels:
        """The kernel filters of a batch at the current bandwidths (:func:`build_kernels`).

        Args:
            image: Tensor[B, 3, H, W], raw RGB in 0–255, in the dtype to compute in.
            valid_mask: Tensor[B, H, W] bool, or None.
        """
        return build_kernels(
            image,
            theta_alpha=self.log_theta_alpha.exp(),
            theta_beta=self.log_theta_beta.exp(),
            theta_gamma=self.log_theta_gamma.exp(),
            valid_mask=valid_mask,
            normalization=self.normalization,
        )

    def pairwise(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(μ W_spatial, μ W_bilateral)`` in ``dtype``: what :func:`mean_field_step` takes."""
        return (
            (self.compatibility @ self.spatial_weight).to(dtype),
            (self.compatibility @ self.bilateral_weight).to(dtype),
        )

    def forward(self, logits: Tensor, image: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        """Runs T mean-field iterations on the unary logits.

        Args:
            logits: Tensor[B, C, H, W], the network's unary logits ``z_0`` (at image resolution).
            image: Tensor[B, 3, H, W], the raw RGB image in 0–255 (not the normalised network input).
            valid_mask: Tensor[B, H, W] bool, or None. Masked pixels neither send nor receive messages;
                their output equals their input logits.

        Returns:
            Tensor[B, C, H, W] float32 logits (also under autocast: the CRF always computes in float32, or in
            float64 when the logits are float64).
        """
        check_crf_inputs(logits, image, valid_mask)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the CRF was built for {self.num_classes}")
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=logits.device.type, enabled=False):
            unary = logits.to(dtype).permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]
            kernels = self.kernels(image.to(dtype), valid_mask)
            pairwise = self.pairwise(dtype)
            iterations = self.train_iterations if self.training else self.eval_iterations
            if torch.is_grad_enabled() and (logits.requires_grad or any(p.requires_grad for p in self.parameters())):
                z = unary
                for _ in range(iterations):
                    z = mean_field_step(unary, z, kernels, pairwise)
            else:
                z = mean_field_inference(unary, kernels, pairwise, iterations)
        return z.permute(0, 3, 1, 2)


def fixed_crf(
    *,
    num_classes: int,
    bilateral_weight: float,
    theta_alpha: float,
    theta_beta: float,
    spatial_weight: float,
    theta_gamma: float,
    iterations: int,
    normalization: Normalization = "symmetric",
) -> MeanFieldCRF:
    """A :class:`MeanFieldCRF` with nothing learnable (Potts compatibility, ``W_m = w_m·I``) running
    ``iterations`` in either mode, in eval mode: densecrf's post-processing CRF."""
    return MeanFieldCRF(
        num_classes=num_classes,
        spatial_weight=spatial_weight,
        bilateral_weight=bilateral_weight,
        theta_alpha=theta_alpha,
        theta_beta=theta_beta,
        theta_gamma=theta_gamma,
        normalization=normalization,
        train_iterations=iterations,
        eval_iterations=iterations,
        learn_kernel_weights=False,
        learn_compatibility=False,
        learn_bandwidths=False,
    ).eval()
