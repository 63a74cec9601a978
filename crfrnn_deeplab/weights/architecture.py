"""The architecture a checkpoint's weights were trained with, read from the weights and from a model, and the
check that refuses a model they were not trained for.

The same weights in another block layout compute something else, so the layout is part of what a checkpoint
needs. The Caffe DeepLab v2 network puts a stage's stride in the 1×1 conv, uses a ceil-mode max-pool and dilates
the first block of a dilated stage too (``stride_in_1x1=True, ceil_mode=True, dilate_first_block=True``);
torchvision's ResNet puts the stride in the 3×3 conv, uses a floor-mode max-pool and runs the first block of a
dilated stage at the previous stage's dilation (all three ``False``). Our checkpoints record their builder
options. The head's ASPP rates must match too (every released Caffe DeepLab v2 ResNet-101 uses ASPP-L); the
output stride may differ (it is noted). BatchNorm: Caffe's and kazuto1011's eps is 1e-5, torchvision's
default, so no conversion is needed.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from torch import nn

from crfrnn_deeplab.crf.mean_field import MeanFieldCRF
from crfrnn_deeplab.models.aspp import ASPP_L_RATES, HEAD_RATES
from crfrnn_deeplab.models.crfrnn import CRFRNN
from crfrnn_deeplab.models.deeplab import DeepLabV2
from crfrnn_deeplab.models.msc import MSC
from crfrnn_deeplab.models.registry import builder_defaults, list_models
from crfrnn_deeplab.weights.layouts import CAFFE_LAYOUTS, TORCHVISION_LAYOUTS, ConversionError, ConvertedStateDict

__all__ = [
    "BLOCK_OPTIONS",
    "CAFFE_BLOCKS",
    "TORCHVISION_BLOCKS",
    "ModelParts",
    "Trunk",
    "check_architecture",
    "checkpoint_trunk",
    "model_parts",
    "model_trunk",
    "recorded_options",
]

#: The builder options that choose the block layout of a ResNet trunk.
BLOCK_OPTIONS: tuple[str, ...] = ("stride_in_1x1", "ceil_mode", "dilate_first_block")
CAFFE_BLOCKS: dict[str, bool] = {"stride_in_1x1": True, "ceil_mode": True, "dilate_first_block": True}
TORCHVISION_BLOCKS: dict[str, bool] = {"stride_in_1x1": False, "ceil_mode": False, "dilate_first_block": False}


class Trunk(NamedTuple):
    """A ResNet trunk as its weights show it: blocks per stage (``layer1..layer4``) and the block type."""

    blocks: tuple[int, ...]
    bottleneck: bool

    @property
    def depth(self) -> int | None:
        """18, 34, 50 or 101 for the ResNets DeepLab v2 is registered with; ``None`` otherwise."""
        return _RESNETS.get(self, (None, None))[0]

    @property
    def network(self) -> str | None:
        """The registered single-scale DeepLab v2 model with this trunk, or ``None``."""
        return _RESNETS.get(self, (None, None))[1]

    def describe(self) -> str:
        kind = "Bottleneck" if self.bottleneck else "BasicBlock"
        return f"ResNet-{self.depth}" if self.depth else f"a ResNet with {kind}s {self.blocks}"


# trunk -> (depth, the registered single-scale DeepLab v2 model built on it)
_RESNETS: dict[Trunk, tuple[int, str]] = {
    Trunk((2, 2, 2, 2), False): (18, "deeplabv2_resnet18"),
    Trunk((3, 4, 6, 3), False): (34, "deeplabv2_resnet34"),
    Trunk((3, 4, 6, 3), True): (50, "deeplabv2_resnet50"),
    Trunk((3, 4, 23, 3), True): (101, "deeplabv2_resnet101"),
}


class ModelParts(NamedTuple):
    """Where the weights go in a model.

    Attributes:
        root: the model without DataParallel/DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.
        network: the bare :class:`~crfrnn_deeplab.models.DeepLabV2` inside it.
        prefix: the prefix of the network's keys in ``root``'s state dict (``"network.model."``, ...).
        crf: the CRF layer, or ``None``.
    """

    root: nn.Module
    network: DeepLabV2
    prefix: str
    crf: MeanFieldCRF | None


def model_parts(model: nn.Module) -> ModelParts:
    """The parts of a DeepLabV2, MSC or CRFRNN model (also inside DataParallel/DDP or ``torch.compile``).

    Raises:
        TypeError: any other model.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    root, crf, prefix = model, None, ""
    if isinstance(model, CRFRNN):
        crf, model, prefix = model.crf, model.network, "network."
    if isinstance(model, MSC):
        model, prefix = model.model, prefix + "model."
    if not isinstance(model, DeepLabV2):
        raise TypeError(f"can load into a DeepLabV2, MSC or CRFRNN model, got {type(model).__name__}")
    return ModelParts(root, model, prefix, crf)


def model_trunk(backbone: nn.Module) -> tuple[Trunk, dict[str, bool]] | None:
    """The trunk of an atrous ResNet and its block-layout switches (:data:`BLOCK_OPTIONS`), read from its modules
    (``None`` for a backbone that is not a ResNet with ``layer1..layer4``)."""
    stages = [getattr(backbone, f"layer{i}", None) for i in range(1, 5)]
    if not all(isinstance(s, nn.Sequential) and len(s) for s in stages) or not hasattr(backbone, "maxpool"):
        return None
    first, last = stages[3][0], stages[3][-1]
    bottleneck = hasattr(first, "conv3")
    first_3x3 = first.conv2 if bottleneck else first.conv1  # the 3×3 that a first block may keep undilated
    switches = {
        "ceil_mode": bool(backbone.maxpool.ceil_mode),
        "dilate_first_block": first_3x3.dilation == last.conv2.dilation,
    }
    if bottleneck:
        switches["stride_in_1x1"] = stages[1][0].conv1.stride != (1, 1)
    return Trunk(tuple(len(s) for s in stages), bottleneck), switches


def checkpoint_trunk(converted: ConvertedStateDict) -> Trunk | None:
    """The trunk the checkpoint's weights hold, or ``None`` when it has no complete ``layer1..layer4``."""
    blocks = []
    for stage in range(1, 5):
        ids = {int(m[1]) for k in converted.state_dict if (m := re.match(rf"backbone\.layer{stage}\.(\d+)\.", k))}
        if not ids:
            return None
        blocks.append(max(ids) + 1)
    return Trunk(tuple(blocks), "backbone.layer1.0.conv3.weight" in converted.state_dict)


def recorded_options(converted: ConvertedStateDict) -> dict[str, Any] | None:
    """The builder options of one of our checkpoints (its ``model_config`` resolved with the builder's
    defaults), or ``None`` when the checkpoint does not record them."""
    config = converted.model_config
    if config is None:
        return None
    defaults = builder_defaults(config["name"]) if config["name"] in list_models() else {}
    return {**defaults, **dict(config.get("options") or {})}


def _trained_architecture(converted: ConvertedStateDict) -> tuple[dict[str, bool], tuple[int, ...] | None]:
    """The block-layout switches and head rates the weights were trained with ({} / None: unknown)."""
    if converted.layout in CAFFE_LAYOUTS:
        return dict(CAFFE_BLOCKS), ASPP_L_RATES  # every released Caffe DeepLab v2 ResNet-101 uses ASPP-L
    if converted.layout in TORCHVISION_LAYOUTS:
        return dict(TORCHVISION_BLOCKS), None
    options = recorded_options(converted)
    if options is None:
        return {}, None
    blocks = {k: bool(options[k]) for k in BLOCK_OPTIONS if k in options}
    head = options.get("head")
    return blocks, HEAD_RATES.get(head) if isinstance(head, str) else None


def _check_head(net: DeepLabV2, rates: tuple[int, ...] | None) -> None:
    head_rates = getattr(net.head, "rates", None)
    if rates is None or head_rates is None or tuple(head_rates) == tuple(rates):
        return
    name = next((n for n, r in HEAD_RATES.items() if r == tuple(rates)), None)
    option = f"head={name!r}" if name else f"an ASPP with rates {tuple(rates)}"
    raise ConversionError(
        f"the checkpoint's classifier has ASPP rates {tuple(rates)}, the model's head {tuple(head_rates)}: "
        f"build the model with {option} (or use model_for_checkpoint)"
    )


def check_architecture(net: DeepLabV2, converted: ConvertedStateDict, *, loads_head: bool) -> list[str]:
    """Refuses a model the weights were not trained for (another depth, block layout or, when the head is
    loaded, head rates), naming the builder option to change; returns notes on legitimate differences.

    Raises:
        ConversionError: the model's architecture differs from the weights'.
    """
    layout = converted.layout
    found = model_trunk(net.backbone)
    if found is None:
        if layout != "crfrnn_deeplab":
            raise ConversionError(f"{layout!r} checkpoints hold a ResNet trunk; the model's backbone is not a ResNet")
        return []
    trunk, switches = found
    held = checkpoint_trunk(converted)
    if held is not None and held != trunk:
        hint = f" (build {held.network}, or use model_for_checkpoint)" if held.network else ""
        raise ConversionError(f"the checkpoint holds {held.describe()}, the model {trunk.describe()}{hint}")
    blocks, rates = _trained_architecture(converted)
    wrong = {k: v for k, v in blocks.items() if k in switches and switches[k] != v}
    if wrong:
        family = {**dict.fromkeys(CAFFE_LAYOUTS, "the Caffe"), **dict.fromkeys(TORCHVISION_LAYOUTS, "torchvision's")}
        raise ConversionError(
            f"the {layout!r} weights were trained with {family.get(layout, 'the recorded')} block layout; build the "
            f"model with {', '.join(f'{k}={v}' for k, v in wrong.items())} (or use model_for_checkpoint): in the "
            "model's layout the same weights compute something else"
        )
    if loads_head:
        _check_head(net, rates)
    options = recorded_options(converted) if layout == "crfrnn_deeplab" else None
    trained_os = 8 if layout in CAFFE_LAYOUTS else (options or {}).get("output_stride")
    if trained_os is not None and trained_os != net.output_stride:
        return [f"weights trained at output stride {trained_os} run at output stride {net.output_stride}"]
    return []

