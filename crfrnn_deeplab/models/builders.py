"""The registered DeepLab v2 builders: ``deeplabv2_resnet{18,34,50,101}`` and their ``_msc`` variants.

ResNet-50/101 default to the Caffe DeepLab v2 layout and input convention (the converted weights); the light
ResNet-18/34 default to the torchvision convention and trainable BatchNorm (they are meant for CPU demos trained
from scratch). Build them by name with :func:`crfrnn_deeplab.models.registry.get_model`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from crfrnn_deeplab.models.aspp import HeadKind, build_head
from crfrnn_deeplab.models.backbone import (
    AtrousResNet,
    NormKind,
    resnet18_atrous,
    resnet34_atrous,
    resnet50_atrous,
    resnet101_atrous,
)
from crfrnn_deeplab.models.conventions import CAFFE_CONVENTION, TORCHVISION_CONVENTION, InputConvention
from crfrnn_deeplab.models.deeplab import DeepLabV2
from crfrnn_deeplab.models.msc import MSC, MSC_SCALES, Fusion, ImageResize
from crfrnn_deeplab.models.registry import register_model

__all__ = [
    "deeplabv2_resnet18",
    "deeplabv2_resnet18_msc",
    "deeplabv2_resnet34",
    "deeplabv2_resnet34_msc",
    "deeplabv2_resnet50",
    "deeplabv2_resnet50_msc",
    "deeplabv2_resnet101",
    "deeplabv2_resnet101_msc",
]

def _msc_variant(builder):
    """Registers ``<builder>_msc``: the builder's model in an :class:`MSC` wrapper, with the builder's typed
    keyword options plus ``scales`` (default 1, 0.75, 0.5), ``fusion`` and ``image_resize``."""

    def msc_builder(*, num_classes: int, scales: Sequence[float] = MSC_SCALES, fusion: Fusion = "input",
                    image_resize: ImageResize = "caffe", **options) -> MSC:
        model = builder(num_classes=num_classes, **options)
        return MSC(model=model, scales=scales, fusion=fusion, image_resize=image_resize)

    msc_builder.__name__ = msc_builder.__qualname__ = f"{builder.__name__}_msc"
    msc_builder.__doc__ = (
        f":func:`{builder.__name__}` in an :class:`MSC` wrapper with ``scales`` (default 1, 0.75, 0.5) and "
        f"``fusion`` (``'input'`` or DeepLab v2's ``'score_map'``) and ``image_resize``; the other options are "
        f":func:`{builder.__name__}`'s."
    )
    signature = inspect.signature(builder)
    keyword = inspect.Parameter.KEYWORD_ONLY
    added = [
        inspect.Parameter("scales", keyword, default=MSC_SCALES, annotation="Sequence[float]"),
        inspect.Parameter("fusion", keyword, default="input", annotation="Fusion"),
        inspect.Parameter("image_resize", keyword, default="caffe", annotation="ImageResize"),
    ]
    parameters = list(signature.parameters.values())  # num_classes first, then scales and fusion, then the builder's
    msc_builder.__signature__ = signature.replace(parameters=parameters[:1] + added + parameters[1:], return_annotation="MSC")
    return register_model(msc_builder, multi_scale=True)


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
            see :mod:`crfrnn_deeplab.models.backbone`.
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
        ceil_mode, dilate_first_block: see :func:`~crfrnn_deeplab.models.backbone.resnet18_atrous`.
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
