"""The fully-connected CRF as a differentiable layer: mean-field inference unrolled (CRF-as-RNN).

Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials", NIPS 2011;
Zheng et al., "Conditional Random Fields as Recurrent Neural Networks", ICCV 2015. See DESIGN §2.

One mean-field iteration (Zheng et al., Algorithm 1), repeated T times from ``z_0`` = the network's logits::

    Q       = softmax(z_t)                          over classes
    M       = Σ_m W_m · (K̃_m Q)                     W_m: C×C, one per kernel (spatial, bilateral)
    z_{t+1} = z_0 - μ · M                           μ: C×C label compatibility

``K̃_m`` are the normalised kernel filters of :mod:`.kernels`. With autograd the layer runs
:func:`mean_field_step` T times (the reference path); without it, :func:`.fast_inference.mean_field_inference`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from crfrnn_deeplab.crf.fast_inference import mean_field_inference
from crfrnn_deeplab.crf.kernels import CRFKernels, Normalization, build_kernels
from crfrnn_deeplab.images import check_logits, check_rgb_image, check_valid_mask

__all__ = ["MeanFieldCRF", "check_crf_inputs", "fixed_crf", "mean_field_step"]


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


@torch.compiler.disable  # data-dependent checks: eager also inside a compiled model
def check_crf_inputs(logits: Tensor, image: Tensor, valid_mask: Tensor | None) -> None:
    """Raises a clear error for inputs the CRF cannot take: logits ``Tensor[B, C, H, W]``, a raw RGB image
    ``Tensor[B, 3, H, W]`` in 0-255 of the same batch and size on the same device, an optional bool mask
    ``Tensor[B, H, W]`` (the shared validators of :mod:`crfrnn_deeplab.images`)."""
    check_logits(logits)
    check_rgb_image(image)
    b, _, h, w = logits.shape
    if image.shape[0] != b or image.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"image {tuple(image.shape)} does not match logits {tuple(logits.shape)}: expected ({b}, 3, {h}, {w})"
        )
    if image.device != logits.device:
        raise ValueError(f"image is on {image.device}, logits on {logits.device}")
    if valid_mask is not None:
        check_valid_mask(valid_mask, shape=(b, h, w), device=logits.device)


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
        for name, value in (("spatial_weight", spatial_weight), ("bilateral_weight", bilateral_weight)):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
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
