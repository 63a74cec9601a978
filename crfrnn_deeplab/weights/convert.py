"""Checkpoint conversion: DeepLab v2 / ResNet weights of the layouts users have, loaded exactly into our models.

Every supported layout maps key by key onto our canonical keys (``backbone.*`` with torchvision's ResNet names,
``head.branches.{i}.*``, ``crf.*``); :func:`load_into` then loads them into a :class:`~.deeplab.DeepLabV2`,
:class:`~.deeplab.MSC` or :class:`~.crfrnn.CRFRNN`, strictly, and returns a :class:`LoadReport` that accounts
for every key of the checkpoint and of the model. :func:`model_for_checkpoint` builds the model a checkpoint
needs first (depth, block layout, head, classes, input convention).

Layouts (:func:`detect_layout` recognises them, ``layout=`` forces one):

``caffe_deeplabv2``
    The Caffe-converted DeepLab v2 ResNet-101 of kazuto1011/deeplab-pytorch. ``layer1`` is the stem,
    ``layer1.conv1.{conv,bn}`` (7×7/2 conv without bias + BatchNorm; a ceil-mode 3×3/2 max-pool ``layer1.pool``
    has no weights); ``layer2..layer5`` are the four residual stages of bottlenecks
    ``layerN.blockM.{reduce,conv3x3,increase,shortcut}.{conv,bn}`` (``reduce`` is the 1×1 and carries the
    stride, ``conv3x3`` is dilated, ``shortcut`` exists in ``block1`` only; every block of a dilated stage,
    the first included, runs at the stage's dilation 2 / 4); ``aspp.c{0..3}`` are the summed 3×3 ASPP-L
    branches (rates 6, 12, 18, 24) with bias. The VOC / COCO-Stuff models are saved from its MSC wrapper, so
    every key starts with ``base.`` (``scale.`` in its 2018 releases, whose bottlenecks named the projection
    ``proj`` and whose ASPP was ``aspp.stages.c{i}``: both are read). Its COCO-pretrained initialisation
    (``deeplabv1_resnet101-coco.pth``, "DeepLab v1") has the same trunk and a 1×1 ``fc`` classifier
    (91 classes), which is dropped by name and reported.
``scale_ports``
    The older torchvision-named ports (isht7/pytorch-deeplab-resnet and its descendants): the same Caffe
    network under ``Scale.`` (``Scale.conv1``, ``Scale.bn1``, ``Scale.layerN.i.{conv1..3,bn1..3}``,
    ``Scale.layerN.0.downsample.{0,1}``, ``Scale.layer5.conv2d_list.{0..3}``), often without BatchNorm
    ``num_batches_tracked`` counters (PyTorch < 0.4.1); the counters then stay at 0 and are reported.
``torchvision_resnet``
    torchvision ImageNet ResNet-18/34/50/101 (``conv1``, ``bn1``, ``layerN.i.*``); the 1000-class ``fc`` is
    dropped and reported, the DeepLab head keeps its N(0, 0.01²) initialisation.
``torchvision_deeplabv3``
    torchvision ``deeplabv3_resnet50/101``: the ``backbone.*`` trunk only. Its head (``classifier.*``: ASPP
    with image pooling and 1×1 projection; ``aux_classifier.*``: FCN head) is not DeepLab v2's and is reported
    as unused.
``crfrnn_deeplab``
    Our own checkpoints (:mod:`crfrnn_deeplab.weights.checkpoint`) or state dicts: ``DeepLabV2`` keys, ``MSC``'s
    ``model.*``, ``CRFRNN``'s ``network.*`` + ``crf.*``. A network-only checkpoint loaded into a CRF model
    fills ``network.*`` and reports the CRF as left at its initial values; a CRF checkpoint loaded into a
    network reports ``crf.*`` as unused.

Conventions travel with the weights. The Caffe layouts expect BGR input in 0–255 with the mean
(104.008, 116.669, 122.675) subtracted and no std (:data:`~.preprocessing.CAFFE_CONVENTION`), and the Caffe
block layout: stride in the 1×1 conv, ceil-mode max-pool, dilation from the first block of a dilated stage
(``stride_in_1x1=True, ceil_mode=True, dilate_first_block=True``). torchvision's expect RGB in 0–1 with the
ImageNet mean/std (:data:`~.preprocessing.TORCHVISION_CONVENTION`) and torchvision's block layout (stride in
the 3×3 conv, floor-mode max-pool, first block of a dilated stage at the previous stage's dilation: all three
options ``False``). Our checkpoints record their convention and builder options. Loading sets the model's
input convention, and refuses a model whose block layout or head rates differ from the checkpoint's with a
message naming the builder option to change: the same weights in another layout compute something else.
BatchNorm: Caffe's and kazuto1011's eps is 1e-5, torchvision's default, so no conversion is needed.

Strict by default: each checkpoint key is loaded, or dropped by a named rule (the ``fc`` / v3 classifiers, the
CRF when the model has none) and reported; each model key is loaded, or kept at its initialisation for a
stated reason (no head in the checkpoint, another number of classes, no CRF in the checkpoint, no BatchNorm
counters); anything else — unknown keys, missing keys, shape mismatches outside the class dimension — is a
:class:`ConversionError` naming the keys (and both shapes). ``strict=False`` reports them instead.
Wrapper prefixes (``module.`` of DataParallel/DDP, ``_orig_mod.`` of ``torch.compile``, the ports' MSC
wrappers ``base.`` / ``scale.`` / ``Scale.``, our MSC's ``model.``) are removed in one place,
:func:`strip_prefixes`.

Sources for the layouts (read, not copied): kazuto1011/deeplab-pytorch ``libs/models/resnet.py``
(``_ConvBnReLU``: ``conv`` without bias, ``bn`` with eps 1e-5; ``_Bottleneck``; ``_ResLayer`` naming
``block{i}``; ``_Stem``), ``libs/models/deeplabv2.py`` (``layer1..layer5``, ``aspp`` ``c{i}``; earlier
``_ASPPModule.stages``), ``libs/models/deeplabv1.py`` (``fc`` = ``Conv2d(2048, n_classes, 1)``),
``libs/models/msc.py`` (``base``; earlier ``scale``), ``convert.py`` (Caffe layer names to these keys, the
Caffe BatchNorm eps checked equal to 1e-5, the VOC model saved with the ``base.`` prefix, the COCO init as
``DeepLabV1`` with 91 classes), and the older ``libs/models/resnet.py`` (``proj``); isht7/pytorch-deeplab-resnet
``deeplab_resnet.py`` (``MS_Deeplab.Scale``, ``Bottleneck`` with the stride in ``conv1``, ``conv2`` with
padding = dilation, a ``downsample`` in the first block of every stage, ``MaxPool2d(..., ceil_mode=True)``,
``layer5 = Classifier_Module`` summing ``conv2d_list``); torchvision ``models/resnet.py`` and
``models/segmentation/deeplabv3.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from crfrnn_deeplab.crf.mean_field import MeanFieldCRF
from crfrnn_deeplab.models.aspp import ASPP_L_RATES, HEAD_RATES
from crfrnn_deeplab.models.conventions import CAFFE_CONVENTION, TORCHVISION_CONVENTION, InputConvention
from crfrnn_deeplab.models.crfrnn import CRFRNN
from crfrnn_deeplab.models.deeplab import DeepLabV2
from crfrnn_deeplab.models.msc import MSC
from crfrnn_deeplab.models.registry import builder_defaults, get_model, list_models, model_spec
from crfrnn_deeplab.weights.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint

__all__ = [
    "LAYOUTS",
    "ConversionError",
    "ConvertedStateDict",
    "LoadReport",
    "Mismatch",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_layout",
    "load_into",
    "main",
    "model_for_checkpoint",
    "network_name",
    "strip_prefixes",
]

logger = logging.getLogger(__name__)

#: The layouts :func:`load_into` reads (see the module docstring).
LAYOUTS: tuple[str, ...] = (
    "caffe_deeplabv2",
    "scale_ports",
    "torchvision_resnet",
    "torchvision_deeplabv3",
    "crfrnn_deeplab",
)
_CAFFE_LAYOUTS = ("caffe_deeplabv2", "scale_ports")
_TORCHVISION_LAYOUTS = ("torchvision_resnet", "torchvision_deeplabv3")

#: Wrapper prefixes removed when every key carries them: DataParallel/DDP, the ports' MSC wrappers
#: (kazuto1011's ``base.`` and, in 2018, ``scale.``; isht7's ``Scale.``) and our MSC's ``model.``.
_WRAPPERS = ("module.", "base.", "scale.", "Scale.", "model.")
_MSC_WRAPPERS = ("base.", "scale.", "Scale.", "model.")
_COMPILE = "_orig_mod."  # torch.compile's wrapper, removed wherever it occurs

_BLOCK_OPTIONS = ("stride_in_1x1", "ceil_mode", "dilate_first_block")
_CAFFE_BLOCKS = {"stride_in_1x1": True, "ceil_mode": True, "dilate_first_block": True}
_TORCHVISION_BLOCKS = {"stride_in_1x1": False, "ceil_mode": False, "dilate_first_block": False}
# blocks per stage, bottleneck? -> depth of the registered DeepLab v2 builders
_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50, ((3, 4, 23, 3), True): 101}


class ConversionError(ValueError):
    """A checkpoint that cannot be loaded into the model as asked; the message says why and what to change."""


class Mismatch(NamedTuple):
    """A checkpoint tensor whose shape differs from the model's.

    Attributes:
        source_key: the key in the checkpoint.
        checkpoint_shape: its shape there.
        model_shape: the shape the model wants.
        classes: True when only the number of classes differs (a re-initialised classifier).
    """

    source_key: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]
    classes: bool = False


@dataclass
class LoadReport:
    """What :func:`load_into` did, key by key. Every checkpoint key is in ``used`` (through the model key it
    filled), ``unexpected`` or ``mismatched``; every model key is in ``used``, ``missing`` or ``mismatched``.

    Attributes:
        layout: the checkpoint's layout (one of :data:`LAYOUTS`).
        source: the file, or ``"<in-memory checkpoint>"``.
        removed_prefix: wrapper prefix stripped from the checkpoint's keys (e.g. ``"base."``), or ``""``.
        used: model key -> checkpoint key, for every tensor loaded.
        unexpected: checkpoint key -> reason, for checkpoint tensors not loaded (dropped by a named rule; with
            ``strict=False`` also keys without a place in the model).
        missing: model key -> reason, for model tensors the checkpoint does not provide (they keep their
            initial values).
        mismatched: model key -> :class:`Mismatch`, for tensors whose shapes differ (kept at their initial
            values): the classifier when the number of classes differs; with ``strict=False`` anything else.
        reinitialised_classifier: True when the number of classes differs and the class-indexed tensors (the
            ASPP branches, and the CRF's class matrices) were left at their initialisation.
        checkpoint_classes: the checkpoint's number of classes (``None`` if it has no classifier).
        input_convention: the input convention now set on the model.
        notes: other remarks (e.g. the convention the model had before).
    """

    layout: str
    source: str
    removed_prefix: str = ""
    used: dict[str, str] = field(default_factory=dict)
    unexpected: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    mismatched: dict[str, Mismatch] = field(default_factory=dict)
    reinitialised_classifier: bool = False
    checkpoint_classes: int | None = None
    input_convention: InputConvention | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def initialised(self) -> dict[str, str]:
        """Every model key left at its initial values, with the reason (``missing`` and ``mismatched``)."""
        return {**self.missing, **{key: self._mismatch_reason(m) for key, m in self.mismatched.items()}}

    def _mismatch_reason(self, m: Mismatch) -> str:
        if m.classes:
            return f"different number of classes ({self.checkpoint_classes} in the checkpoint): re-initialised"
        return f"shape mismatch, checkpoint {m.checkpoint_shape} vs model {m.model_shape} (strict=False)"

    def __str__(self) -> str:
        prefix = f", prefix {self.removed_prefix!r} removed" if self.removed_prefix else ""
        total = len(self.used) + len(self.missing) + len(self.mismatched)
        lines = [f"{self.layout} checkpoint {self.source}{prefix}: {len(self.used)} of {total} model tensors loaded"]
        sections = (
            ("left at initial values", self.initialised),
            ("not used from the checkpoint", self.unexpected),
        )
        for title, items in sections:
            if items:
                lines.append(f"  {title} ({len(items)}):")
                for reason, keys in _group_by_reason(items).items():
                    lines.append(f"    {reason}: {_abbreviate(keys)}")
        if self.input_convention is not None:
            lines.append(f"  input convention: {_describe(self.input_convention)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _group_by_reason(items: Mapping[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key, reason in items.items():
        groups.setdefault(reason, []).append(key)
    return groups


def _abbreviate(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, … (+{len(keys) - limit} more)"


def _describe(c: InputConvention) -> str:
    scale = "0–255" if c.value_scale == 255.0 else "0–1"
    std = "no std" if all(s == 1.0 for s in c.std) else f"std {c.std}"
    return f"{c.channel_order}, {scale}, mean {c.mean}, {std}"


# ---------------------------------------------------------------------------------------------------------
# Reading a checkpoint: the state dict and its metadata, wrapper prefixes, layout detection.


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _unwrap_checkpoint(obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict inside a loaded checkpoint, and the checkpoint's other entries (ours; ``{}`` otherwise).

    Raises:
        CheckpointError: a checkpoint of a newer format, or an object holding no state dict.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a checkpoint or a state dict (a dict), got a {type(obj).__name__}")
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt.startswith("crfrnn_deeplab/"):
        if fmt != FORMAT:
            raise CheckpointError(f"checkpoint format {fmt!r} is not the {FORMAT!r} this version reads")
        if not _is_state_dict(obj.get("model")):
            raise CheckpointError("crfrnn_deeplab checkpoint without a state dict under 'model'")
        return dict(obj["model"]), {k: v for k, v in obj.items() if k != "model"}
    if _is_state_dict(obj):
        return dict(obj), {}
    for key in ("state_dict", "model_state_dict", "model_state", "model", "net"):
        if _is_state_dict(obj.get(key)):
            return dict(obj[key]), {}
    raise CheckpointError(
        "not a checkpoint: neither a state dict (a dict of tensors) nor a dict with one under 'model' / "
        f"'state_dict'; its top-level keys are {sorted(map(str, obj))[:12]}"
    )


def _stripped_names(keys: Iterable[str]) -> tuple[list[str], str]:
    """Keys without the wrapper prefixes shared by all of them and without ``_orig_mod.`` anywhere."""
    names = list(keys)
    removed = ""
    while names:
        prefix = next((p for p in (*_WRAPPERS, _COMPILE) if all(n.startswith(p) for n in names)), None)
        if prefix is None:
            break
        names = [n[len(prefix) :] for n in names]
        removed += prefix
    return [n.replace(_COMPILE, "") for n in names], removed


def strip_prefixes(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Removes wrapper prefixes: ``_orig_mod.`` (``torch.compile``) wherever it occurs, and ``module.``
    (DataParallel/DDP), ``base.`` / ``scale.`` (kazuto1011's MSC), ``Scale.`` (isht7's MSC) and ``model.``
    (our MSC) when every key starts with them, repeatedly (``module.base.`` goes too). The one place where
    checkpoint prefixes are handled.

    Returns:
        The state dict with the shortened keys, and the removed leading prefix (``""`` if none).
    """
    names, removed = _stripped_names(state_dict)
    return dict(zip(names, state_dict.values())), removed


def _split_ours(names: list[str]) -> list[str]:
    """Our keys to canonical ones: a CRFRNN's ``network.`` part loses its own wrappers (e.g. MSC's ``model.``)."""
    network = [i for i, n in enumerate(names) if n.startswith("network.")]
    inner, _ = _stripped_names(names[i][len("network.") :] for i in network)
    out = list(names)
    for i, name in zip(network, inner):
        out[i] = name
    return out


def detect_layout(checkpoint: Mapping[str, Any]) -> str:
    """The layout of a checkpoint or state dict (see the module docstring).

    Raises:
        ConversionError: no known layout matches (the message lists the layouts and some keys).
        CheckpointError: ``checkpoint`` holds no state dict.
    """
    state_dict, meta = _unwrap_checkpoint(checkpoint)
    if meta:
        return "crfrnn_deeplab"
    names, removed = _stripped_names(state_dict)
    keys = set(names)
    if any(re.match(r"layer1\.conv1\.(conv|bn)\.|layer[2-5]\.block\d+\.(reduce|conv3x3|increase)\.", k) for k in keys):
        return "caffe_deeplabv2"
    if "Scale." in removed or any(k.startswith("layer5.conv2d_list.") for k in keys):
        return "scale_ports"
    if any(k.startswith(("backbone.", "head.")) for k in keys) and any(
        k.startswith(("classifier.", "aux_classifier.")) for k in keys
    ):
        return "torchvision_deeplabv3"
    if any(k.startswith(("backbone.", "head.", "network.", "crf.")) for k in keys):
        return "crfrnn_deeplab"
    if "conv1.weight" in keys and any(k.startswith("layer1.0.") for k in keys):
        return "torchvision_resnet"
    raise ConversionError(f"unknown checkpoint layout (known: {', '.join(LAYOUTS)}); some keys: {sorted(keys)[:8]}")


# ---------------------------------------------------------------------------------------------------------
# Per-layout key maps: (wrapper-free) checkpoint key -> canonical key, or None when the key has no place.

_TRUNK = re.compile(r"(conv1|bn1)\.\w+|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01])\.\w+")
_CAFFE_PARTS = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3")}


def _caffe_key(key: str) -> str | None:
    """kazuto1011's names: ``layer1`` = stem, ``layer2..5`` = torchvision's ``layer1..4``, ``aspp.c{i}``."""
    if m := re.fullmatch(r"layer1\.conv1\.(conv|bn)\.(\w+)", key):
        return f"backbone.{'conv1' if m[1] == 'conv' else 'bn1'}.{m[2]}"
    if m := re.fullmatch(r"layer([2-5])\.block(\d+)\.(reduce|conv3x3|increase|shortcut|proj)\.(conv|bn)\.(\w+)", key):
        stage, block, part, kind, leaf = int(m[1]) - 1, int(m[2]) - 1, m[3], m[4], m[5]
        if part in ("shortcut", "proj"):
            module = f"downsample.{0 if kind == 'conv' else 1}"
        else:
            module = _CAFFE_PARTS[part][0 if kind == "conv" else 1]
        return f"backbone.layer{stage}.{block}.{module}.{leaf}"
    if m := re.fullmatch(r"aspp\.(?:stages\.)?c(\d+)\.(weight|bias)", key):
        return f"head.branches.{m[1]}.{m[2]}"
    return None


def _scale_key(key: str) -> str | None:
    """isht7's names: torchvision's trunk names and ``layer5.conv2d_list.{i}`` for the ASPP branches."""
    if m := re.fullmatch(r"layer5\.conv2d_list\.(\d+)\.(weight|bias)", key):
        return f"head.branches.{m[1]}.{m[2]}"
    return f"backbone.{key}" if _TRUNK.fullmatch(key) else None


def _torchvision_key(key: str) -> str | None:
    return f"backbone.{key}" if _TRUNK.fullmatch(key) else None


def _deeplabv3_key(key: str) -> str | None:
    return _torchvision_key(key[len("backbone.") :]) if key.startswith("backbone.") else None


def _ours_key(key: str) -> str | None:
    return key if key.startswith(("backbone.", "head.", "crf.")) else None


_KEY_MAPS = {
    "caffe_deeplabv2": _caffe_key,
    "scale_ports": _scale_key,
    "torchvision_resnet": _torchvision_key,
    "torchvision_deeplabv3": _deeplabv3_key,
    "crfrnn_deeplab": _ours_key,
}

#: layout -> (regex of wrapper-free checkpoint keys dropped on purpose, the reason reported)
_DROP_RULES: dict[str, tuple[str, str]] = {
    "caffe_deeplabv2": (r"fc\.(weight|bias)", "DeepLab v1 classifier of the COCO initialisation, not DeepLab v2's"),
    "torchvision_resnet": (r"fc\.(weight|bias)", "ImageNet classifier"),
    "torchvision_deeplabv3": (
        r"(aux_)?classifier\..+",
        "torchvision DeepLab v3 head (ASPP with image pooling) / auxiliary FCN head, not DeepLab v2's",
    ),
}


@dataclass
class ConvertedStateDict:
    """A checkpoint's tensors under canonical keys (what :func:`convert_state_dict` returns).

    Attributes:
        layout: the layout that was read.
        state_dict: canonical key (``backbone.*`` with torchvision names, ``head.branches.{i}.*``, ``crf.*``,
            i.e. a bare :class:`~.deeplab.DeepLabV2`'s keys plus the CRF's) -> tensor.
        source_keys: canonical key -> the checkpoint's own key.
        dropped: checkpoint key -> reason, for keys the layout drops on purpose (``fc``, v3 classifiers).
        unknown: checkpoint keys with no place in the layout.
        removed_prefix: the wrapper prefix stripped from every key (``"base."``, ``"module."``, ...).
    """

    layout: str
    state_dict: dict[str, Tensor]
    source_keys: dict[str, str]
    dropped: dict[str, str]
    unknown: list[str]
    removed_prefix: str


def convert_state_dict(checkpoint: Mapping[str, Any], *, layout: str = "auto") -> ConvertedStateDict:
    """Maps a checkpoint (or state dict) of any supported layout onto canonical keys. Pure: loads nothing.

    Args:
        checkpoint: a loaded checkpoint (ours, or a dict with a state dict under ``state_dict``/``model``) or a
            state dict.
        layout: one of :data:`LAYOUTS`, or ``"auto"`` (:func:`detect_layout`).

    Raises:
        ConversionError: unknown ``layout`` or an undetectable one.
        CheckpointError: ``checkpoint`` holds no state dict.
    """
    state_dict, _ = _unwrap_checkpoint(checkpoint)
    if layout == "auto":
        layout = detect_layout(checkpoint)
    elif layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; expected 'auto' or one of {LAYOUTS}")
    names, removed = _stripped_names(state_dict)
    if layout == "crfrnn_deeplab":
        names = _split_ours(names)
    key_map = _KEY_MAPS[layout]
    drop, reason = _DROP_RULES.get(layout, (None, ""))
    out = ConvertedStateDict(layout, {}, {}, {}, [], removed)
    for original, name, value in zip(state_dict, names, state_dict.values()):
        target = key_map(name)
        if target is not None:
            if target in out.state_dict:
                first = out.source_keys[target]
                raise ConversionError(f"checkpoint keys {first!r} and {original!r} both map to {target!r}")
            out.state_dict[target] = value
            out.source_keys[target] = original
        elif drop is not None and re.fullmatch(drop, name):
            out.dropped[original] = reason
        else:
            out.unknown.append(original)
    return out


# ---------------------------------------------------------------------------------------------------------
# The target model: its parts and its architecture as the weights see it.


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DataParallel/DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _parts(model: nn.Module) -> tuple[DeepLabV2, str, MeanFieldCRF | None]:
    """The bare DeepLabV2 inside ``model``, the prefix of its keys in ``model``'s state dict, and the CRF."""
    crf, prefix = None, ""
    if isinstance(model, CRFRNN):
        crf, model, prefix = model.crf, model.network, "network."
    if isinstance(model, MSC):
        model, prefix = model.model, prefix + "model."
    if not isinstance(model, DeepLabV2):
        raise TypeError(f"can load into a DeepLabV2, MSC or CRFRNN model, got {type(model).__name__}")
    return model, prefix, crf


def _is_bottleneck(block: nn.Module) -> bool:
    return hasattr(block, "conv3")


def _backbone_architecture(backbone: nn.Module) -> dict[str, Any] | None:
    """Blocks per stage, block type and the three layout switches of an atrous ResNet, read from its modules
    (``None`` for a backbone that is not a ResNet with ``layer1..layer4``)."""
    stages = [getattr(backbone, f"layer{i}", None) for i in range(1, 5)]
    if not all(isinstance(s, nn.Sequential) and len(s) for s in stages) or not hasattr(backbone, "maxpool"):
        return None
    first, last = stages[3][0], stages[3][-1]
    bottleneck = _is_bottleneck(first)
    first_3x3 = first.conv2 if bottleneck else first.conv1  # the 3×3 that a first block may keep undilated
    arch = {
        "blocks": tuple(len(s) for s in stages),
        "bottleneck": bottleneck,
        "ceil_mode": bool(backbone.maxpool.ceil_mode),
        "dilate_first_block": first_3x3.dilation == last.conv2.dilation,
    }
    if bottleneck:
        arch["stride_in_1x1"] = stages[1][0].conv1.stride != (1, 1)
    return arch


def network_name(model: nn.Module) -> str | None:
    """The registry name of a model's single-scale network (``"deeplabv2_resnet101"`` for a ResNet-101 DeepLab v2,
    also inside MSC or CRFRNN), or ``None`` for a trunk of no registered depth."""
    arch = _backbone_architecture(_parts(model)[0].backbone)
    depth = None if arch is None else _DEPTHS.get((arch["blocks"], arch["bottleneck"]))
    return None if depth is None else f"deeplabv2_resnet{depth}"


def _checkpoint_blocks(canonical: Mapping[str, Tensor]) -> tuple[tuple[int, ...], bool] | None:
    """Blocks per stage and block type of the checkpoint's trunk, or ``None`` when it has no full trunk."""
    blocks = []
    for stage in range(1, 5):
        ids = {int(m[1]) for k in canonical if (m := re.match(rf"backbone\.layer{stage}\.(\d+)\.", k))}
        if not ids:
            return None
        blocks.append(max(ids) + 1)
    return tuple(blocks), "backbone.layer1.0.conv3.weight" in canonical


def _describe_blocks(blocks: tuple[int, ...], bottleneck: bool) -> str:
    depth = _DEPTHS.get((blocks, bottleneck))
    kind = "Bottleneck" if bottleneck else "BasicBlock"
    return f"ResNet-{depth}" if depth else f"a ResNet with {kind}s {blocks}"


def _builder_defaults(name: str) -> dict[str, Any]:
    """Keyword defaults of a registered builder (``{}`` for an unknown name)."""
    return builder_defaults(name) if name in list_models() else {}


def _recorded_options(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The builder options of one of our checkpoints (its ``model_config`` resolved with the builder's
    defaults), or ``None`` when the checkpoint does not record them."""
    config = meta.get("model_config")
    if not isinstance(config, Mapping) or "name" not in config:
        return None
    return {**_builder_defaults(config["name"]), **dict(config.get("options") or {})}


def _expected_architecture(
    converted: ConvertedStateDict, meta: Mapping[str, Any]
) -> tuple[dict[str, bool], tuple[int, ...] | None]:
    """The block-layout switches and head rates the checkpoint's weights were trained with ({} / None: unknown)."""
    if converted.layout in _CAFFE_LAYOUTS:
        return dict(_CAFFE_BLOCKS), ASPP_L_RATES  # every released Caffe DeepLab v2 ResNet-101 uses ASPP-L
    if converted.layout in _TORCHVISION_LAYOUTS:
        return dict(_TORCHVISION_BLOCKS), None
    options = _recorded_options(meta)
    if options is None:
        return {}, None
    blocks = {k: bool(options[k]) for k in _BLOCK_OPTIONS if k in options}
    head = options.get("head")
    return blocks, HEAD_RATES.get(head) if isinstance(head, str) else None


def _check_architecture(
    net: DeepLabV2, converted: ConvertedStateDict, meta: Mapping[str, Any], *, loads_head: bool
) -> list[str]:
    """Refuses a model the weights were not trained for; returns notes on legitimate differences."""
    canonical = converted.state_dict
    arch = _backbone_architecture(net.backbone)
    layout = converted.layout
    if arch is None:
        if layout != "crfrnn_deeplab":
            raise ConversionError(f"{layout!r} checkpoints hold a ResNet trunk; the model's backbone is not a ResNet")
        return []
    found = _checkpoint_blocks(canonical)
    if found is not None and found != (arch["blocks"], arch["bottleneck"]):
        depth = _DEPTHS.get(found)
        hint = f" (build deeplabv2_resnet{depth}, or use model_for_checkpoint)" if depth else ""
        model = _describe_blocks(arch["blocks"], arch["bottleneck"])
        raise ConversionError(f"the checkpoint holds {_describe_blocks(*found)}, the model {model}{hint}")
    blocks, rates = _expected_architecture(converted, meta)
    wrong = {k: v for k, v in blocks.items() if k in arch and arch[k] != v}
    if wrong:
        family = {**dict.fromkeys(_CAFFE_LAYOUTS, "the Caffe"), **dict.fromkeys(_TORCHVISION_LAYOUTS, "torchvision's")}
        family = family.get(layout, "the recorded")
        raise ConversionError(
            f"the {layout!r} weights were trained with {family} block layout; build the model with "
            f"{', '.join(f'{k}={v}' for k, v in wrong.items())} (or use model_for_checkpoint): in the model's "
            "layout the same weights compute something else"
        )
    head_rates = getattr(net.head, "rates", None)
    if loads_head and rates is not None and head_rates is not None and tuple(head_rates) != tuple(rates):
        name = next((n for n, r in HEAD_RATES.items() if r == tuple(rates)), None)
        option = f"head={name!r}" if name else f"an ASPP with rates {tuple(rates)}"
        raise ConversionError(
            f"the checkpoint's classifier has ASPP rates {tuple(rates)}, the model's head {tuple(head_rates)}: "
            f"build the model with {option} (or use model_for_checkpoint)"
        )
    notes = []
    options = _recorded_options(meta) if layout == "crfrnn_deeplab" else None
    trained_os = 8 if layout in _CAFFE_LAYOUTS else (options or {}).get("output_stride")
    if trained_os is not None and trained_os != net.output_stride:
        notes.append(f"weights trained at output stride {trained_os} run at output stride {net.output_stride}")
    return notes


# ---------------------------------------------------------------------------------------------------------
# Loading.

_CLASS_INDEXED = re.compile(r"head\.branches\.\d+\.(weight|bias)|crf\.(spatial_weight|bilateral_weight|compatibility)")


def _class_dims(key: str) -> tuple[int, ...]:
    """Dimensions of a class-indexed tensor that count classes."""
    return (0, 1) if key.startswith("crf.") else (0,)


def _differs_only_in_classes(key: str, source: tuple[int, ...], target: tuple[int, ...], classes: int) -> bool:
    if not _CLASS_INDEXED.fullmatch(key) or len(source) != len(target):
        return False
    dims = _class_dims(key)
    return all(t == classes if d in dims else s == t for d, (s, t) in enumerate(zip(source, target)))


def _checkpoint_classes(canonical: Mapping[str, Tensor]) -> int | None:
    head = canonical.get("head.branches.0.weight")
    if head is not None:
        return int(head.shape[0])
    crf = canonical.get("crf.compatibility")
    return int(crf.shape[0]) if crf is not None else None


def _convention_for(layout: str, meta: Mapping[str, Any]) -> InputConvention | None:
    if layout in _CAFFE_LAYOUTS:
        return CAFFE_CONVENTION
    if layout in _TORCHVISION_LAYOUTS:
        return TORCHVISION_CONVENTION
    recorded = meta.get("input_convention")
    return InputConvention.from_dict(dict(recorded)) if isinstance(recorded, Mapping) else None


def _read(source: str | os.PathLike | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if isinstance(source, (str, os.PathLike)):
        return load_checkpoint(source), str(source)
    if not isinstance(source, Mapping):
        raise TypeError(f"source must be a path or a loaded checkpoint / state dict, got {type(source).__name__}")
    return source, "<in-memory checkpoint>"


def _keys(keys: list[str], limit: int = 10) -> str:
    return f"{keys[:limit]}{f' … (+{len(keys) - limit} more)' if len(keys) > limit else ''}"


def load_into(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    layout: str = "auto",
    strict: bool = True,
) -> LoadReport:
    """Loads a checkpoint of any supported layout into ``model``, in place, and sets its input convention.

    Nothing in ``model`` changes when an error is raised.

    Args:
        model: a :class:`~.deeplab.DeepLabV2`, :class:`~.deeplab.MSC` or :class:`~.crfrnn.CRFRNN` (also inside
            DataParallel/DDP or ``torch.compile``).
        source: a checkpoint file (read with ``weights_only=True``), or a loaded checkpoint / state dict.
        layout: one of :data:`LAYOUTS`, or ``"auto"``.
        strict: refuse checkpoint keys without a place in the model, model keys the checkpoint lacks without a
            stated reason, and shape mismatches outside the class dimension. ``False`` reports them (in
            ``unexpected``, ``missing``, ``mismatched``) and keeps those model tensors at their initial values.

    Returns:
        The :class:`LoadReport`.

    Raises:
        ConversionError: unknown or undetectable layout; a model of another depth, block layout or head than the
            weights (the message names the builder option); with ``strict``, unknown / missing keys and shape
            mismatches, each named (with both shapes).
        CheckpointError: the file is truncated, not a checkpoint, or needs pickle execution.
        FileNotFoundError: no such file.
    """
    obj, where = _read(source)
    return _load(model, obj, where, layout=layout, strict=strict)


def _load(model: nn.Module, obj: Mapping[str, Any], where: str, *, layout: str, strict: bool) -> LoadReport:
    state_dict, meta = _unwrap_checkpoint(obj)
    converted = convert_state_dict(obj, layout=layout)
    root = _unwrap_model(model)
    net, prefix, crf = _parts(root)
    canonical = converted.state_dict
    classes = _checkpoint_classes(canonical)
    reinit = classes is not None and classes != net.num_classes
    has_head = any(k.startswith("head.") for k in canonical)
    has_crf = any(k.startswith("crf.") for k in canonical)
    notes = _check_architecture(net, converted, meta, loads_head=has_head and not reinit)

    report = LoadReport(
        layout=converted.layout, source=where, removed_prefix=converted.removed_prefix, checkpoint_classes=classes
    )
    report.unexpected.update(converted.dropped)
    target = root.state_dict()
    unknown = list(converted.unknown)
    new_state: dict[str, Tensor] = {}
    other_mismatch: dict[str, Mismatch] = {}
    for key, value in canonical.items():
        src = converted.source_keys[key]
        if key.startswith("crf.") and crf is None:
            report.unexpected[src] = "CRF parameters; the model has no CRF layer"
            continue
        name = key if key.startswith("crf.") else prefix + key
        if name not in target:
            unknown.append(src)
            continue
        shape, wanted = tuple(value.shape), tuple(target[name].shape)
        if shape == wanted:
            new_state[name] = value
        elif reinit and _differs_only_in_classes(key, shape, wanted, net.num_classes):
            report.mismatched[name] = Mismatch(src, shape, wanted, classes=True)
        else:
            other_mismatch[name] = Mismatch(src, shape, wanted)
    report.reinitialised_classifier = bool(report.mismatched)

    unexplained: list[str] = []
    for name in target:
        if name in new_state or name in report.mismatched or name in other_mismatch:
            continue
        if name.endswith(".num_batches_tracked"):
            report.missing[name] = "BatchNorm step counter absent from the checkpoint (unused by DeepLab's BatchNorm)"
        elif name.startswith(prefix + "head.") and not has_head:
            report.missing[name] = "the checkpoint has no DeepLab v2 classifier: initialised from N(0, 0.01²)"
        elif name.startswith("crf.") and not has_crf:
            report.missing[name] = "network-only checkpoint: the CRF keeps its initial values"
        else:
            unexplained.append(name)

    order = {key: i for i, key in enumerate(state_dict)}  # report in the checkpoint's order
    unknown.sort(key=order.__getitem__)
    if strict and (unknown or unexplained or other_mismatch):
        problems = []
        if unknown:
            hint = f" (nothing matched: is {converted.layout!r} the right layout?)" if not canonical else ""
            problems.append(f"{len(unknown)} checkpoint key(s) have no place in the model{hint}: {_keys(unknown)}")
        if unexplained:
            problems.append(f"{len(unexplained)} model key(s) missing from the checkpoint: {_keys(unexplained)}")
        if other_mismatch:
            shapes = [f"{k}: checkpoint {m.checkpoint_shape} vs model {m.model_shape}"
                      for k, m in other_mismatch.items()]
            problems.append("shape mismatch: " + "; ".join(shapes[:10]))
        raise ConversionError(
            f"cannot load the {converted.layout!r} checkpoint {where} strictly: " + "; ".join(problems)
            + " (load_into(..., strict=False) loads the rest and reports these)"
        )
    for src in unknown:
        report.unexpected[src] = "no place in the model (strict=False)"
    for name in unexplained:
        report.missing[name] = "missing from the checkpoint (strict=False)"
    report.mismatched.update(other_mismatch)

    result = root.load_state_dict(new_state, strict=False)
    left = {k for k in [*report.missing, *report.mismatched] if not k.endswith(".num_batches_tracked")}
    assert not result.unexpected_keys and set(result.missing_keys) == left, result  # BatchNorm fills its counter
    source_of = {(key if key.startswith("crf.") else prefix + key): src for key, src in converted.source_keys.items()}
    report.used = {name: source_of[name] for name in target if name in new_state}

    convention = _convention_for(converted.layout, meta)
    if convention is None:
        notes.append("the checkpoint records no input convention; the model keeps its own")
        convention = net.input_convention
    elif convention != net.input_convention:
        notes.append(f"input convention changed from {_describe(net.input_convention)}")
        net.input_convention = convention
    report.input_convention = convention
    report.notes = notes
    logger.info("%s", report)
    return report


# ---------------------------------------------------------------------------------------------------------
# Building the model a checkpoint needs; converting files.


@dataclass
class _Recipe:
    """How to build the model for a checkpoint: a registered builder, its options (plain data, as recorded in
    our checkpoints' ``model_config``), the CRF's options, and the input convention of the weights."""

    name: str
    num_classes: int
    options: dict[str, Any]
    crf: dict[str, Any] | None
    convention: InputConvention | None

    def build(self) -> nn.Module:
        options = dict(self.options)
        if self.convention is not None:
            options["input_convention"] = self.convention
        net = get_model(self.name, num_classes=self.num_classes, **options)
        if self.crf is None:
            return net
        return CRFRNN(network=net, crf=MeanFieldCRF(num_classes=self.num_classes, **self.crf))


def _recipe(
    obj: Mapping[str, Any], *, num_classes: int | None, layout: str, msc: bool | None, options: Mapping[str, Any]
) -> tuple[_Recipe, str]:
    """The recipe for a checkpoint's model, and the checkpoint's layout."""
    if "input_convention" in options:
        raise TypeError("input_convention comes with the checkpoint's weights; it cannot be chosen here")
    converted = convert_state_dict(obj, layout=layout)
    _, meta = _unwrap_checkpoint(obj)
    canonical = converted.state_dict
    if converted.layout == "crfrnn_deeplab":
        config = meta.get("model_config")
        if not isinstance(config, Mapping) or "name" not in config:
            raise ConversionError(
                "this crfrnn_deeplab state dict records no model_config (builder name and options): build the "
                "model with get_model(...) and load it with load_into(model, ...)"
            )
        name = str(config["name"])
        recorded = {k: v for k, v in dict(config.get("options") or {}).items() if k != "input_convention"}
        if msc is not None and msc != name.endswith("_msc"):
            name = f"{name}_msc" if msc else name.removesuffix("_msc")
            if not msc:
                recorded.pop("scales", None)
        crf = config.get("crf")
        recipe = _Recipe(
            name=name,
            num_classes=num_classes if num_classes is not None else int(config["num_classes"]),
            options={**recorded, **options},
            crf=dict(crf) if crf else None,
            convention=_convention_for(converted.layout, meta),
        )
        return recipe, converted.layout

    found = _checkpoint_blocks(canonical)
    if found is None:
        raise ConversionError(f"the {converted.layout!r} checkpoint has no complete ResNet trunk (layer1..layer4)")
    depth = _DEPTHS.get(found)
    if depth is None:
        raise ConversionError(
            f"the checkpoint holds {_describe_blocks(*found)}; the DeepLab v2 models are ResNet-18/34/50/101"
        )
    caffe = converted.layout in _CAFFE_LAYOUTS
    arch: dict[str, Any] = dict(_CAFFE_BLOCKS if caffe else _TORCHVISION_BLOCKS)
    if depth in (18, 34):
        del arch["stride_in_1x1"]
        arch["base_width"] = int(canonical["backbone.conv1.weight"].shape[0])
    branches = sum(bool(re.fullmatch(r"head\.branches\.\d+\.weight", k)) for k in canonical)
    if branches:
        if branches != len(ASPP_L_RATES):
            raise ConversionError(f"the checkpoint's classifier has {branches} ASPP branches, ASPP-L has 4")
        arch["head"] = "aspp_l"
    classes = num_classes if num_classes is not None else _checkpoint_classes(canonical)
    if classes is None:
        raise ConversionError("the checkpoint has no DeepLab v2 classifier to count the classes: pass num_classes (CLI: --num-classes)")
    if msc is None:  # as the weights were saved: from an MSC wrapper (kazuto1011's base., isht7's Scale.) or not
        msc = any(p in converted.removed_prefix for p in ("base.", "scale.", "Scale."))
    recipe = _Recipe(
        name=f"deeplabv2_resnet{depth}{'_msc' if msc else ''}",
        num_classes=classes,
        options={**arch, **options},
        crf=None,
        convention=_convention_for(converted.layout, meta),
    )
    return recipe, converted.layout


def model_for_checkpoint(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    num_classes: int | None = None,
    layout: str = "auto",
    msc: bool | None = None,
    **options: Any,
) -> tuple[nn.Module, LoadReport]:
    """Builds the model a checkpoint needs and loads it (:func:`load_into`, strict).

    For our checkpoints the recorded builder (``model_config``: name, options, CRF); for the others the DeepLab v2
    model of the trunk's depth (ResNet-18/34/50/101) with the block layout and input convention of the weights
    (Caffe or torchvision), ASPP-L when the checkpoint has a classifier, and MSC when the weights were saved from
    an MSC wrapper.

    Args:
        source: a checkpoint file or a loaded checkpoint / state dict.
        num_classes: classes of the model; default: the checkpoint's. Required for checkpoints without a DeepLab v2
            classifier (torchvision, the COCO DeepLab v1 init). Another number re-initialises the classifier.
        layout: one of :data:`LAYOUTS`, or ``"auto"``.
        msc: wrap the network in :class:`~.deeplab.MSC` (True) or not (False); ``None``: as the checkpoint was.
        **options: further builder options (e.g. ``norm="frozen"``, ``output_stride=16``), applied last.

    Returns:
        ``(model, report)``; the model is in training mode, as built.

    Raises:
        ConversionError, CheckpointError, FileNotFoundError: see :func:`load_into`; also a checkpoint without
            a classifier and no ``num_classes``, or a trunk of an unsupported depth.
    """
    obj, where = _read(source)
    _, model, report = _build_and_load(obj, where, num_classes=num_classes, layout=layout, msc=msc, options=options)
    return model, report


def _build_and_load(obj: Any, where: str, *, num_classes: int | None, layout: str, msc: bool | None,
                    options: dict[str, Any]) -> tuple[_Recipe, nn.Module, LoadReport]:
    """The recipe a loaded checkpoint needs, the model built from it, and the strict load's report."""
    recipe, layout = _recipe(obj, num_classes=num_classes, layout=layout, msc=msc, options=options)
    model = recipe.build()
    return recipe, model, _load(model, obj, where, layout=layout, strict=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    layout: str = "auto",
    num_classes: int | None = None,
    msc: bool | None = None,
) -> LoadReport:
    """Converts a checkpoint of any supported layout into our format (what the CLI runs).

    The written checkpoint (:mod:`crfrnn_deeplab.weights.checkpoint`) holds the model's state dict, ``model_config``
    (builder name, number of classes, the options that rebuild the same architecture, CRF options),
    ``input_convention``, and ``source``: the file, its SHA-256, layout, removed prefix, the checkpoint keys not
    used and the model keys left at their initial values (with the reasons).

    Returns:
        The :class:`LoadReport` of loading ``src``.

    Raises:
        ValueError: ``dst`` is ``src`` (the source is never overwritten).
        ConversionError, CheckpointError, FileNotFoundError: see :func:`model_for_checkpoint`.
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(f"the destination must differ from the source, got {dst} for both")
    obj = load_checkpoint(src)
    recipe, model, report = _build_and_load(obj, str(src), num_classes=num_classes, layout=layout, msc=msc, options={})
    _, meta = _unwrap_checkpoint(obj)
    net, _, _ = _parts(model)
    payload = {
        "model": model.state_dict(),
        "model_config": {
            "name": recipe.name,
            "num_classes": recipe.num_classes,
            "options": recipe.options,
            "crf": recipe.crf,
        },
        "input_convention": net.input_convention.to_dict(),
        "class_names": meta.get("class_names") if recipe.num_classes == report.checkpoint_classes else None,
        "source": {
            "path": str(src),
            "sha256": _sha256(src),
            "layout": report.layout,
            "removed_prefix": report.removed_prefix,
            "unused": dict(report.unexpected),
            "initialised": report.initialised,
        },
    }
    save_checkpoint(dst, payload)
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m crfrnn_deeplab.weights.convert SRC DST [--layout L] [--num-classes N] [--msc | --no-msc]``."""
    parser = argparse.ArgumentParser(
        prog="python -m crfrnn_deeplab.weights.convert",
        description="Convert a DeepLab / ResNet checkpoint (any supported layout) into a crfrnn_deeplab checkpoint "
        "that records its model options and input convention.",
    )
    parser.add_argument("src", type=Path, help="checkpoint to convert")
    parser.add_argument("dst", type=Path, help="where to write the crfrnn_deeplab checkpoint")
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="layout of SRC (default: detect)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes of the model (default: SRC's)")
    parser.add_argument(
        "--msc", action=argparse.BooleanOptionalAction, default=None,
        help="multi-scale (MSC) model or not (default: as SRC was saved)",
    )
    args = parser.parse_args(argv)
    try:
        report = convert_checkpoint(args.src, args.dst, layout=args.layout, num_classes=args.num_classes, msc=args.msc)
    except (ValueError, FileNotFoundError) as e:  # ConversionError and CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
