"""One-call dense CRF post-processing for users who have probabilities (or logits) from their own network.

The API of pydensecrf (``DenseCRF2D`` + ``setUnaryEnergy`` + ``addPairwiseGaussian`` +
``addPairwiseBilateral`` + ``inference``) folded into one object, batched and on any device::

    crf = DenseCRF(bilateral_weight=10, theta_alpha=80, theta_beta=13, spatial_weight=3, theta_gamma=3)
    refined = crf(image, probabilities)          # numpy (H,W,3) uint8 + (C,H,W) -> numpy (C,H,W)
    refined = crf(images, probabilities)         # Tensor[B,3,H,W] 0-255 + Tensor[B,C,H,W] -> Tensor

Parameters map one to one onto pydensecrf's: ``addPairwiseGaussian(sxy=θγ, compat=spatial_weight)`` and
``addPairwiseBilateral(sxy=θα, srgb=θβ, compat=bilateral_weight)`` with Potts compatibility, densecrf's
symmetric normalisation, and the unary ``-log p``. The defaults are densecrf's example values; DeepLab v2's
grid-searched VOC values are ``bilateral_weight=4, theta_alpha=121, theta_beta=5`` (Chen et al., TPAMI 2017).
The work is done by :class:`~crfrnn_deeplab.MeanFieldCRF` with nothing learnable
(:func:`~crfrnn_deeplab.crf.fixed_crf`), in float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from crfrnn_deeplab.crf.kernels import Normalization
from crfrnn_deeplab.images import check_rgb_image
from crfrnn_deeplab.crf.mean_field import MeanFieldCRF, fixed_crf

__all__ = ["DenseCRF"]


class DenseCRF:
    """A fixed-parameter fully-connected CRF (Krähenbühl & Koltun, NIPS 2011) applied in one call.

    Args:
        bilateral_weight: weight of the appearance kernel (pydensecrf's bilateral ``compat``).
        theta_alpha: its position bandwidth in pixels (``sxy``).
        theta_beta: its colour bandwidth in 0–255 intensity units (``srgb``).
        spatial_weight: weight of the smoothness kernel (the Gaussian ``compat``).
        theta_gamma: its bandwidth in pixels (``sxy``).
        iterations: mean-field iterations (pydensecrf's ``inference(n)``).
        normalization: ``"symmetric"`` (densecrf) or ``"after"`` (CRF-as-RNN).
        device: where to compute; ``None``: the device of tensor inputs, CPU for numpy inputs.
        eps: probabilities are clamped to at least ``eps`` before the logarithm.
    """

    def __init__(
        self,
        *,
        bilateral_weight: float = 10.0,
        theta_alpha: float = 80.0,
        theta_beta: float = 13.0,
        spatial_weight: float = 3.0,
        theta_gamma: float = 3.0,
        iterations: int = 10,
        normalization: Normalization = "symmetric",
        device: str | torch.device | None = None,
        eps: float = 1e-8,
    ) -> None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive int, got {iterations!r}")
        self.params = dict(bilateral_weight=float(bilateral_weight), theta_alpha=float(theta_alpha),
                           theta_beta=float(theta_beta), spatial_weight=float(spatial_weight),
                           theta_gamma=float(theta_gamma), normalization=normalization)
        self.iterations = iterations
        self.device = None if device is None else torch.device(device)
        self.eps = eps
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
    ) -> np.ndarray | Tensor:
        """Refined class probabilities.

        Args:
            image: the RGB image(s) in 0–255: numpy uint8 ``(H, W, 3)`` / ``(B, H, W, 3)``, or a tensor
                ``[3, H, W]`` / ``[B, 3, H, W]`` (any real dtype).
            probabilities: class probabilities ``(C, H, W)`` / ``(B, C, H, W)`` summing to 1 over C (softmax
                output); or give ``logits`` instead (unnormalised scores, e.g. a network's output).
            valid_mask: optional bool ``(H, W)`` / ``(B, H, W)``: pixels outside it (padding) are left alone.

        Returns:
            Probabilities ``(C, H, W)`` / ``(B, C, H, W)`` float32, numpy when the image was numpy, else a
            tensor on the compute device.
        """
        if (probabilities is None) == (logits is None):
            raise ValueError("give exactly one of probabilities (summing to 1 over classes) or logits")
        as_numpy = isinstance(image, np.ndarray)
        scores = probabilities if logits is None else logits
        name = "probabilities" if logits is None else "logits"
        unbatched = _ndim(image) == 3
        device = self.device or (image.device if isinstance(image, Tensor) else torch.device("cpu"))
        image_t = _image_tensor(image, device)
        scores_t = _tensor(scores, name, device, batched=not unbatched).float()
        if logits is None:
            _check_probabilities(scores_t)
            scores_t = scores_t.clamp_min(self.eps).log()
        mask_t = None if valid_mask is None else _tensor(valid_mask, "valid_mask", device, batched=not unbatched,
                                                         ndim=3)
        if mask_t is not None and mask_t.dtype != torch.bool:
            raise TypeError(f"valid_mask must be bool, got {mask_t.dtype}")
        # outside valid_mask the layer returns its input logits, so those pixels keep their probabilities
        out = torch.softmax(self._layer(scores_t.shape[1], device)(scores_t, image_t, mask_t), dim=1)
        out = out[0] if unbatched else out
        return out.cpu().numpy() if as_numpy else out


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
        t = torch.from_numpy(np.ascontiguousarray(image)).to(device)
        t = t.permute(2, 0, 1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    else:
        t = image.to(device)
    t = check_rgb_image(t, dims=(3, 4))  # one validator for every entry point: shape, dtype, 0-255, finite
    return (t[None] if t.ndim == 3 else t).float()


def _tensor(x: np.ndarray | Tensor, name: str, device: torch.device, *, batched: bool, ndim: int = 4) -> Tensor:
    if not isinstance(x, (np.ndarray, Tensor)):
        raise TypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(x).__name__}")
    want = ndim if batched else ndim - 1
    if x.ndim != want:
        layout = "(B, C, H, W)" if ndim == 4 else "(B, H, W)"
        raise ValueError(f"{name} must have {want} dimensions {'' if batched else '(no batch) '}like the image "
                         f"({layout}{'' if batched else ' without B'}), got shape {tuple(x.shape)}")
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    t = t.to(device)
    return t if batched else t[None]


def _check_probabilities(p: Tensor) -> None:
    if not torch.isfinite(p).all():
        raise ValueError("probabilities contain NaN or inf")
    if (p < 0).any():
        raise ValueError(f"probabilities must be non-negative, got a minimum of {p.min().item():.3g}")
    sums = p.sum(1)
    worst = (sums - 1).abs().max().item()
    if worst > 1e-3:
        raise ValueError(f"probabilities must sum to 1 over the class dimension (dim -3), but a pixel sums to "
                         f"{sums.flatten()[(sums - 1).abs().argmax()].item():.4g}; pass logits=... for "
                         "unnormalised scores")
