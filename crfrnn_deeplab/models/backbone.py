"""Atrous ResNet backbones: stride-8 (or 16) feature extractors for DeepLab v2.

DeepLab v2 (Chen et al., TPAMI 2017, Sec. 3.1) keeps the resolution of the last two ResNet stages by replacing
their stride with dilation ("atrous" convolution): at output stride 8, ``layer3`` runs at dilation 2 and
``layer4`` at dilation 4, so a 321×321 image gives a 41×41 feature map.

ResNet-50/101 are torchvision's own ``resnet50`` / ``resnet101`` (built with ``weights=None``; nothing is ever
downloaded) with ``avgpool`` and ``fc`` dropped. The state_dict keys stay exactly torchvision's (``conv1``,
``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ...), so torchvision checkpoints load with
``strict=True``. Three switches select between the layout of the Caffe-converted DeepLab v2 weights (the
defaults) and torchvision's:

- ``stride_in_1x1``: a downsampling Bottleneck has its stride in the first 1×1 conv, ``conv1`` (Caffe), or in
  the 3×3 conv, ``conv2`` (torchvision, "ResNet v1.5");
- ``ceil_mode``: the stem max-pool rounds its output size up (Caffe) or down (torchvision);
- ``dilate_first_block``: the first block of a dilated stage already runs at the stage's dilation, 2 / 4
  (Caffe), or keeps the previous stage's, 1 / 2 (torchvision).

None of them changes a parameter shape or name; they change which weights are *correct* for the network.

The light backbones (ResNet-18/34) are for CPU demos and fast tests. torchvision's ``BasicBlock`` refuses
dilation, so they use :class:`BasicBlock` from this module, which has the same key names; with the default
``base_width=64`` torchvision's resnet18/34 checkpoints load into them.

Backbone contract (what :class:`~crfrnn_deeplab.models.deeplab.DeepLabV2` relies on): ``forward(x: Tensor[B, 3, H, W])
-> Tensor[B, out_channels, h, w]`` and the attributes ``out_channels`` and ``output_stride``. At output stride 8
with the default ``ceil_mode=True``, ``h = ceil((floor(ceil(H / 2) / 2) + 1) / 2)``: the 7×7/2 conv, the
3×3/2 max-pool and the one stride-2 stage, e.g. 321 → 161 → 81 → 41 (and 320 → 160 → 81 → 41, where
``ceil_mode=False`` gives 160 → 80 → 40). Stride 16 adds one more halving, rounded up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

__all__ = [
    "NormKind",
    "BasicBlock",
    "AtrousResNet",
    "resnet18_atrous",
    "resnet34_atrous",
    "resnet50_atrous",
    "resnet101_atrous",
]

NormKind = Literal["frozen", "batch", "sync"]
_NORM_KINDS: tuple[str, ...] = ("frozen", "batch", "sync")
_OUTPUT_STRIDES: tuple[int, ...] = (8, 16)


def _stage_plan(output_stride: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Strides and dilations of ``layer1..layer4`` for an output stride (the stem contributes 4)."""
    _check_output_stride(output_stride)
    if output_stride == 8:
        return (1, 2, 1, 1), (1, 1, 2, 4)
    if output_stride == 16:
        return (1, 2, 2, 1), (1, 1, 1, 2)
    raise ValueError(f"output_stride must be one of {_OUTPUT_STRIDES}, got {output_stride!r}")


def _check_output_stride(output_stride: object) -> None:
    # an int, not merely equal to one: 8.0 would pass `in (8, 16)` and break the int contract downstream
    if isinstance(output_stride, bool) or not isinstance(output_stride, int) or output_stride not in _OUTPUT_STRIDES:
        kind = "" if isinstance(output_stride, int) and not isinstance(output_stride, bool) else (
            f" (a {type(output_stride).__name__}; an int is needed)")
        raise ValueError(f"output_stride must be one of {_OUTPUT_STRIDES}, got {output_stride!r}{kind}")


def _check_norm(norm: str) -> None:
    if norm not in _NORM_KINDS:
        raise ValueError(f"norm must be one of {_NORM_KINDS}, got {norm!r}")


class BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convs) with dilation; torchvision's key names.

    With ``first_dilation`` set, the first 3×3 conv (the one that carries the stride in a downsampling block)
    uses it instead of ``dilation``: this is how a block keeps the previous stage's dilation.

    Args:
        inplanes: input channels.
        planes: output channels (``expansion == 1``).
        stride: stride of ``conv1`` (and of ``downsample``, which the caller builds).
        dilation: dilation (= padding) of ``conv2``, and of ``conv1`` unless ``first_dilation`` is given.
        first_dilation: dilation of ``conv1``; ``None`` means ``dilation``.
        downsample: projection shortcut ``Sequential(conv1x1, norm)`` or ``None`` for the identity.
        norm_layer: normalisation constructor, called with the channel count.

    Shape:
        ``Tensor[B, inplanes, H, W] -> Tensor[B, planes, H / stride, W / stride]`` (rounded up).
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        downsample: nn.Module | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        d1 = dilation if first_dilation is None else first_dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=d1, dilation=d1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class AtrousResNet(nn.Module):
    """A ResNet trunk without ``avgpool``/``fc``, at output stride 8 or 16.

    Usually built by :func:`resnet18_atrous` ... :func:`resnet101_atrous`, which plan the strides and
    dilations; the constructor takes the assembled parts and applies the BatchNorm policy.

    BatchNorm policy (``norm``):

    - ``"frozen"`` (DeepLab v2): the modules stay ordinary ``nn.BatchNorm2d`` (torchvision's keys, running
      stats in the state_dict, weight/bias still ``nn.Parameter`` and counted in the parameter total), but
      weight/bias have ``requires_grad=False`` and every BatchNorm stays in eval mode when the model is put in
      ``.train()``: neither the statistics nor the affine parameters change in a training step. (Calling
      ``requires_grad_(True)`` on the backbone afterwards would unfreeze the affine parameters: use
      ``norm="batch"`` for trainable BatchNorm instead.)
    - ``"batch"``: ordinary trainable ``nn.BatchNorm2d``.
    - ``"sync"``: ``nn.SyncBatchNorm`` (statistics synchronised across a ``torch.distributed`` process
      group; same keys).

    Args:
        conv1: stem 7×7 conv, stride 2.
        bn1: stem BatchNorm.
        maxpool: stem 3×3 max-pool, stride 2.
        layers: the four residual stages (become ``layer1`` ... ``layer4``).
        out_channels: channels of ``layer4``'s output.
        output_stride: total stride of the trunk, 8 or 16.
        norm: BatchNorm policy, see above.

    Attributes:
        out_channels: channels of the feature map (2048 for ResNet-50/101, ``8 * base_width`` for 18/34).
        output_stride: 8 or 16.
        norm: the BatchNorm policy.
    """

    def __init__(
        self,
        *,
        conv1: nn.Conv2d,
        bn1: nn.Module,
        maxpool: nn.MaxPool2d,
        layers: Sequence[nn.Sequential],
        out_channels: int,
        output_stride: int,
        norm: NormKind = "frozen",
    ) -> None:
        super().__init__()
        _check_norm(norm)
        _check_output_stride(output_stride)
        if len(layers) != 4:
            raise ValueError(f"expected 4 residual stages, got {len(layers)}")
        self.conv1 = conv1
        self.bn1 = bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = out_channels
        self.output_stride = output_stride
        self.norm = norm

        if norm == "sync":
            for name, child in list(self.named_children()):
                setattr(self, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        elif norm == "frozen":
            for m in self._batchnorms():
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
        self.train(self.training)  # puts frozen BatchNorm in eval mode right away

    def _batchnorms(self) -> list[nn.modules.batchnorm._BatchNorm]:
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> AtrousResNet:
        """Set training mode; with ``norm="frozen"`` every BatchNorm stays in eval mode."""
        super().train(mode)
        if self.norm == "frozen":
            for m in self._batchnorms():
                m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Compute the stride-8 (or 16) feature map.

        Args:
            x (Tensor[B, 3, H, W]): normalised images.

        Returns:
            features (Tensor[B, out_channels, h, w]): ``h ≈ H / output_stride`` (41 for H = 321 at stride 8).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, output_stride={self.output_stride}, norm={self.norm!r}"


# ---------------------------------------------------------------------------------------------------------
# ResNet-50/101: torchvision's model, adjusted to the requested layout.


def _bottleneck_resnet(
    tv_builder: Callable[..., tv_resnet.ResNet],
    *,
    output_stride: int,
    norm: NormKind,
    stride_in_1x1: bool,
    ceil_mode: bool,
    dilate_first_block: bool,
) -> AtrousResNet:
    _check_norm(norm)
    _, dilations = _stage_plan(output_stride)
    # torchvision turns the stride of a stage into dilation; its first block keeps the previous dilation.
    net = tv_builder(weights=None, replace_stride_with_dilation=[d > 1 for d in dilations[1:]])
    layers = (net.layer1, net.layer2, net.layer3, net.layer4)
    for layer, dilation in zip(layers, dilations):
        for block in layer:
            if stride_in_1x1 and block.conv2.stride != (1, 1):
                block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
        if dilate_first_block:
            layer[0].conv2.dilation = layer[0].conv2.padding = (dilation, dilation)
    net.maxpool.ceil_mode = ceil_mode
    return AtrousResNet(
        conv1=net.conv1,
        bn1=net.bn1,
        maxpool=net.maxpool,
        layers=layers,
        out_channels=512 * tv_resnet.Bottleneck.expansion,
        output_stride=output_stride,
        norm=norm,
    )


def resnet50_atrous(
    *,
    output_stride: int = 8,
    norm: NormKind = "frozen",
    stride_in_1x1: bool = True,
    ceil_mode: bool = True,
    dilate_first_block: bool = True,
) -> AtrousResNet:
    """Atrous ResNet-50 (torchvision's, randomly initialised), 2048 output channels.

    Args:
        output_stride: 8 (``layer3``/``layer4`` at dilation 2/4) or 16 (``layer4`` at dilation 2).
        norm: BatchNorm policy, ``"frozen"``, ``"batch"`` or ``"sync"`` (see :class:`AtrousResNet`).
        stride_in_1x1: put a downsampling block's stride in its first 1×1 conv (Caffe) instead of the 3×3.
        ceil_mode: round the stem max-pool's output size up (Caffe) instead of down.
        dilate_first_block: give the first block of a dilated stage the stage's dilation (Caffe) instead of
            the previous stage's (torchvision).
    """
    return _bottleneck_resnet(
        tv_resnet.resnet50,
        output_stride=output_stride,
        norm=norm,
        stride_in_1x1=stride_in_1x1,
        ceil_mode=ceil_mode,
        dilate_first_block=dilate_first_block,
    )


def resnet101_atrous(
    *,
    output_stride: int = 8,
    norm: NormKind = "frozen",
    stride_in_1x1: bool = True,
    ceil_mode: bool = True,
    dilate_first_block: bool = True,
) -> AtrousResNet:
    """Atrous ResNet-101 (torchvision's, randomly initialised), 2048 output channels, 42,500,160 parameters.

    Args: as :func:`resnet50_atrous`.
    """
    return _bottleneck_resnet(
        tv_resnet.resnet101,
        output_stride=output_stride,
        norm=norm,
        stride_in_1x1=stride_in_1x1,
        ceil_mode=ceil_mode,
        dilate_first_block=dilate_first_block,
    )


# ---------------------------------------------------------------------------------------------------------
# ResNet-18/34: built here from BasicBlock, in torchvision's layout.


def _conv_init_(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: He (fan-out) for convs, identity for BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _basic_resnet(
    blocks_per_stage: tuple[int, int, int, int],
    *,
    output_stride: int,
    norm: NormKind,
    ceil_mode: bool,
    dilate_first_block: bool,
    base_width: int,
) -> AtrousResNet:
    _check_norm(norm)
    if isinstance(base_width, bool) or not isinstance(base_width, int) or base_width < 1:
        raise ValueError(f"base_width must be a positive int, got {base_width!r}")
    strides, dilations = _stage_plan(output_stride)
    widths = tuple(base_width * m for m in (1, 2, 4, 8))

    conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
    bn1 = nn.BatchNorm2d(base_width)
    maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=ceil_mode)
    layers = []
    inplanes, previous_dilation = base_width, 1
    for planes, n_blocks, stride, dilation in zip(widths, blocks_per_stage, strides, dilations):
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        first = BasicBlock(
            inplanes,
            planes,
            stride=stride,
            dilation=dilation,
            first_dilation=dilation if dilate_first_block else previous_dilation,
            downsample=downsample,
        )
        rest = [BasicBlock(planes, planes, dilation=dilation) for _ in range(n_blocks - 1)]
        layers.append(nn.Sequential(first, *rest))
        inplanes, previous_dilation = planes, dilation

    _conv_init_(nn.ModuleList([conv1, bn1, *layers]))
    return AtrousResNet(
        conv1=conv1,
        bn1=bn1,
        maxpool=maxpool,
        layers=layers,
        out_channels=widths[-1],
        output_stride=output_stride,
        norm=norm,
    )


def resnet18_atrous(
    *,
    output_stride: int = 8,
    norm: NormKind = "frozen",
    ceil_mode: bool = True,
    dilate_first_block: bool = True,
    base_width: int = 64,
) -> AtrousResNet:
    """Light atrous ResNet-18 built from :class:`BasicBlock`, ``8 * base_width`` output channels.

    Args:
        output_stride: 8 or 16.
        norm: BatchNorm policy, ``"frozen"``, ``"batch"`` or ``"sync"`` (see :class:`AtrousResNet`).
        ceil_mode: round the stem max-pool's output size up (as the DeepLab v2 models do).
        dilate_first_block: give the first block of a dilated stage the stage's dilation in both convs;
            when False its first conv keeps the previous stage's dilation.
        base_width: channels of the stem and ``layer1``; the stages have ``base_width * (1, 2, 4, 8)``.
            64 is ResNet-18 proper (torchvision checkpoints load); e.g. 16 gives a fast network for tests.
    """
    return _basic_resnet(
        (2, 2, 2, 2),
        output_stride=output_stride,
        norm=norm,
        ceil_mode=ceil_mode,
        dilate_first_block=dilate_first_block,
        base_width=base_width,
    )


def resnet34_atrous(
    *,
    output_stride: int = 8,
    norm: NormKind = "frozen",
    ceil_mode: bool = True,
    dilate_first_block: bool = True,
    base_width: int = 64,
) -> AtrousResNet:
    """Light atrous ResNet-34 built from :class:`BasicBlock`, ``8 * base_width`` output channels.

    Args: as :func:`resnet18_atrous`.
    """
    return _basic_resnet(
        (3, 4, 6, 3),
        output_stride=output_stride,
        norm=norm,
        ceil_mode=ceil_mode,
        dilate_first_block=dilate_first_block,
        base_width=base_width,
    )
