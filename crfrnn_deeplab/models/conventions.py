"""Input conventions: how a set of weights expects its images.

Weights are only correct when fed the preprocessing they were trained with. Torchvision's ImageNet weights
expect RGB in 0-1 normalised by the ImageNet mean and std; the Caffe-converted DeepLab v2 weights expect BGR
in 0-255 with the Caffe mean subtracted and no std. Every model carries an :class:`InputConvention`, and the
data pipeline and predictors turn raw RGB 0-255 images into network input with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from crfrnn_deeplab.images import check_rgb_image

__all__ = ["InputConvention", "TORCHVISION_CONVENTION", "CAFFE_CONVENTION"]


@dataclass(frozen=True)
class InputConvention:
    """The preprocessing a set of weights expects.

    Attributes:
        channel_order: ``"RGB"`` or ``"BGR"``: channel order of the network input.
        value_scale: 1.0 if the network input is in 0-1 before normalisation, 255.0 if in 0-255.
        mean: per-channel mean in the units of ``value_scale``, listed in ``channel_order``.
        std: per-channel std in the same units and order (1.0 for "subtract the mean only").
    """

    channel_order: Literal["RGB", "BGR"] = "RGB"
    value_scale: float = 1.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if self.value_scale not in (1.0, 255.0):
            raise ValueError(f"value_scale must be 1.0 (0-1 input) or 255.0 (0-255 input), got {self.value_scale!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got mean={self.mean!r} std={self.std!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def pixel_mean_rgb255(self) -> tuple[float, float, float]:
        """The mean colour as RGB in 0-255 (the value to pad images with so they normalise to ~0)."""
        scale = 255.0 / self.value_scale
        mean = tuple(m * scale for m in self.mean)
        return mean if self.channel_order == "RGB" else mean[::-1]  # type: ignore[return-value]

    def normalize(self, image: Tensor) -> Tensor:
        """Raw RGB 0-255 images to network input.

        Args:
            image (Tensor[B, 3, H, W] or Tensor[3, H, W]): RGB, uint8 or floating point in 0-255.

        Returns:
            Tensor of the same shape, float32 (or the input's floating dtype), in this convention.

        Raises:
            TypeError: not a tensor (a numpy array or a PIL image: the message shows the tensor form), or a
                bool / complex tensor.
            ValueError: not (B, 3, H, W) or (3, H, W), empty, NaN/inf, or values outside 0-255 (e.g. an already
                normalised input). A floating image with values of at most 1 (a 0-1 image) is accepted with a
                warning, as by the CRF (:func:`crfrnn_deeplab.images.check_rgb_image`).
        """
        if isinstance(image, np.ndarray):
            raise TypeError(
                "images must be a raw RGB Tensor[B, 3, H, W] or Tensor[3, H, W] in 0-255, got a numpy array of "
                f"shape {image.shape}: convert a uint8 (H, W, 3) array with torch.from_numpy(image).permute(2, 0, 1), "
                "or use model.predict(image), which takes numpy arrays and PIL images"
            )
        if isinstance(image, Image.Image):
            raise TypeError(
                "images must be a raw RGB Tensor[B, 3, H, W] or Tensor[3, H, W] in 0-255, got a PIL image: convert "
                "it with torch.from_numpy(numpy.asarray(image.convert('RGB'))).permute(2, 0, 1), or use "
                "model.predict(image), which takes numpy arrays and PIL images"
            )
        check_rgb_image(image, name="images", dims=(3, 4))
        x = image.float() if not image.is_floating_point() else image
        if self.channel_order == "BGR":
            x = x.flip(-3)
        if self.value_scale != 255.0:
            x = x / 255.0 * self.value_scale
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Network input back to RGB 0-255 float (inverse of :meth:`normalize`)."""
        if x.dim() not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(f"expected a 3-channel input of shape (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        y = x * std + mean
        if self.value_scale != 255.0:
            y = y / self.value_scale * 255.0
        return y.flip(-3) if self.channel_order == "BGR" else y

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, for checkpoints and configs."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputConvention:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(d) - {"channel_order", "value_scale", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown InputConvention keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


#: torchvision ImageNet weights: RGB, 0-1, ImageNet mean/std.
TORCHVISION_CONVENTION = InputConvention()
#: Caffe-converted DeepLab v2 weights: BGR, 0-255, mean (B, G, R) = (104.008, 116.669, 122.675), no std.
CAFFE_CONVENTION = InputConvention(
    channel_order="BGR", value_scale=255.0, mean=(104.008, 116.669, 122.675), std=(1.0, 1.0, 1.0)
)
