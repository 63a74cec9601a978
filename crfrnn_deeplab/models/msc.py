"""Multi-scale inputs with max fusion (MSC): DeepLab v2's shared-weight multi-scale network.

Chen et al., "Attention to Scale: Scale-aware Semantic Image Segmentation", CVPR 2016; DeepLab v2 (TPAMI 2017),
Sec. 4.1. With MSC every rescaled copy of the input must satisfy the network's minimum size
(:attr:`MSC.min_input_size`, 15 for stride 8 and the default scales (1, 0.75, 0.5)).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crfrnn_deeplab.images import check_scales, resize, scaled_size
from crfrnn_deeplab.models.conventions import InputConvention
from crfrnn_deeplab.models.deeplab import DeepLabV2
from crfrnn_deeplab.models.predictor import PredictMixin

__all__ = ["MSC", "MSCOutput", "MSC_SCALES", "Fusion", "ImageResize"]

#: DeepLab v2's input scales for multi-scale training and testing.
MSC_SCALES: tuple[float, ...] = (1.0, 0.75, 0.5)

#: Where the scales' score maps are fused: "input" (each upsampled to the input size, then the max) or
#: "score_map" (each resized to the 1.0 scale's stride-8 score map, the max there, then upsampled: what DeepLab
#: v2's Caffe model and its PyTorch ports compute).
Fusion = Literal["input", "score_map"]

#: How the input is resized to a scale s: "caffe" (side ``floor((S - 1)·s) + 1``, sampled at the sizes' ratio, as
#: DeepLab v2's Caffe ``Interp`` layer) or "scale_factor" (side ``floor(S·s)``, sampled at exactly 1/s, what
#: ``F.interpolate(x, scale_factor=s)`` does in the PyTorch ports, e.g. kazuto1011/deeplab-pytorch).
ImageResize = Literal["caffe", "scale_factor"]


class MSCOutput(NamedTuple):
    """What :class:`MSC` returns in training mode (every entry gets a loss).

    Attributes:
        fused (Tensor[B, C, H, W]): element-wise max over the scales (see :data:`Fusion` for where).
        per_scale (list[Tensor[B, C, H, W]]): the logits of each scale, in the order of ``MSC.scales``,
            upsampled to the input size.
    """

    fused: Tensor
    per_scale: list[Tensor]


class MSC(PredictMixin, nn.Module):
    """Multi-scale inputs with max fusion ("MSC" in DeepLab v2, Sec. 4.1; Chen et al., Attention to Scale, 2016).

    The image is resized bilinearly (``align_corners=False``) to each scale (side ``floor((S - 1) * s) + 1``, or
    ``floor(S * s)`` with ``image_resize="scale_factor"``) and passed through the shared model; the score maps are
    fused by element-wise max, either at the input size (``fusion="input"``: each upsampled first) or at the 1.0
    scale's stride-8 score map (``fusion="score_map"``: each resized to it, the max, then upsampled), which is what
    DeepLab v2's Caffe model and its ports compute (so a converted Caffe-layout checkpoint reproduces its source).
    The two differ where the scales disagree, since bilinear upsampling and max do not commute. Each scale's own
    logits (upsampled to the input size) are returned in training mode for its loss either way.

    Args:
        model: the shared :class:`DeepLabV2`.
        scales: input scales, e.g. :data:`MSC_SCALES` = (1.0, 0.75, 0.5); ``fusion="score_map"`` needs 1.0 among
            them.
        fusion: ``"input"`` (default) or ``"score_map"``.
        image_resize: ``"caffe"`` (default) or ``"scale_factor"`` (see :data:`ImageResize`); a converted
            checkpoint gets its source's rule, so that it reproduces the source's fused output.

    Attributes:
        model, scales, fusion, image_resize: as given (``scales`` as a tuple of floats). State_dict keys are ``model.*``.
        input_convention, num_classes, output_stride: those of ``model``.
        min_input_size: smallest accepted image side, so that every rescaled image has a side of at least
            ``model.min_input_size`` (15 for stride 8 and the default scales and ``image_resize``; 16 with
            ``"scale_factor"``).
    """

    def __init__(
        self,
        *,
        model: DeepLabV2,
        scales: Sequence[float] = MSC_SCALES,
        fusion: Fusion = "input",
        image_resize: ImageResize = "caffe",
    ) -> None:
        super().__init__()
        if not isinstance(model, DeepLabV2):
            raise TypeError(f"model must be a DeepLabV2, got {type(model).__name__}")
        if fusion not in ("input", "score_map"):
            raise ValueError(f"fusion must be 'input' or 'score_map', got {fusion!r}")
        self.model = model
        self.scales = check_scales(scales)
        if fusion == "score_map" and 1.0 not in self.scales:
            raise ValueError(f"fusion='score_map' fuses at the 1.0 scale's score map: 1.0 must be a scale, got {self.scales}")
        if image_resize not in ("caffe", "scale_factor"):
            raise ValueError(f"image_resize must be 'caffe' or 'scale_factor', got {image_resize!r}")
        self.fusion: Fusion = fusion
        self.image_resize: ImageResize = image_resize
        min_size = model.min_input_size
        while any(self._side(min_size, s) < model.min_input_size for s in self.scales):
            min_size += 1
        self._min_input_size = min_size

    @property
    def input_convention(self) -> InputConvention:
        return self.model.input_convention

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def output_stride(self) -> int:
        return self.model.output_stride

    @property
    def min_input_size(self) -> int:
        return self._min_input_size

    def preprocess(self, images: Tensor) -> Tensor:
        """Raw RGB 0-255 images to network input; see :meth:`DeepLabV2.preprocess`."""
        return self.model.preprocess(images)

    def forward(self, x: Tensor) -> Tensor | MSCOutput:
        """Multi-scale logits.

        Args:
            x (Tensor[B, 3, H, W]): normalised images, floating point.

        Returns:
            In eval mode the fused logits (Tensor[B, num_classes, H, W]); in training mode an
            :class:`MSCOutput` with the fused and the per-scale logits, all (Tensor[B, num_classes, H, W]).

        Raises:
            TypeError: ``x`` is not a tensor, not floating point, or not in the weights' dtype (see
                :meth:`DeepLabV2.check_input`).
            ValueError: ``x`` is not 4-D, has not 3 channels, is an empty batch, or a side is below
                :attr:`min_input_size`.
        """
        self.model.check_input(x, min_size=self.min_input_size)
        size = (x.shape[-2], x.shape[-1])
        scores = [self.model.scores(self._rescale(x, s)) for s in self.scales]
        per_scale = [resize(z, size) for z in scores]
        if self.fusion == "input":
            fused = functools.reduce(torch.maximum, per_scale)
        else:
            base = scores[self.scales.index(1.0)].shape[-2:]
            fused = resize(functools.reduce(torch.maximum, [resize(z, base) for z in scores]), size)
        return MSCOutput(fused, per_scale) if self.training else fused

    def _side(self, size: int, scale: float) -> int:
        return scaled_size(size, scale) if self.image_resize == "caffe" else math.floor(size * scale)

    def _rescale(self, x: Tensor, scale: float) -> Tensor:
        """The input at ``scale`` under :attr:`image_resize`'s rule (a no-op at 1.0 under both)."""
        if self.image_resize == "caffe" or scale == 1.0:
            return resize(x, (scaled_size(x.shape[-2], scale), scaled_size(x.shape[-1], scale)))
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"scales={self.scales}, fusion={self.fusion!r}, image_resize={self.image_resize!r}"

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the backbone; see :meth:`DeepLabV2.backbone_parameters`."""
        return self.model.backbone_parameters()

    def head_weights(self) -> list[nn.Parameter]:
        """Trainable head weights; see :meth:`DeepLabV2.head_weights`."""
        return self.model.head_weights()

    def head_biases(self) -> list[nn.Parameter]:
        """Trainable head biases; see :meth:`DeepLabV2.head_biases`."""
        return self.model.head_biases()
