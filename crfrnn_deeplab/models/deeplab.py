"""DeepLab v2: an atrous backbone, an ASPP head and bilinear upsampling to the input size.

Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous Convolution, and Fully
Connected CRFs", TPAMI 2017. The model is composed from parts that are passed in:

- a backbone with the contract of :mod:`crfrnn_deeplab.models.backbone` (``forward(Tensor[B, 3, H, W]) ->
  Tensor[B, out_channels, h, w]`` at ``output_stride`` 8 or 16, attributes ``out_channels`` and
  ``output_stride``);
- a head with the contract of :class:`crfrnn_deeplab.models.aspp.ASPP` (``Tensor[B, in_channels, h, w] ->
  Tensor[B, num_classes, h, w]``, attributes ``in_channels`` and ``num_classes``);
- the :class:`~crfrnn_deeplab.models.conventions.InputConvention` its weights expect.

The multi-scale wrapper is :mod:`.msc`; the registered builders (``deeplabv2_resnet101``, ...) are in
:mod:`.builders`, built by name with :func:`crfrnn_deeplab.models.registry.get_model`.

Inputs smaller than the network accepts are an error, not a silent degenerate result: an image side must be
at least ``output_stride`` pixels (:attr:`DeepLabV2.min_input_size`, 8 by default) so that it fills one cell of
the feature map.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crfrnn_deeplab.images import check_network_input, resize
from crfrnn_deeplab.models.conventions import InputConvention
from crfrnn_deeplab.models.predictor import PredictMixin

__all__ = ["DeepLabV2"]


class DeepLabV2(PredictMixin, nn.Module):
    """DeepLab v2: ``logits = upsample(head(backbone(x)))``.

    The model carries the :class:`InputConvention` of its weights: feed ``model.preprocess(raw_rgb)``.

    Args:
        backbone: stride-8 (or 16) feature extractor with ``out_channels`` and ``output_stride`` attributes,
            e.g. :func:`~crfrnn_deeplab.models.backbone.resnet101_atrous`.
        head: features to class scores with ``in_channels`` (= ``backbone.out_channels``) and ``num_classes``
            attributes, e.g. :class:`~crfrnn_deeplab.models.aspp.ASPP`.
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

        Raises:
            TypeError, ValueError: not a raw RGB tensor in 0-255 (see :meth:`InputConvention.normalize`); a 0-1
                float image gets a warning.
        """
        return self.input_convention.normalize(images)

    def check_input(self, x: object, *, min_size: int | None = None) -> Tensor:
        """Checks a network input and returns it: a floating ``Tensor[B, 3, H, W]`` with sides of at least
        ``min_size`` (default :attr:`min_input_size`), in the dtype of the model's weights.

        Under ``torch.autocast`` for the input's device, float32, float16 and bfloat16 inputs and weights mix
        freely (autocast casts both); float64 never does.

        Raises:
            TypeError: not a tensor, not floating point, or a dtype the weights cannot take (the message names
                both dtypes and the two ways out: ``x.float()`` or ``model.double()``).
            ValueError: not 4-D, not 3 channels, an empty batch, or a side below ``min_size``.
        """
        x = check_network_input(x, min_size=self.min_input_size if min_size is None else min_size)
        weight = next((p for p in self.parameters() if p.is_floating_point()), None)
        if weight is None or x.dtype == weight.dtype:
            return x
        if torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, weight.dtype):
            return x
        raise TypeError(
            f"input: dtype {x.dtype} does not match the model's weights ({weight.dtype}); convert the input to "
            f"the weights' dtype (x.to({weight.dtype}), e.g. x.float()) or the model to the input's "
            f"(model.to({x.dtype}), e.g. model.double()), or run under torch.autocast"
            + (" (which does not take float64)" if torch.float64 in (x.dtype, weight.dtype) else "")
        )

    def scores(self, x: Tensor) -> Tensor:
        """Class scores at the backbone's resolution, before upsampling.

        Args:
            x (Tensor[B, 3, H, W]): normalised images (see :meth:`preprocess`).

        Returns:
            scores (Tensor[B, num_classes, h, w]): ``h ≈ H / output_stride`` (41 for H = 321).
        """
        self.check_input(x)
        return self.head(self.backbone(x))

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel class logits at the input resolution.

        Args:
            x (Tensor[B, 3, H, W]): normalised images (see :meth:`preprocess`), floating point.

        Returns:
            logits (Tensor[B, num_classes, H, W]): stride-8 scores upsampled bilinearly
            (``align_corners=False``).

        Raises:
            TypeError: ``x`` is not a tensor, not floating point, or not in the weights' dtype (see
                :meth:`check_input`).
            ValueError: ``x`` is not 4-D, has not 3 channels, is an empty batch, or a side is below
                :attr:`min_input_size`.
        """
        return resize(self.scores(x), (x.shape[-2], x.shape[-1]))

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
