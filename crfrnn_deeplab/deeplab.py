"""DeepLab v2: atrous backbone + ASPP head + bilinear upsampling, and the multi-scale (MSC) wrapper.

Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous Convolution, and Fully
Connected CRFs", TPAMI 2017. The model is composed from parts that are passed in:

- a backbone with the contract of :mod:`crfrnn_deeplab.backbone` (``forward(Tensor[B, 3, H, W]) ->
  Tensor[B, out_channels, h, w]`` at ``output_stride`` 8 or 16, attributes ``out_channels`` and
  ``output_stride``);
- a head with the contract of :class:`crfrnn_deeplab.aspp.ASPP` (``Tensor[B, in_channels, h, w] ->
  Tensor[B, num_classes, h, w]``, attributes ``in_channels`` and ``num_classes``);
- the :class:`~crfrnn_deeplab.preprocessing.InputConvention` its weights expect.

The registered builders (``deeplabv2_resnet101``, ``deeplabv2_resnet101_msc``, ...) are at the end of this
module; build them by name with :func:`crfrnn_deeplab.registry.get_model`.

Inputs smaller than the network accepts are an error, not a silent degenerate result: an image side must be
at least ``output_stride`` pixels (:attr:`DeepLabV2.min_input_size`, 8 by default) so that it fills one cell of
the feature map, and with MSC every rescaled copy must satisfy that (:attr:`MSC.min_input_size`, 15 for the
default scales (1, 0.75, 0.5)).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crfrnn_deeplab.aspp import HeadKind, build_head
from crfrnn_deeplab.backbone import (
    AtrousResNet,
    NormKind,
    resnet18_atrous,
    resnet34_atrous,
    resnet50_atrous,
    resnet101_atrous,
)
from crfrnn_deeplab.preprocessing import CAFFE_CONVENTION, TORCHVISION_CONVENTION, InputConvention
from crfrnn_deeplab.registry import register_model

__all__ = [
    "DeepLabV2",
    "MSC",
    "MSCOutput",
    "MSC_SCALES",
    "deeplabv2_resnet18",
    "deeplabv2_resnet18_msc",
    "deeplabv2_resnet34",
    "deeplabv2_resnet34_msc",
    "deeplabv2_resnet50",
    "deeplabv2_resnet50_msc",
    "deeplabv2_resnet101",
    "deeplabv2_resnet101_msc",
]

#: DeepLab v2's input scales for multi-scale training and testing.
MSC_SCALES: tuple[float, ...] = (1.0, 0.75, 0.5)


def _check_image(x: object, *, min_size: int) -> None:
    """Raise TypeError/ValueError unless ``x`` is a floating ``Tensor[B, 3, H, W]`` with ``H, W >= min_size``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a Tensor[B, 3, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D tensor of shape (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise ValueError(f"expected 3 channels in a (B, 3, H, W) tensor, got {x.shape[1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point tensor (normalised network input), got dtype {x.dtype}; "
            "turn raw 0-255 RGB images into network input with model.preprocess(images)"
        )
    height, width = x.shape[-2:]
    if min(height, width) < min_size:
        raise ValueError(
            f"image of size {height}x{width} is too small: the minimum is {min_size}x{min_size} for this model"
        )


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize, ``align_corners=False``; a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DeepLabV2(nn.Module):
    """DeepLab v2: ``logits = upsample(head(backbone(x)))``.

    The model carries the :class:`InputConvention` of its weights: feed ``model.preprocess(raw_rgb)``.

    Args:
        backbone: stride-8 (or 16) feature extractor with ``out_channels`` and ``output_stride`` attributes,
            e.g. :func:`~crfrnn_deeplab.backbone.resnet101_atrous`.
        head: features to class scores with ``in_channels`` (= ``backbone.out_channels``) and ``num_classes``
            attributes, e.g. :class:`~crfrnn_deeplab.aspp.ASPP`.
        input_convention: the preprocessing the weights expect.

    Attributes:
        backbone, head, input_convention: as given.
        num_classes: number of classes (from the head).
        output_stride: stride of the score map (from the backbone).
        min_input_size: smallest accepted image side, ``output_stride`` pixels (one feature-map cell). With
            ``norm="batch"`` in training mode PyTorch additionally needs more than one value per channel, i.e.
            a batch of 2 or a larger image.

    State_dict keys are ``backbone.*`` (torchvision ResNet names) and ``head.*`` (``head.branches.{i}.*``).
    """

    def __init__(self, *, backbone: nn.Module, head: nn.Module, input_convention: InputConvention) -> None:
        super().__init__()
        for attr in ("out_channels", "output_stride"):
            if not isinstance(getattr(backbone, attr, None), int):
                raise TypeError(f"backbone must have an int attribute {attr!r} (the backbone contract)")
        for attr in ("in_channels", "num_classes"):
            if not isinstance(getattr(head, attr, None), int):
                raise TypeError(f"head must have an int attribute {attr!r} (the head contract)")
        if head.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got head.num_classes={head.num_classes}")
        if head.in_channels != backbone.out_channels:
            raise ValueError(
                f"head.in_channels ({head.in_channels}) must equal backbone.out_channels ({backbone.out_channels})"
            )
        if not isinstance(input_convention, InputConvention):
            raise TypeError(f"input_convention must be an InputConvention, got {type(input_convention).__name__}")
        self.backbone = backbone
        self.head = head
        self.input_convention = input_convention

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    @property
    def min_input_size(self) -> int:
        return self.backbone.output_stride

    def preprocess(self, images: Tensor) -> Tensor:
        """Raw RGB 0-255 images to the network input this model's weights expect.

        Args:
            images (Tensor[B, 3, H, W]): RGB in 0-255, uint8 or float.

        Returns:
            Tensor[B, 3, H, W]: float, normalised with :attr:`input_convention`.
        """
        return self.input_convention.normalize(images)

    def scores(self, x: Tensor) -> Tensor:
        """Class scores at the backbone's resolution, before upsampling.

        Args:
            x (Tensor[B, 3, H, W]): normalised images (see :meth:`preprocess`).

        Returns:
            scores (Tensor[B, num_classes, h, w]): ``h ≈ H / output_stride`` (41 for H = 321).
        """
        _check_image(x, min_size=self.min_input_size)
        return self.head(self.backbone(x))

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel class logits at the input resolution.

        Args:
            x (Tensor[B, 3, H, W]): normalised images (see :meth:`preprocess`), floating point.

        Returns:
            logits (Tensor[B, num_classes, H, W]): stride-8 scores upsampled bilinearly
            (``align_corners=False``).

        Raises:
            TypeError: ``x`` is not a tensor or not floating point.
            ValueError: ``x`` is not 4-D, has not 3 channels, or a side is below :attr:`min_input_size`.
        """
        return _resize(self.scores(x), (x.shape[-2], x.shape[-1]))

    # Parameter groups for the DeepLab v2 learning rates (1x backbone, 10x head weights, 20x head biases),
    # chosen by module structure. Only trainable parameters (frozen BatchNorm affine is left out).

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the backbone."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def head_weights(self) -> list[nn.Parameter]:
        """Trainable multi-dimensional parameters of the head (conv kernels)."""
        return [p for p in self.head.parameters() if p.requires_grad and p.ndim > 1]

    def head_biases(self) -> list[nn.Parameter]:
        """Trainable one-dimensional parameters of the head (biases; no weight decay in DeepLab v2)."""
        return [p for p in self.head.parameters() if p.requires_grad and p.ndim <= 1]

    def predict(self, images, **options) -> Prediction | list[Prediction]:
        """Segments raw RGB images (numpy ``uint8 [H, W, 3]``, PIL, or ``Tensor[3, H, W]`` / ``[B, 3, H, W]`` in
        0-255) in eval mode: :func:`crfrnn_deeplab.inference.predict`, whose keyword options it takes.

        Returns:
            One :class:`~crfrnn_deeplab.inference.Prediction` for one image, a list for a list or a 4-D tensor.
        """
        from crfrnn_deeplab.inference import _predict_method  # here: inference imports this module

        return _predict_method(self, images, **options)


def check_scales(scales: object) -> tuple[float, ...]:
    """Input scales (MSC, test-time augmentation) as a tuple of floats.

    Raises:
        ValueError: not a non-empty sequence of positive finite numbers.
    """
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"scales must be positive finite numbers, got {tuple(scales)!r}")
    return tuple(float(s) for s in scales)


class MSCOutput(NamedTuple):
    """What :class:`MSC` returns in training mode (every entry gets a loss).

    Attributes:
        fused (Tensor[B, C, H, W]): element-wise max over the scales.
        per_scale (list[Tensor[B, C, H, W]]): the logits of each scale, in the order of ``MSC.scales``,
            upsampled to the input size.
    """

    fused: Tensor
    per_scale: list[Tensor]


def _scaled_size(size: int, scale: float) -> int:
    """Side of the rescaled image: ``floor((size - 1) * scale) + 1``, as DeepLab v2's Caffe ``Interp`` layer
    (321 → 241 at 0.75, → 161 at 0.5; the stride-8 score maps are then 41, 31 and 21)."""
    return math.floor((size - 1) * scale) + 1


class MSC(nn.Module):
    """Multi-scale inputs with max fusion ("MSC" in DeepLab v2, Sec. 4.1; Chen et al., Attention to Scale, 2016).

    The image is resized bilinearly (``align_corners=False``) to each scale (side ``floor((S - 1) * s) + 1``),
    passed through the shared model, each score map is upsampled bilinearly to the input size, and the
    results are fused by element-wise max.

    Args:
        model: the shared :class:`DeepLabV2`.
        scales: input scales, e.g. :data:`MSC_SCALES` = (1.0, 0.75, 0.5).

    Attributes:
        model, scales: as given (``scales`` as a tuple of floats). State_dict keys are ``model.*``.
        input_convention, num_classes, output_stride: those of ``model``.
        min_input_size: smallest accepted image side, so that every rescaled image has a side of at least
            ``model.min_input_size`` (15 for stride 8 and the default scales).
    """

    def __init__(self, *, model: DeepLabV2, scales: Sequence[float] = MSC_SCALES) -> None:
        super().__init__()
        if not isinstance(model, DeepLabV2):
            raise TypeError(f"model must be a DeepLabV2, got {type(model).__name__}")
        self.model = model
        self.scales = check_scales(scales)
        min_size = model.min_input_size
        while any(_scaled_size(min_size, s) < model.min_input_size for s in self.scales):
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
            TypeError: ``x`` is not a tensor or not floating point.
            ValueError: ``x`` is not 4-D, has not 3 channels, or a side is below :attr:`min_input_size`.
        """
        _check_image(x, min_size=self.min_input_size)
        height, width = x.shape[-2:]
        per_scale = []
        for s in self.scales:
            xs = _resize(x, (_scaled_size(height, s), _scaled_size(width, s)))
            per_scale.append(_resize(self.model.scores(xs), (height, width)))
        fused = functools.reduce(torch.maximum, per_scale)
        return MSCOutput(fused, per_scale) if self.training else fused

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the backbone; see :meth:`DeepLabV2.backbone_parameters`."""
        return self.model.backbone_parameters()

    def head_weights(self) -> list[nn.Parameter]:
        """Trainable head weights; see :meth:`DeepLabV2.head_weights`."""
        return self.model.head_weights()

    def head_biases(self) -> list[nn.Parameter]:
        """Trainable head biases; see :meth:`DeepLabV2.head_biases`."""
        return self.model.head_biases()

    def predict(self, images, **options) -> Prediction | list[Prediction]:
        """Segments raw RGB images (numpy ``uint8 [H, W, 3]``, PIL, or ``Tensor[3, H, W]`` / ``[B, 3, H, W]`` in
        0-255) in eval mode: :func:`crfrnn_deeplab.inference.predict`, whose keyword options it takes.

        Returns:
            One :class:`~crfrnn_deeplab.inference.Prediction` for one image, a list for a list or a 4-D tensor.
        """
        from crfrnn_deeplab.inference import _predict_method  # here: inference imports this module

        return _predict_method(self, images, **options)


# ---------------------------------------------------------------------------------------------------------
# Registered builders. ResNet-50/101 default to the Caffe DeepLab v2 layout and input convention (the
# converted weights); the light ResNet-18/34 default to the torchvision convention and trainable BatchNorm
# (they are meant for CPU demos trained from scratch).


def _msc_variant(builder):
    """Registers ``<builder>_msc``: the builder's model in an :class:`MSC` wrapper, with the builder's typed
    keyword options plus ``scales`` (default 1, 0.75, 0.5)."""

    def msc_builder(*, num_classes: int, scales: Sequence[float] = MSC_SCALES, **options) -> MSC:
        return MSC(model=builder(num_classes=num_classes, **options), scales=scales)

    msc_builder.__name__ = msc_builder.__qualname__ = f"{builder.__name__}_msc"
    msc_builder.__doc__ = (
        f":func:`{builder.__name__}` in an :class:`MSC` wrapper with ``scales`` (default 1, 0.75, 0.5); "
        f"the other options are :func:`{builder.__name__}`'s."
    )
    signature = inspect.signature(builder)
    scales = inspect.Parameter(
        "scales", inspect.Parameter.KEYWORD_ONLY, default=MSC_SCALES, annotation="Sequence[float]"
    )
    parameters = list(signature.parameters.values())  # num_classes first, then scales, then the builder's
    msc_builder.__signature__ = signature.replace(
        parameters=parameters[:1] + [scales] + parameters[1:], return_annotation="MSC"
    )
    return register_model(msc_builder)


def _deeplabv2(
    backbone: AtrousResNet, *, num_classes: int, head: HeadKind, input_convention: InputConvention
) -> DeepLabV2:
    return DeepLabV2(
        backbone=backbone,
        head=build_head(head, in_channels=backbone.out_channels, num_classes=num_classes),
        input_convention=input_convention,
    )


@register_model
def deeplabv2_resnet101(
    *,
    num_classes: int,
    output_stride: int = 8,
    head: HeadKind = "aspp_l",
    norm: NormKind = "frozen",
    stride_in_1x1: bool = True,
    ceil_mode: bool = True,
    dilate_first_block: bool = True,
    input_convention: InputConvention = CAFFE_CONVENTION,
) -> DeepLabV2:
    """DeepLab v2 with an atrous ResNet-101 (44,048,532 parameters with ASPP-L and 21 classes).

    Args:
        num_classes: number of classes.
        output_stride: 8 or 16.
        head: ``"aspp_l"``, ``"aspp_s"`` or ``"largefov"``.
        norm: BatchNorm policy, ``"frozen"`` (DeepLab v2), ``"batch"`` or ``"sync"``.
        stride_in_1x1, ceil_mode, dilate_first_block: Caffe (True, default) or torchvision (False) layout,
            see :mod:`crfrnn_deeplab.backbone`.
        input_convention: preprocessing of the weights to be loaded (Caffe BGR mean-subtraction by default).
    """
    backbone = resnet101_atrous(
        output_stride=output_stride,
        norm=norm,
        stride_in_1x1=stride_in_1x1,
        ceil_mode=ceil_mode,
        dilate_first_block=dilate_first_block,
    )
    return _deeplabv2(backbone, num_classes=num_classes, head=head, input_convention=input_convention)



@register_model
def deeplabv2_resnet50(
    *,
    num_classes: int,
    output_stride: int = 8,
    head: HeadKind = "aspp_l",
    norm: NormKind = "frozen",
    stride_in_1x1: bool = True,
    ceil_mode: bool = True,
    dilate_first_block: bool = True,
    input_convention: InputConvention = CAFFE_CONVENTION,
) -> DeepLabV2:
    """DeepLab v2 with an atrous ResNet-50. Args: as :func:`deeplabv2_resnet101`."""
    backbone = resnet50_atrous(
        output_stride=output_stride,
        norm=norm,
        stride_in_1x1=stride_in_1x1,
        ceil_mode=ceil_mode,
        dilate_first_block=dilate_first_block,
    )
    return _deeplabv2(backbone, num_classes=num_classes, head=head, input_convention=input_convention)



@register_model
def deeplabv2_resnet18(
    *,
    num_classes: int,
    output_stride: int = 8,
    head: HeadKind = "aspp_l",
    norm: NormKind = "batch",
    ceil_mode: bool = True,
    dilate_first_block: bool = True,
    base_width: int = 64,
    input_convention: InputConvention = TORCHVISION_CONVENTION,
) -> DeepLabV2:
    """Light DeepLab v2 with an atrous ResNet-18, for CPU demos and tests.

    Args:
        num_classes: number of classes.
        output_stride: 8 or 16.
        head: ``"aspp_l"``, ``"aspp_s"`` or ``"largefov"``.
        norm: BatchNorm policy; ``"batch"`` by default since light models are usually trained from scratch
            (use ``"frozen"`` with pretrained torchvision weights).
        ceil_mode, dilate_first_block: see :func:`~crfrnn_deeplab.backbone.resnet18_atrous`.
        base_width: stage widths ``base_width * (1, 2, 4, 8)``; 64 is ResNet-18, 16 a fast test network.
        input_convention: preprocessing of the weights (torchvision ImageNet by default).
    """
    backbone = resnet18_atrous(
        output_stride=output_stride,
        norm=norm,
        ceil_mode=ceil_mode,
        dilate_first_block=dilate_first_block,
        base_width=base_width,
    )
    return _deeplabv2(backbone, num_classes=num_classes, head=head, input_convention=input_convention)



@register_model
def deeplabv2_resnet34(
    *,
    num_classes: int,
    output_stride: int = 8,
    head: HeadKind = "aspp_l",
    norm: NormKind = "batch",
    ceil_mode: bool = True,
    dilate_first_block: bool = True,
    base_width: int = 64,
    input_convention: InputConvention = TORCHVISION_CONVENTION,
) -> DeepLabV2:
    """Light DeepLab v2 with an atrous ResNet-34. Args: as :func:`deeplabv2_resnet18`."""
    backbone = resnet34_atrous(
        output_stride=output_stride,
        norm=norm,
        ceil_mode=ceil_mode,
        dilate_first_block=dilate_first_block,
        base_width=base_width,
    )
    return _deeplabv2(backbone, num_classes=num_classes, head=head, input_convention=input_convention)


deeplabv2_resnet101_msc = _msc_variant(deeplabv2_resnet101)
deeplabv2_resnet50_msc = _msc_variant(deeplabv2_resnet50)
deeplabv2_resnet18_msc = _msc_variant(deeplabv2_resnet18)
deeplabv2_resnet34_msc = _msc_variant(deeplabv2_resnet34)
