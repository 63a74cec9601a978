"""One-call dense CRF post-processing for users who have probabilities (or logits) from their own network.

The API of pydensecrf (``DenseCRF2D`` + ``setUnaryEnergy`` + ``addPairwiseGaussian`` +
``addPairwiseBilateral`` + ``inference``) folded into one object, batched and on any device::

    crf = DenseCRF(bilateral_weight=10, theta_alpha=80, theta_beta=13, spatial_weight=3, theta_gamma=3)
    refined = crf(image, probabilities)          # numpy (H,W,3) uint8 + (C,H,W) -> numpy (C,H,W)
    refined = crf(images, probabilities)         # Tensor[B,3,H,W] 0-255 + Tensor[B,C,H,W] -> Tensor

    ct = DenseCRF(spatial_dims=3, guidance_groups=(1,), theta_alpha=10, theta_beta=20, theta_gamma=2)
    refined = ct(volume[..., None], probabilities, spacing=(2.5, 0.8, 0.8))   # (D,H,W,1) + (C,D,H,W)

Parameters map one to one onto pydensecrf's: ``addPairwiseGaussian(sxy=θγ, compat=spatial_weight)`` and
``addPairwiseBilateral(sxy=θα, srgb=θβ, compat=bilateral_weight)`` with Potts compatibility, densecrf's
symmetric normalisation, and the unary ``-log p``; for volumes and other guidance, onto pydensecrf's generic
``DenseCRF`` with ``addPairwiseEnergy`` on the features ``p·s/θγ`` and ``(p·s/θα, I_g/θβ_g)`` (README: 3-D volumes).
The defaults are densecrf's example values; DeepLab v2's grid-searched VOC values are ``bilateral_weight=4,
theta_alpha=121, theta_beta=5`` (Chen et al., TPAMI 2017). The work is done by :class:`~crfrnn_deeplab.MeanFieldCRF`
with nothing learnable (:func:`~crfrnn_deeplab.crf.fixed_crf`), in float32. One difference by default: images
of at most 1024 pixels are filtered with the exact Gaussian rather than densecrf's permutohedral lattice, whose
kernel is least accurate there (``bilateral_filter="lattice"`` computes what densecrf computes at every size).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crfrnn_deeplab.crf.kernels import BilateralFilter, Normalization
from crfrnn_deeplab.images import check_device, check_guidance, check_rgb_image, check_spacing
from crfrnn_deeplab.crf.mean_field import MeanFieldCRF, fixed_crf

__all__ = ["DenseCRF"]

_DEFAULTS = dict(spatial_dims=2, guidance_groups=None, spacing=None, bilateral_filter="auto")  # kept out of repr


class DenseCRF:
    """A fixed-parameter fully-connected CRF (Krähenbühl & Koltun, NIPS 2011) applied in one call.

    Args:
        bilateral_weight: weight of the appearance kernel (pydensecrf's bilateral ``compat``).
        theta_alpha: its position bandwidth in pixels (``sxy``), or the physical units of ``spacing``.
        theta_beta: its colour bandwidth in 0–255 intensity units (``srgb``); for other guidance in the
            guidance's units, one value or one per guidance group.
        spatial_weight: weight of the smoothness kernel (the Gaussian ``compat``).
        theta_gamma: its bandwidth in pixels (``sxy``), or the physical units of ``spacing``.
        iterations: mean-field iterations (pydensecrf's ``inference(n)``).
        normalization: ``"symmetric"`` (densecrf) or ``"after"`` (CRF-as-RNN).
        bilateral_filter: ``"auto"`` (the exact Gaussian for images of at most 1024 pixels, where densecrf's
            lattice is least accurate, else the lattice), ``"lattice"`` (densecrf's filter at every size) or
            ``"exact"`` (B·N² memory); see :class:`~crfrnn_deeplab.MeanFieldCRF`.
        spatial_dims: 2 (images) or 3 (volumes).
        guidance_groups: None: the guidance is an RGB image in 0–255; else the channel counts of the guidance
            groups (see :class:`~crfrnn_deeplab.MeanFieldCRF`).
        spacing: the default voxel size along each spatial axis; ``__call__(..., spacing=...)`` overrides it.
        device: where to compute, a device this machine has (:func:`~crfrnn_deeplab.images.check_device`); ``None``:
            the device of tensor inputs, CPU for numpy inputs.
        eps: probabilities are clamped to at least ``eps`` before the logarithm, in (0, 1 / C).
    """

    def __init__(
        self,
        *,
        bilateral_weight: float = 10.0,
        theta_alpha: float = 80.0,
        theta_beta: float | Sequence[float] = 13.0,
        spatial_weight: float = 3.0,
        theta_gamma: float = 3.0,
        iterations: int = 10,
        normalization: Normalization = "symmetric",
        bilateral_filter: BilateralFilter = "auto",
        spatial_dims: int = 2,
        guidance_groups: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        device: str | torch.device | None = None,
        eps: float = 1e-8,
    ) -> None:
        if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
            raise ValueError(f"iterations must be a positive int, got {iterations!r}")
        iterations = int(iterations)  # a numpy int (a grid search's) as MeanFieldCRF takes it
        several = isinstance(theta_beta, Sequence) and not isinstance(theta_beta, str)
        self.params = dict(bilateral_weight=_number("bilateral_weight", bilateral_weight),
                           theta_alpha=_number("theta_alpha", theta_alpha),
                           theta_beta=(tuple(_number("theta_beta", v) for v in theta_beta) if several
                                       else _number("theta_beta", theta_beta)),
                           spatial_weight=_number("spatial_weight", spatial_weight),
                           theta_gamma=_number("theta_gamma", theta_gamma), normalization=normalization)
        if spacing is not None:  # as floats (a numpy or tensor spacing too): the repr shows what runs
            spacing = check_spacing(spacing, spatial_dims=spatial_dims)
        volume = dict(spatial_dims=spatial_dims, guidance_groups=guidance_groups, spacing=spacing,
                      bilateral_filter=bilateral_filter)
        # not `v != default`: a numpy spacing or guidance_groups compares element-wise (an ambiguous truth value)
        self.params.update({k: v for k, v in volume.items() if not _is_default(v, _DEFAULTS[k])})
        self.iterations = iterations
        self.device = None if device is None else check_device(device, work="the CRF")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < 1:
            raise ValueError(f"eps (the smallest probability kept before the logarithm) must be a number in (0, 1), "
                             f"got {eps!r}")
        self.eps = float(eps)
        self._layers: dict[tuple[int, torch.device], MeanFieldCRF] = {}
        self._layer(2, torch.device("cpu"))  # validates the parameters now, not at the first call

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"DenseCRF({params}, iterations={self.iterations})"

    def _layer(self, num_classes: int, device: torch.device) -> MeanFieldCRF:
        key = (num_classes, device)
        if key not in self._layers:
            self._layers[key] = fixed_crf(num_classes=num_classes, iterations=self.iterations, **self.params).to(device)
        return self._layers[key]

    @torch.no_grad()
    def __call__(
        self,
        image: np.ndarray | Tensor,
        probabilities: np.ndarray | Tensor | None = None,
        *,
        logits: np.ndarray | Tensor | None = None,
        valid_mask: np.ndarray | Tensor | None = None,
        spacing: Sequence[float] | None = None,
    ) -> np.ndarray | Tensor:
        """Refined class probabilities.

        Args:
            image: the RGB image(s) in 0–255: numpy uint8 ``(H, W, 3)`` / ``(B, H, W, 3)``, or a tensor
                ``[3, H, W]`` / ``[B, 3, H, W]`` (any real dtype). Volumes and other guidance (``S`` = the
                spatial axes, K channels): numpy ``(*S, K)`` / ``(B, *S, K)`` (channels last, like an image),
                or a tensor ``[K, *S]`` / ``[B, K, *S]``.
            probabilities: class probabilities ``(C, *S)`` / ``(B, C, *S)`` summing to 1 over C (softmax
                output); or give ``logits`` instead (unnormalised scores, e.g. a network's output).
            valid_mask: optional bool ``(*S)`` / ``(B, *S)``: voxels outside it (padding) are left alone.
            spacing: this call's voxel size along each spatial axis; None: the constructor's.

        Returns:
            Probabilities ``(C, *S)`` / ``(B, C, *S)`` float32 (``(C, H, W)`` for an image, ``(C, D, H, W)`` for a
            volume), numpy when the image was numpy, else a tensor on the compute device.
        """
        if (probabilities is None) == (logits is None):
            raise ValueError("give exactly one of probabilities (summing to 1 over classes) or logits")
        as_numpy = isinstance(image, np.ndarray)
        scores = probabilities if logits is None else logits
        name = "probabilities" if logits is None else "logits"
        dims, groups = self.params.get("spatial_dims", 2), self.params.get("guidance_groups")
        unbatched = _ndim(image) == dims + 1
        device = self.device or (image.device if isinstance(image, Tensor) else torch.device("cpu"))
        if dims == 2 and groups is None:
            image_t = _image_tensor(image, device)
        else:
            image_t = _guidance_tensor(image, device, dims, groups, batched=not unbatched)
        scores_t = _tensor(scores, name, device, batched=not unbatched, ndim=dims + 2, spatial_dims=dims)
        if scores_t.is_complex():
            raise TypeError(f"{name} must be real, got dtype {scores_t.dtype} (casting would drop the imaginary part)")
        if logits is None:
            _check_probabilities(scores_t)  # in their own dtype, whose rounding their sums may show
            if self.eps * scores_t.shape[1] >= 1:  # every probability would be clamped to eps: uniform
                raise ValueError(f"eps={self.eps!r} is not below 1 / C = 1/{scores_t.shape[1]}: clamping the "
                                 "probabilities to it would erase them")
            scores_t = scores_t.float().clamp_min(self.eps).log()
        else:
            scores_t = scores_t.float()
        mask_t = None if valid_mask is None else _tensor(valid_mask, "valid_mask", device, batched=not unbatched,
                                                         ndim=dims + 1, spatial_dims=dims)
        if mask_t is not None and mask_t.dtype != torch.bool:
            raise TypeError(f"valid_mask must be bool, got {mask_t.dtype}")
        # outside valid_mask the layer returns its input logits, so those pixels keep their probabilities
        layer = self._layer(scores_t.shape[1], device)
        out = torch.softmax(layer(scores_t, image_t, mask_t, spacing=spacing), dim=1)
        out = out[0] if unbatched else out
        return out.cpu().numpy() if as_numpy else out


def _number(name: str, value: Any) -> float:
    """``value`` as a float, or a TypeError naming the parameter: a real number (a 0-dimensional tensor or array of
    one too, e.g. a learned bandwidth), never a bool or a string (which ``float`` would read as 1.0 or parse)."""
    if isinstance(value, (Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()  # its Python number (a bool or complex one is refused below)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def _is_default(value: Any, default: Any) -> bool:
    """Whether a constructor option is its default (``None``, a number or a string), for the repr."""
    if default is None:
        return value is None
    return isinstance(value, (str, numbers.Number)) and value == default


def _native(x: np.ndarray) -> np.ndarray:
    """``x`` C-contiguous in the machine's byte order (torch takes neither a big-endian array nor, here, a strided
    one; a FITS or DICOM reader may return big-endian data)."""
    x = np.ascontiguousarray(x)
    return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))


def _ndim(x: Any) -> int:
    if not isinstance(x, (np.ndarray, Tensor)):
        raise TypeError(f"image must be a numpy array or a torch.Tensor, got {type(x).__name__}")
    return x.ndim


def _image_tensor(image: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """numpy (..., H, W, 3) or tensor (..., 3, H, W) RGB in 0-255 to float32 Tensor[B, 3, H, W] on ``device``."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise ValueError(f"a numpy image must be (H, W, 3) or (B, H, W, 3) RGB, got shape {image.shape}")
        if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
            raise TypeError(f"image must have a real dtype, got {image.dtype}")
        t = torch.from_numpy(_native(image)).to(device)
        t = t.permute(2, 0, 1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    else:
        t = image.to(device)
    t = check_rgb_image(t, dims=(3, 4))  # one validator for every entry point: shape, dtype, 0-255, finite
    return (t[None] if t.ndim == 3 else t).float()


def _guidance_tensor(
    image: np.ndarray | Tensor,
    device: torch.device,
    spatial_dims: int,
    groups: tuple[int, ...] | None,
    *,
    batched: bool,
) -> Tensor:
    """numpy (..., *S, K) or tensor (..., K, *S) guidance to float32 Tensor[B, K, *S] on ``device``, checked as an
    RGB image in 0-255 (``groups`` None) or as guidance of ``groups``."""
    if isinstance(image, np.ndarray):
        if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
            raise TypeError(f"image must have a real dtype, got {image.dtype}")
        if image.ndim < spatial_dims + 1:
            raise ValueError(f"a numpy guidance must be channels last, (*S, K) or (B, *S, K) with {spatial_dims} "
                             f"spatial axes (add a channel axis to a grey volume: volume[..., None]), got shape "
                             f"{image.shape}")
        t = torch.from_numpy(_native(image)).to(device).movedim(-1, -spatial_dims - 1)
    else:
        t = image.to(device)
    t = t if batched else t[None]
    if groups is None:
        t = check_rgb_image(t, dims=(spatial_dims + 2,))
    else:
        t = check_guidance(t, groups=groups, spatial_dims=spatial_dims)
    return t.float()


def _tensor(
    x: np.ndarray | Tensor, name: str, device: torch.device, *, batched: bool, ndim: int = 4, spatial_dims: int = 2
) -> Tensor:
    if not isinstance(x, (np.ndarray, Tensor)):
        raise TypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(x).__name__}")
    want = ndim if batched else ndim - 1
    if x.ndim != want:
        axes = "H, W" if spatial_dims == 2 else "D, H, W"
        layout = f"(B, C, {axes})" if ndim == spatial_dims + 2 else f"(B, {axes})"
        raise ValueError(f"{name} must have {want} dimensions {'' if batched else '(no batch) '}like the image "
                         f"({layout}{'' if batched else ' without B'}), got shape {tuple(x.shape)}")
    if isinstance(x, np.ndarray) and x.dtype.kind not in "biufc":  # complex: refused by the caller, by name
        raise TypeError(f"{name} must be a numeric array, got dtype {x.dtype}")
    t = torch.from_numpy(_native(x)) if isinstance(x, np.ndarray) else x
    t = t.to(device)
    return t if batched else t[None]


def _check_probabilities(p: Tensor) -> None:
    """Probabilities ``[B, C, *S]`` in their own dtype: finite, >= 0, summing to 1 over the classes to 1e-3 (to its
    epsilon in bfloat16, whose softmax outputs are each rounded to 2^-8 of their size)."""
    if not p.is_floating_point() and p.dtype != torch.bool and p.max() > 1:  # 0/1 integers are one-hot
        raise ValueError(f"probabilities are {str(p.dtype).removeprefix('torch.')} with values up to "
                         f"{p.max().item()} (a quantised map?): give floats in [0, 1] summing to 1 over the classes "
                         "(divide them by their sum over the class axis); as logits=... they would be sharpened, "
                         "softmax(p) is not p")
    if not torch.isfinite(p).all():
        raise ValueError("probabilities contain NaN or inf")
    if (p < 0).any():
        raise ValueError(f"probabilities must be non-negative, got a minimum of {p.min().item():.3g}")
    sums = p.sum(1, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)  # bfloat16's sums too
    worst = (sums - 1).abs().max().item()
    tolerance = max(1e-3, torch.finfo(p.dtype).eps) if p.is_floating_point() else 1e-3
    if worst > tolerance:
        raise ValueError(f"probabilities must sum to 1 over the class dimension (dim {1 - p.dim()}), but a pixel "
                         f"sums to {sums.flatten()[(sums - 1).abs().argmax()].item():.4g}; pass logits=... for "
                         "unnormalised scores")
