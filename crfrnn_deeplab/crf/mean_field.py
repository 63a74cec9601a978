"""The fully-connected CRF as a differentiable layer: mean-field inference unrolled (CRF-as-RNN).

Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials", NIPS 2011;
Zheng et al., "Conditional Random Fields as Recurrent Neural Networks", ICCV 2015. The formulation: README, the CRF
layer.

One mean-field iteration (Zheng et al., Algorithm 1), repeated T times from ``z_0`` = the network's logits::

    Q       = softmax(z_t)                          over classes
    M       = Σ_m W_m · (K̃_m Q)                     W_m: C×C, one per kernel (spatial, bilateral)
    z_{t+1} = z_0 - μ · M                           μ: C×C label compatibility

``K̃_m`` are the normalised kernel filters of :mod:`.kernels`. With autograd the layer runs
:func:`mean_field_step` T times (the reference path; with the symmetric normalisation one node of T fused
steps, :mod:`.fused_step`); without it, :func:`.fast_inference.mean_field_inference`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from crfrnn_deeplab.crf import fused_step
from crfrnn_deeplab.crf.fast_inference import check_mean_field_inputs, check_mixes, class_softmax, mean_field_inference
from crfrnn_deeplab.crf.exact_filter import BilateralFilter, check_bilateral_filter
from crfrnn_deeplab.crf.kernels import (
    CRFKernels,
    Normalization,
    build_kernels,
    check_guidance_groups,
    check_normalization,
)
from crfrnn_deeplab.images import (
    check_guidance,
    check_logits,
    check_rgb_image,
    check_spacing,
    check_spatial_dims,
    check_valid_mask,
)

__all__ = ["MeanFieldCRF", "check_crf_inputs", "fixed_crf", "mean_field_step", "mean_field_steps"]


@torch.compiler.disable  # custom autograd nodes holding the lattice, which Dynamo cannot trace: eager when compiled
def mean_field_step(unary: Tensor, logits: Tensor, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor]) -> Tensor:
    """One mean-field iteration (Zheng et al. 2015, Alg. 1): ``z_0 - Σ_m (μ W_m) K̃_m softmax(z_t)``.

    Args:
        unary: Tensor[B, *S, C], ``z_0`` (S: 2 or 3 spatial axes).
        logits: Tensor[B, *S, C], ``z_t``.
        kernels: the batch's kernel filters.
        pairwise: ``(μ W_spatial, μ W_bilateral)``, each Tensor[C, C].

    Returns:
        Tensor[B, *S, C], ``z_{t+1}``. Masked voxels get no message: their output is ``z_0``.
    """
    check_mean_field_inputs(unary, kernels, pairwise)
    if not isinstance(logits, Tensor) or tuple(unary.shape) != tuple(logits.shape):
        raise ValueError(f"unary {tuple(unary.shape)} and logits {tuple(getattr(logits, 'shape', ()))} differ in shape")
    return _step(unary, logits, kernels, pairwise)


@torch.compiler.disable  # as mean_field_step
def _step(unary: Tensor, logits: Tensor, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor]) -> Tensor:
    """:func:`mean_field_step` on checked inputs."""
    if fused_step.applies(kernels):  # fixed bandwidths: one autograd node, fewer passes (same values)
        return fused_step.fixed_bandwidth_step(unary, logits, kernels, pairwise)
    return unary - kernels.message(class_softmax(logits), pairwise)


@torch.compiler.disable  # as mean_field_step
def _iterations(unary: Tensor, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor], iterations: int) -> Tensor:
    """``iterations`` mean-field steps with autograd: with the symmetric normalisation one node for all of them
    (:func:`.fused_step.fixed_bandwidth_iterations` or :func:`.fused_step.learned_iterations`, the values and
    gradients of autograd's nodes), otherwise :func:`mean_field_step` T times."""
    if iterations == 0 or kernels.normalization != "symmetric":
        return mean_field_steps(unary, kernels, pairwise, iterations)  # (it checks its inputs, the mixes included)
    check_mixes(pairwise, unary.dtype)
    if fused_step.applies(kernels):
        return fused_step.fixed_bandwidth_iterations(unary, kernels, pairwise, iterations)
    return fused_step.learned_iterations(unary, kernels, pairwise, iterations)


def mean_field_steps(unary: Tensor, kernels: CRFKernels, pairwise: tuple[Tensor, Tensor], iterations: int) -> Tensor:
    """``iterations`` chained :func:`mean_field_step` calls from ``z_0 = unary`` (Tensor[B, *S, C]): the reference
    path of the layer's training iterations, one autograd record per step, against which the one-node forms of
    :mod:`.fused_step` are tested. ``iterations`` >= 0 (0: ``unary`` itself)."""
    check_mean_field_inputs(unary, kernels, pairwise, iterations)  # once: z_t has the unary's shape
    z = unary
    for _ in range(iterations):
        z = _step(unary, z, kernels, pairwise)
    return z


@torch.compiler.disable  # data-dependent checks: eager also inside a compiled model
def check_crf_inputs(
    logits: Tensor,
    image: Tensor,
    valid_mask: Tensor | None,
    *,
    spatial_dims: int = 2,
    guidance_groups: Sequence[int] | None = None,
) -> None:
    """Raises a clear error for inputs the CRF cannot take (the shared validators of :mod:`crfrnn_deeplab.images`).

    Args:
        logits: Tensor[B, C, *S], S = (H, W) or (D, H, W) as ``spatial_dims`` says.
        image: the raw RGB image Tensor[B, 3, *S] in 0-255 (``guidance_groups`` None), or guidance
            Tensor[B, K, *S] in any units with K = ``sum(guidance_groups)``; same batch, size and device as the
            logits.
        valid_mask: Tensor[B, *S] bool, or None.
        spatial_dims: 2 (images) or 3 (volumes): how many trailing axes are spatial.
        guidance_groups: None (the RGB image), or the channel counts of the guidance's groups (see
            :class:`MeanFieldCRF`).
    """
    if any(isinstance(t, Tensor) and t.is_meta for t in (logits, image, valid_mask)):
        raise ValueError("the CRF cannot run on meta tensors (they hold no data): give it real logits and image")
    check_logits(logits, spatial_dims=spatial_dims)
    if guidance_groups is None:
        check_rgb_image(image, dims=(spatial_dims + 2,))
    else:
        check_guidance(image, groups=guidance_groups, spatial_dims=spatial_dims)
    b, sizes = logits.shape[0], tuple(logits.shape[2:])
    if image.shape[0] != b or tuple(image.shape[2:]) != sizes:
        expected = ", ".join(str(n) for n in (b, image.shape[1], *sizes))
        raise ValueError(
            f"image {tuple(image.shape)} does not match logits {tuple(logits.shape)}: expected ({expected})"
        )
    if image.device != logits.device:
        raise ValueError(f"image is on {image.device}, logits on {logits.device}")
    if valid_mask is not None:
        check_valid_mask(valid_mask, shape=(b, *sizes), device=logits.device)


class MeanFieldCRF(nn.Module):
    """A fully-connected CRF with Gaussian edge potentials as a trainable layer (CRF-as-RNN).

    With its initial parameters (``W_m = w_m·I``, Potts ``μ = 1 - I``) and ``symmetric`` normalisation it
    computes densecrf's ``inference(T)`` on unaries ``-logits`` (Krähenbühl & Koltun 2011, Eq. 3–4 and §4);
    every parameter can then be learned by backpropagation (Zheng et al. 2015), including the bandwidths.

    By default it takes 2-D images and their raw RGB image. For volumes and other guidance (README: 3-D volumes) give
    ``spatial_dims=3`` and/or ``guidance_groups``: the appearance kernel then compares the features
    ``(p·s/θα, I_g/θβ_g for each group g)`` of positions p (voxel indices), the voxel ``spacing`` s and the K
    guidance channels I split into groups, e.g. ``(1,)`` a grey level or CT intensity, ``(1, 1)`` T1 and T2
    MRI with a bandwidth each, ``(3, 1)`` RGB + depth. θα and θγ are then in the spacing's physical units, θβ_g
    in group g's own units.

    Args:
        num_classes: C.
        spatial_weight: ``w`` of the spatial (smoothness) kernel.
        bilateral_weight: ``w`` of the bilateral (appearance) kernel.
        theta_alpha: bilateral position bandwidth (pixels, or the physical units of ``spacing``).
        theta_beta: bilateral guidance bandwidth (0–255 intensity units for the RGB image); with several
            ``guidance_groups`` one value for all or one per group.
        theta_gamma: spatial bandwidth (pixels, or the physical units of ``spacing``).
        spatial_dims: 2 (images, ``[B, C, H, W]``) or 3 (volumes, ``[B, C, D, H, W]``).
        guidance_groups: None: the guidance is the raw RGB image in 0–255 (checked as such). Otherwise the
            channel counts of the guidance groups (K = their sum >= 1), in any units (checked for finiteness).
        spacing: the default physical voxel size along each spatial axis (axes' order, e.g. ``(3.0, 0.8, 0.8)``
            mm for ``(D, H, W)``); None: 1. ``forward(..., spacing=...)`` overrides it for one batch.
        normalization: "symmetric" (``D^-½ K D^-½``, densecrf) or "after" (``D^-1 K``, CRF-as-RNN).
        bilateral_filter: how the bilateral kernel is filtered: "lattice", the permutohedral lattice as densecrf
            does; "exact", the exact Gaussian (B·N² memory, for small images); "auto" (default): exact for each
            image of at most :data:`~crfrnn_deeplab.crf.exact_filter.EXACT_FILTER_POINTS` valid pixels (voxels),
            where it costs little, the lattice for larger ones, whatever else the batch holds.
        train_iterations: mean-field iterations in training mode.
        eval_iterations: mean-field iterations in eval mode.
        learn_kernel_weights: learn the C×C matrices ``W_m``.
        learn_compatibility: learn ``μ``.
        learn_bandwidths: learn θα, θβ, θγ (log-parameterised, so always positive). θγ's gradient is the exact
            derivative of the separable filter; θα's and θβ's are the exact Gaussian's derivative over pixel pairs
            scaled to the lattice's mass (all pairs of images of up to
            :data:`~crfrnn_deeplab.crf.bandwidth_gradient.EXACT_POINTS` valid pixels, one importance-sampled
            partner per pixel beyond, drawn from torch's default generator), see :mod:`.bandwidth_gradient`. With the
            exact filter the mass is the Gaussian's, and the gradient over all pairs is the exact CRF's.

    Parameters: ``spatial_weight``, ``bilateral_weight``, ``compatibility`` (Tensor[C, C] each),
    ``log_theta_alpha``, ``log_theta_gamma`` (Tensor[]) and ``log_theta_beta`` (Tensor[] for one guidance group,
    as for the RGB image; Tensor[G] for G > 1 groups).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        spatial_weight: float = 3.0,
        bilateral_weight: float = 10.0,
        theta_alpha: float = 80.0,
        theta_beta: float | Sequence[float] = 13.0,
        theta_gamma: float = 3.0,
        spatial_dims: int = 2,
        guidance_groups: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        normalization: Normalization = "symmetric",
        bilateral_filter: BilateralFilter = "auto",
        train_iterations: int = 5,
        eval_iterations: int = 10,
        learn_kernel_weights: bool = True,
        learn_compatibility: bool = True,
        learn_bandwidths: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        for name, value in (("spatial_weight", spatial_weight), ("bilateral_weight", bilateral_weight)):
            if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        spatial_dims = check_spatial_dims(spatial_dims)
        groups = None if guidance_groups is None else check_guidance_groups(guidance_groups)
        num_groups = 1 if groups is None else len(groups)
        several = isinstance(theta_beta, Sequence) and not isinstance(theta_beta, str)
        betas = list(theta_beta) if several else [theta_beta] * num_groups
        if len(betas) != num_groups:
            raise ValueError(
                f"theta_beta must be one bandwidth or one per guidance group ({num_groups}), got {theta_beta!r}"
            )
        bandwidths = (("theta_alpha", theta_alpha), *(("theta_beta", b) for b in betas), ("theta_gamma", theta_gamma))
        for name, value in bandwidths:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a real number (a bandwidth), got {type(value).__name__} {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite bandwidth > 0, got {value!r}")
            if not 0 < float(torch.tensor(float(value), dtype=torch.float32, device="cpu")) < math.inf:
                raise ValueError(f"{name}={value!r} is 0 or infinite in float32, the parameters' dtype")
        for name, value in (("train_iterations", train_iterations), ("eval_iterations", eval_iterations)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        check_normalization(normalization)
        check_bilateral_filter(bilateral_filter)
        num_classes, train_iterations, eval_iterations = int(num_classes), int(train_iterations), int(eval_iterations)
        eye = torch.eye(num_classes)
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.guidance_groups = groups
        self.spacing = None if spacing is None else check_spacing(spacing, spatial_dims=spatial_dims)
        self.normalization: Normalization = normalization
        self.bilateral_filter: BilateralFilter = bilateral_filter
        self.train_iterations = train_iterations
        self.eval_iterations = eval_iterations
        self.spatial_weight = nn.Parameter(float(spatial_weight) * eye, requires_grad=learn_kernel_weights)
        self.bilateral_weight = nn.Parameter(float(bilateral_weight) * eye, requires_grad=learn_kernel_weights)
        self.compatibility = nn.Parameter(1.0 - eye, requires_grad=learn_compatibility)
        self.log_theta_alpha = nn.Parameter(torch.tensor(math.log(float(theta_alpha))), requires_grad=learn_bandwidths)
        # One guidance group (the RGB image): a scalar, the key and shape every checkpoint has.
        log_beta = [math.log(float(b)) for b in betas]
        log_beta = torch.tensor(log_beta[0] if num_groups == 1 else log_beta)
        self.log_theta_beta = nn.Parameter(log_beta, requires_grad=learn_bandwidths)
        self.log_theta_gamma = nn.Parameter(torch.tensor(math.log(float(theta_gamma))), requires_grad=learn_bandwidths)
        # Weights so large that the messages could overflow. The initial mixes are w_m·(1 - I), formed on the CPU
        # from the float32 weights, so that a layer built under torch.device("meta") is checked too.
        potts = 1.0 - torch.eye(num_classes, dtype=torch.float64, device="cpu")
        initial = (float(torch.tensor(float(w), dtype=torch.float32, device="cpu")) * potts
                   for w in (spatial_weight, bilateral_weight))
        check_mixes(tuple(initial), torch.float32)

    @property
    def bandwidths(self) -> dict[str, float | tuple[float, ...]]:
        """The current bandwidths ``{"theta_alpha", "theta_beta", "theta_gamma"}`` as floats (``theta_beta``: a
        tuple, one per guidance group, when there are several)."""
        if self.log_theta_beta.is_meta:
            raise ValueError("the CRF's bandwidths are on the meta device (they hold no data): load its weights first")
        beta = self.log_theta_beta.detach().exp()
        return {
            "theta_alpha": float(self.log_theta_alpha.detach().exp()),
            "theta_beta": float(beta) if beta.dim() == 0 else tuple(beta.tolist()),
            "theta_gamma": float(self.log_theta_gamma.detach().exp()),
        }

    def extra_repr(self) -> str:
        def fmt(v: float | tuple[float, ...]) -> str:
            return f"{v:.4g}" if isinstance(v, float) else "(" + ", ".join(f"{x:.4g}" for x in v) + ")"

        if self.log_theta_beta.is_meta:  # built under torch.device("meta"), weights not loaded yet
            bw = "bandwidths on the meta device"
        else:
            bw = ", ".join(f"{k}={fmt(v)}" for k, v in self.bandwidths.items())
        volume = ""  # the 2-D RGB CRF's repr is unchanged
        if self.spatial_dims != 2 or self.guidance_groups is not None or self.spacing is not None:
            volume = (f", spatial_dims={self.spatial_dims}, guidance_groups={self.guidance_groups}, "
                      f"spacing={self.spacing}")
        bilateral = "" if self.bilateral_filter == "auto" else f", bilateral_filter={self.bilateral_filter!r}"
        return (
            f"num_classes={self.num_classes}, {bw}{volume}, normalization={self.normalization!r}{bilateral}, "
            f"iterations=(train {self.train_iterations}, eval {self.eval_iterations})"
        )

    def kernels(
        self, image: Tensor, valid_mask: Tensor | None = None, *, spacing: Sequence[float] | None = None
    ) -> CRFKernels:
        """The kernel filters of a batch at the current bandwidths (:func:`build_kernels`).

        Args:
            image: Tensor[B, K, *S], the guidance (raw RGB in 0–255 by default), in the dtype to compute in.
            valid_mask: Tensor[B, *S] bool, or None.
            spacing: the batch's voxel size per spatial axis; None: the layer's ``spacing``.
        """
        return build_kernels(
            image,
            theta_alpha=self.log_theta_alpha.exp(),
            theta_beta=self.log_theta_beta.exp(),
            theta_gamma=self.log_theta_gamma.exp(),
            valid_mask=valid_mask,
            normalization=self.normalization,
            guidance_groups=self.guidance_groups,
            spacing=self.spacing if spacing is None else spacing,
            bilateral_filter=self.bilateral_filter,
        )

    @torch.compiler.disable  # a data-dependent check, as check_crf_inputs
    def check_parameters(self) -> None:
        """Raises a ValueError naming every parameter with a NaN or infinite value (edited, loaded from a
        checkpoint, or diverged): the layer's output would be NaN everywhere. The bandwidths' own range is
        checked when the kernels are built. Also names parameters on the meta device (built under
        ``torch.device("meta")`` and never loaded) and C×C matrices replaced by ones of another shape."""
        named = list(self.named_parameters())
        empty = [name for name, p in named if p.is_meta]
        if empty:
            raise ValueError(f"the CRF's parameters {', '.join(empty)} are on the meta device (they hold no data): "
                             "load a state dict into the layer (load_state_dict(..., assign=True)) or move it with "
                             "crf.to_empty(device=...) and initialise them")
        c = self.num_classes
        for name in ("spatial_weight", "bilateral_weight", "compatibility"):
            shape = tuple(getattr(self, name).shape)
            if shape != (c, c):
                raise ValueError(f"the CRF's parameter {name} must be a Tensor[C, C] with C = num_classes = {c}, "
                                 f"got shape {shape}")
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).tolist()
        bad = [name for (name, _), ok in zip(named, finite) if not ok]
        if bad:
            raise ValueError(f"the CRF's parameters {', '.join(bad)} hold NaN or infinite values")

    def pairwise(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(μ W_spatial, μ W_bilateral)``, multiplied in ``dtype``: what :func:`mean_field_step` takes."""
        compatibility = self.compatibility.to(dtype)
        return compatibility @ self.spatial_weight.to(dtype), compatibility @ self.bilateral_weight.to(dtype)

    def forward(
        self,
        logits: Tensor,
        image: Tensor,
        valid_mask: Tensor | None = None,
        *,
        spacing: Sequence[float] | None = None,
    ) -> Tensor:
        """Runs T mean-field iterations on the unary logits.

        Args:
            logits: Tensor[B, C, H, W] (or Tensor[B, C, D, H, W] with ``spatial_dims=3``), the network's unary
                logits ``z_0`` (at image resolution).
            image: the guidance, Tensor[B, K, *S]: by default the raw RGB image in 0–255 (K = 3; not the
                normalised network input); with ``guidance_groups``, K = their sum channels in their own units.
            valid_mask: Tensor[B, *S] bool, or None. Masked voxels neither send nor receive messages;
                their output equals their input logits.
            spacing: this batch's voxel size per spatial axis (axes' order; the whole batch shares it); None:
                the layer's ``spacing``.

        Returns:
            Tensor[B, C, *S] float32 logits (also under autocast: the CRF always computes in float32, or in
            float64 when the logits are float64).
        """
        check_crf_inputs(
            logits, image, valid_mask, spatial_dims=self.spatial_dims, guidance_groups=self.guidance_groups
        )
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the CRF was built for {self.num_classes}")
        if spacing is not None:
            spacing = check_spacing(spacing, spatial_dims=self.spatial_dims)
        self.check_parameters()
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=logits.device.type, enabled=False):
            unary = logits.to(dtype).movedim(1, -1).contiguous()  # [B, *S, C]
            kernels = self.kernels(image.to(dtype), valid_mask, spacing=spacing)
            pairwise = self.pairwise(dtype)
            iterations = self.train_iterations if self.training else self.eval_iterations
            if torch.is_grad_enabled() and (logits.requires_grad or any(p.requires_grad for p in self.parameters())):
                z = _iterations(unary, kernels, pairwise, iterations)
            else:
                z = mean_field_inference(unary, kernels, pairwise, iterations)
        return z.movedim(-1, 1)


def fixed_crf(
    *,
    num_classes: int,
    bilateral_weight: float,
    theta_alpha: float,
    theta_beta: float | Sequence[float],
    spatial_weight: float,
    theta_gamma: float,
    iterations: int,
    normalization: Normalization = "symmetric",
    spatial_dims: int = 2,
    guidance_groups: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    bilateral_filter: BilateralFilter = "auto",
) -> MeanFieldCRF:
    """A :class:`MeanFieldCRF` with nothing learnable (Potts compatibility, ``W_m = w_m·I``) running
    ``iterations`` in either mode, in eval mode: densecrf's post-processing CRF (of any guidance, 2-D or 3-D)."""
    return MeanFieldCRF(
        num_classes=num_classes,
        spatial_weight=spatial_weight,
        bilateral_weight=bilateral_weight,
        theta_alpha=theta_alpha,
        theta_beta=theta_beta,
        theta_gamma=theta_gamma,
        spatial_dims=spatial_dims,
        guidance_groups=guidance_groups,
        spacing=spacing,
        normalization=normalization,
        bilateral_filter=bilateral_filter,
        train_iterations=iterations,
        eval_iterations=iterations,
        learn_kernel_weights=False,
        learn_compatibility=False,
        learn_bandwidths=False,
    ).eval()
