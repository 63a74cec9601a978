"""Load DeepLab / ResNet checkpoints of the layouts users have into our models, exactly, and say what was used.

Layouts (``detect_layout`` recognises them; ``layout=`` forces one):

``caffe_deeplabv2``
    The Caffe-converted DeepLab v2 ResNet-101 of the most popular PyTorch port (kazuto1011/deeplab-pytorch,
    ``libs/models/deeplabv2.py``: a ``nn.Sequential`` of ``layer1`` = stem ``conv1.{conv,bn}`` + ceil-mode
    max-pool, ``layer2..layer5`` = residual stages of ``block{1..n}`` bottlenecks with
    ``{reduce,conv3x3,increase,shortcut}.{conv,bn}`` (stride in ``reduce``, the 1×1; every block of a
    dilated stage dilated), and ``aspp.c{0..3}`` summed 3×3 branches with bias), optionally under ``base.``
    (its MSC wrapper); its older releases' ``proj`` / ``aspp.stages.c{i}`` names are read too. Its
    COCO-pretrained DeepLab v1 initialisation has the same trunk and an ``fc*``
    classifier, which is dropped by name and reported.
``scale_ports``
    The older torchvision-named ports (isht7/pytorch-deeplab-resnet: ``Scale.conv1``, ``Scale.bn1``,
    ``Scale.layerN.i.{conv1..3,bn1..3,downsample.0/1}``, ``Scale.layer5.conv2d_list.{0..3}``), the same
    Caffe network (stride in ``conv1``, ceil-mode pool, dilated first blocks).
``torchvision_resnet``
    torchvision ImageNet ResNet-50/101 (``fc`` dropped and reported; the head keeps its initialisation).
``torchvision_deeplabv3``
    torchvision ``deeplabv3_resnet50/101``: the ``backbone.*`` trunk only; the v3 head (``classifier.*``,
    ``aux_classifier.*``) is not DeepLab v2's and is reported unused.
``crfrnn_deeplab``
    Our own checkpoints (:mod:`crfrnn_deeplab.checkpoint`) or state dicts, with or without the CRF.

Conventions travel with the weights: the Caffe layouts expect BGR 0–255 input with the mean
(104.008, 116.669, 122.675) subtracted and no std, and the Caffe block layout; torchvision's expect RGB 0–1
with ImageNet mean/std and torchvision's layout. Loading sets the model's input convention and refuses a
model whose block layout does not match (the message names the builder option to change), because the same
weights in the other layout compute something else.

Everything is strict by default: each source key is used, or dropped by a named rule and reported; each
target key is loaded, or reported as kept at its initialisation for a stated reason (no head in the source,
a different number of classes, no CRF in the source). Anything else is an error naming the keys.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import load_checkpoint, save_checkpoint
from .crfrnn import CRFRNN
from .deeplab import MSC, DeepLabV2
from .preprocessing import CAFFE_CONVENTION, TORCHVISION_CONVENTION, InputConvention
from .registry import get_model

__all__ = [
    "LAYOUTS",
    "ConversionError",
    "LoadReport",
    "detect_layout",
    "strip_prefixes",
    "to_canonical",
    "load_into",
    "model_for_checkpoint",
    "main",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("caffe_deeplabv2", "scale_ports", "torchvision_resnet", "torchvision_deeplabv3", "crfrnn_deeplab")
_WRAPPERS = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
_CAFFE_LAYOUTS = ("caffe_deeplabv2", "scale_ports")
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ConversionError(ValueError):
    """A checkpoint that cannot be loaded into the model as asked (the message says why and what to do)."""


@dataclass
class LoadReport:
    """What a load did, key by key.

    Attributes:
        layout: the source layout.
        loaded: target keys filled from the source.
        dropped: source keys deliberately not used, with the reason (e.g. ``fc.weight``: ImageNet classifier).
        initialised: target keys kept at their initial values, with the reason.
        input_convention: the convention now set on the model.
    """

    layout: str
    loaded: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    initialised: dict[str, str] = field(default_factory=dict)
    input_convention: InputConvention | None = None

    def __str__(self) -> str:
        lines = [f"layout {self.layout}: {len(self.loaded)} tensors loaded"]
        sections = (("dropped from the checkpoint", self.dropped), ("kept at initialisation", self.initialised))
        for title, items in sections:
            if items:
                lines.append(f"{title} ({len(items)}):")
                by_reason: dict[str, list[str]] = {}
                for key, reason in items.items():
                    by_reason.setdefault(reason, []).append(key)
                lines += [f"  {reason}: {', '.join(keys)}" for reason, keys in by_reason.items()]
        if self.input_convention is not None:
            lines.append(f"input convention: {self.input_convention}")
        return "\n".join(lines)


def strip_prefixes(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Removes wrapper prefixes shared by every key: ``module.``, ``_orig_mod.`` (any nesting), and the ports'
    ``base.`` (MSC wrapper) and ``Scale.`` — the one place prefixes are handled.

    Returns:
        The stripped state dict and the removed prefix (``""`` if none).
    """
    keys = list(state_dict)
    removed = ""
    changed = True
    while changed and keys:
        changed = False
        for prefix in _WRAPPERS + ("base.", "Scale."):
            if all(k.startswith(prefix) for k in keys):
                keys = [k[len(prefix) :] for k in keys]
                removed += prefix
                changed = True
    if not removed:
        return dict(state_dict), ""
    return {new: state_dict[old] for new, old in zip(keys, state_dict)}, removed


def _unwrap_checkpoint(obj: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict of a checkpoint (ours: ``"model"``; common others: ``"state_dict"``) and its metadata."""
    if "format" in obj and "model" in obj:  # ours
        return dict(obj["model"]), {k: v for k, v in obj.items() if k != "model"}
    for key in ("state_dict", "model_state", "model"):
        if key in obj and isinstance(obj[key], Mapping) and obj[key] and all(
            isinstance(v, Tensor) for v in obj[key].values()
        ):
            return dict(obj[key]), {}
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj), {}
    raise ConversionError(
        "the file holds neither a state dict (a dict of tensors) nor a checkpoint with one under "
        f"'model' / 'state_dict'; its top-level keys are {sorted(obj)[:20]}"
    )


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """Names the layout of a state dict (see the module docstring).

    Raises:
        ConversionError: no known layout matches (the message shows sample keys).
    """
    sd, removed = strip_prefixes(state_dict)
    keys = set(sd)
    if any(k.startswith(("layer1.conv1.conv.", "layer2.block1.reduce.")) for k in keys):
        return "caffe_deeplabv2"
    if "Scale." in removed or any(k.startswith("layer5.conv2d_list.") for k in keys):
        return "scale_ports"
    if any(k.startswith(("backbone.", "network.", "model.backbone.", "crf.")) for k in keys) and any(
        k.startswith(("head.", "network.", "model.head.")) for k in keys
    ):
        return "crfrnn_deeplab"
    if any(k.startswith("backbone.layer4.") for k in keys) and any(k.startswith("classifier.") for k in keys):
        return "torchvision_deeplabv3"
    if "conv1.weight" in keys and any(k.startswith("layer4.") for k in keys):
        return "torchvision_resnet"
    raise ConversionError(f"unknown checkpoint layout; known: {LAYOUTS}; sample keys: {sorted(keys)[:8]}")


# --- per-layout key maps onto the canonical DeepLabV2 keys (backbone.* with torchvision names, head.*, crf.*)

_CAFFE_PART = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3")}


def _caffe_key(key: str) -> str | None:
    """kazuto1011 key -> canonical key (None: not part of the trunk/head).

    Its older releases named the projection ``proj`` and nested the ASPP as ``aspp.stages.c{i}``; both read.
    """
    key = re.sub(r"\.proj\.", ".shortcut.", key).replace("aspp.stages.", "aspp.")
    m = re.fullmatch(r"layer1\.conv1\.(conv|bn)\.(\w+)", key)
    if m:
        return f"backbone.{'conv1' if m[1] == 'conv' else 'bn1'}.{m[2]}"
    m = re.fullmatch(r"layer([2-5])\.block(\d+)\.(reduce|conv3x3|increase|shortcut)\.(conv|bn)\.(\w+)", key)
    if m:
        stage, block, part, kind, leaf = int(m[1]) - 1, int(m[2]) - 1, m[3], m[4], m[5]
        if part == "shortcut":
            return f"backbone.layer{stage}.{block}.downsample.{0 if kind == 'conv' else 1}.{leaf}"
        conv, bn = _CAFFE_PART[part]
        return f"backbone.layer{stage}.{block}.{conv if kind == 'conv' else bn}.{leaf}"
    m = re.fullmatch(r"aspp\.c(\d+)\.(weight|bias)", key)
    if m:
        return f"head.branches.{m[1]}.{m[2]}"
    return None


def _scale_key(key: str) -> str | None:
    m = re.fullmatch(r"layer5\.conv2d_list\.(\d+)\.(weight|bias)", key)
    if m:
        return f"head.branches.{m[1]}.{m[2]}"
    if re.fullmatch(r"(conv1|bn1)\.\w+|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01])\.\w+", key):
        return f"backbone.{key}"
    return None


def _torchvision_key(key: str) -> str | None:
    if re.fullmatch(r"(conv1|bn1)\.\w+|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01])\.\w+", key):
        return f"backbone.{key}"
    return None


def _deeplabv3_key(key: str) -> str | None:
    return _torchvision_key(key[len("backbone.") :]) if key.startswith("backbone.") else None


def _ours_key(key: str) -> str | None:
    for prefix in ("network.model.", "network.", "model."):  # CRFRNN / MSC wrappers onto the bare DeepLabV2
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key if key.startswith(("backbone.", "head.", "crf.")) else None


_KEY_MAPS = {
    "caffe_deeplabv2": _caffe_key,
    "scale_ports": _scale_key,
    "torchvision_resnet": _torchvision_key,
    "torchvision_deeplabv3": _deeplabv3_key,
    "crfrnn_deeplab": _ours_key,
}

_DROP_RULES = {  # layout -> (regex of source keys dropped on purpose, the reason reported)
    "caffe_deeplabv2": (r"fc.*", "DeepLab v1 (COCO init) classifier, not part of DeepLab v2"),
    "scale_ports": (r"$^", ""),
    "torchvision_resnet": (r"fc\..*", "ImageNet classifier"),
    "torchvision_deeplabv3": (r"(aux_)?classifier\..*", "DeepLab v3 head (ASPP with image pooling), not v2's"),
    "crfrnn_deeplab": (r"$^", ""),
}


def to_canonical(state_dict: Mapping[str, Tensor], layout: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Maps a state dict of ``layout`` onto canonical keys (``backbone.*``, ``head.*``, ``crf.*``).

    Returns:
        ``(canonical state dict, dropped source keys -> reason)``.

    Raises:
        ConversionError: a source key that neither maps nor matches the layout's drop rule (strict).
    """
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; known: {LAYOUTS}")
    sd, _ = strip_prefixes(state_dict)
    key_map, (drop, reason) = _KEY_MAPS[layout], _DROP_RULES[layout]
    out, dropped, unknown = {}, {}, []
    for key, value in sd.items():
        target = key_map(key)
        if target is not None:
            out[target] = value
        elif re.fullmatch(drop, key):
            dropped[key] = reason
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) of the {layout!r} checkpoint have no place in the model: {unknown[:10]}"
            f"{' …' if len(unknown) > 10 else ''}"
        )
    return out, dropped


# --- the target model


def _parts(model: nn.Module) -> tuple[DeepLabV2, str, nn.Module | None]:
    """The bare DeepLabV2 inside ``model``, the key prefix of its keys in ``model``, and the CRF (or None)."""
    crf = None
    prefix = ""
    if isinstance(model, CRFRNN):
        crf, model, prefix = model.crf, model.network, "network."
    if isinstance(model, MSC):
        model, prefix = model.model, prefix + "model."
    if not isinstance(model, DeepLabV2):
        raise TypeError(f"can load into DeepLabV2, MSC or CRFRNN models, got {type(model).__name__}")
    return model, prefix, crf


def _layout_of(backbone: nn.Module) -> dict[str, bool]:
    """The backbone's Caffe switches, read from the modules themselves."""
    block = backbone.layer2[0]
    return {
        "stride_in_1x1": block.conv1.stride != (1, 1),
        "ceil_mode": bool(backbone.maxpool.ceil_mode),
        "dilate_first_block": backbone.layer3[0].conv2.dilation == backbone.layer3[-1].conv2.dilation,
    }


def _check_architecture(net: DeepLabV2, layout: str) -> None:
    if layout == "crfrnn_deeplab":  # our checkpoints record their own builder options
        return
    if not hasattr(net.backbone.layer2[0], "conv3"):
        raise ConversionError(
            f"{layout!r} checkpoints hold a ResNet-50/101 (bottleneck) trunk; the model has BasicBlocks"
        )
    caffe = layout in _CAFFE_LAYOUTS
    wrong = [name for name, value in _layout_of(net.backbone).items() if value != caffe]
    if wrong:
        options = ", ".join(f"{name}={caffe}" for name in wrong)
        raise ConversionError(
            f"{layout!r} weights were trained with the {'Caffe' if caffe else 'torchvision'} block layout; build "
            f"the model with {options} (or use model_for_checkpoint), otherwise the same weights compute "
            "something else"
        )


def _set_convention(model: nn.Module, convention: InputConvention) -> None:
    net, _, _ = _parts(model)
    net.input_convention = convention


def load_into(
    model: nn.Module, source: str | Path | Mapping[str, Any], *, layout: str = "auto", strict: bool = True
) -> LoadReport:
    """Loads a checkpoint of any supported layout into ``model`` (DeepLabV2, MSC or CRFRNN), in place.

    Args:
        model: the target model.
        source: a checkpoint path, or an already loaded checkpoint / state dict.
        layout: one of :data:`LAYOUTS`, or ``"auto"``.
        strict: refuse missing backbone keys and unknown source keys (the default). With ``strict=False``
            missing target keys are reported and kept at their initialisation.

    Returns:
        The :class:`LoadReport`.

    Raises:
        ConversionError: unknown layout, block-layout mismatch, unknown/missing keys (strict), shape mismatches
            outside the classifier (each named with both shapes).
        CheckpointError / FileNotFoundError: unreadable file (see
            :func:`~crfrnn_deeplab.checkpoint.load_checkpoint`).
    """
    obj = load_checkpoint(source) if isinstance(source, (str, Path)) else source
    state_dict, meta = _unwrap_checkpoint(obj)
    layout = detect_layout(state_dict) if layout == "auto" else layout
    canonical, dropped = to_canonical(state_dict, layout)
    net, prefix, crf = _parts(model)
    _check_architecture(net, layout)

    target = model.state_dict()
    report = LoadReport(layout=layout, dropped=dropped)
    new_state: dict[str, Tensor] = {}
    mismatched: list[str] = []
    reinit_head = False
    for key, value in canonical.items():
        name = (prefix + key) if not key.startswith("crf.") else key
        if key.startswith("crf.") and crf is None:
            report.dropped[key] = "CRF parameters; the model has no CRF"
            continue
        if name not in target:
            if key.endswith("num_batches_tracked"):
                report.dropped[key] = "BatchNorm counter absent from the model"
                continue
            raise ConversionError(f"checkpoint key {key!r} (as {name!r}) is not in the model")
        if tuple(value.shape) != tuple(target[name].shape):
            if key.startswith("head."):
                reinit_head = True
                continue
            mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(target[name].shape)}")
            continue
        new_state[name] = value
    if mismatched:
        raise ConversionError("shape mismatch: " + "; ".join(mismatched))

    head_keys = [k for k in target if k.startswith(prefix + "head.")]
    if reinit_head:
        for k in head_keys:
            new_state.pop(k, None)
            report.initialised[k] = "different number of classes: classifier re-initialised"
    missing = [k for k in target if k not in new_state and k not in report.initialised]
    for k in missing:
        if k.endswith("num_batches_tracked"):
            report.initialised[k] = "BatchNorm counter not in the checkpoint"
        elif k.startswith(prefix + "head.") and not any(c.startswith("head.") for c in canonical):
            report.initialised[k] = "the checkpoint has no DeepLab v2 head"
        elif k.startswith("crf.") and not any(c.startswith("crf.") for c in canonical):
            report.initialised[k] = "network-only checkpoint: the CRF keeps its initial parameters"
        elif strict:
            raise ConversionError(f"{len(missing)} model key(s) missing from the checkpoint: {missing[:10]}")
        else:
            report.initialised[k] = "missing from the checkpoint (strict=False)"

    result = model.load_state_dict(new_state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    report.loaded = sorted(new_state)
    if layout in _CAFFE_LAYOUTS:
        convention = CAFFE_CONVENTION
    elif layout in ("torchvision_resnet", "torchvision_deeplabv3"):
        convention = TORCHVISION_CONVENTION
    elif "input_convention" in meta:
        convention = InputConvention.from_dict(meta["input_convention"])
    else:
        convention = net.input_convention
    _set_convention(model, convention)
    report.input_convention = convention
    logger.info("%s", report)
    return report


def model_for_checkpoint(
    source: str | Path | Mapping[str, Any],
    *,
    num_classes: int | None = None,
    layout: str = "auto",
    msc: bool = False,
) -> tuple[nn.Module, LoadReport]:
    """Builds the DeepLab v2 model a checkpoint needs (depth, block layout, classes) and loads it.

    Args:
        source: a checkpoint path or a loaded checkpoint / state dict.
        num_classes: classes of the new model; default: the checkpoint's head (21 if it has none).
        layout: one of :data:`LAYOUTS` or ``"auto"``.
        msc: wrap the network in MSC (scales 1, 0.75, 0.5).

    Returns:
        ``(model, report)``.
    """
    obj = load_checkpoint(source) if isinstance(source, (str, Path)) else source
    state_dict, meta = _unwrap_checkpoint(obj)
    layout = detect_layout(state_dict) if layout == "auto" else layout
    if layout == "crfrnn_deeplab" and "model_config" in meta:
        config = meta["model_config"]
        classes = num_classes or config["num_classes"]
        net = get_model(config["name"], num_classes=classes, **config.get("options", {}))
        model: nn.Module = net if not config.get("crf") else CRFRNN(network=net, crf=_crf(config["crf"], net))
        return model, load_into(model, obj, layout=layout)
    canonical, _ = to_canonical(state_dict, layout)
    blocks = {k.split(".")[2] for k in canonical if k.startswith("backbone.layer3.")}
    depth = {6: 50, 23: 101}.get(len(blocks))
    if depth is None:
        raise ConversionError(f"layer3 has {len(blocks)} blocks: expected 6 (ResNet-50) or 23 (ResNet-101)")
    heads = [v for k, v in canonical.items() if k.startswith("head.branches.") and k.endswith(".weight")]
    classes = num_classes or (int(heads[0].shape[0]) if heads else 21)
    caffe = layout in _CAFFE_LAYOUTS
    options: dict[str, Any] = dict(
        stride_in_1x1=caffe, ceil_mode=caffe, dilate_first_block=caffe,
        input_convention=CAFFE_CONVENTION if caffe else TORCHVISION_CONVENTION,
    )
    model = get_model(f"deeplabv2_resnet{depth}{'_msc' if msc else ''}", num_classes=classes, **options)
    return model, load_into(model, obj, layout=layout)


def _crf(config: Mapping[str, Any], net: nn.Module) -> nn.Module:
    from .crf import MeanFieldCRF

    return MeanFieldCRF(num_classes=net.num_classes, **dict(config))


def main(argv: list[str] | None = None) -> int:
    """``python -m crfrnn_deeplab.convert SRC DST [--layout L] [--num-classes N]``: write our checkpoint format."""
    parser = argparse.ArgumentParser(prog="python -m crfrnn_deeplab.convert", description=main.__doc__)
    parser.add_argument("src", type=Path, help="checkpoint to convert (any supported layout)")
    parser.add_argument("dst", type=Path, help="where to write the crfrnn_deeplab checkpoint")
    parser.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS)
    parser.add_argument("--num-classes", type=int, default=None, help="classes of the converted model")
    args = parser.parse_args(argv)
    if args.dst.resolve() == args.src.resolve():
        parser.error("DST must differ from SRC: the source is never overwritten")
    try:
        model, report = model_for_checkpoint(args.src, num_classes=args.num_classes, layout=args.layout)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    net, _, _ = _parts(model)
    backbone = net.backbone
    depth = 101 if len(backbone.layer3) == 23 else 50
    payload = {
        "model": model.state_dict(),
        "model_config": {
            "name": f"deeplabv2_resnet{depth}",
            "num_classes": net.num_classes,
            "options": _layout_of(backbone),  # the convention is recorded below, as plain data
            "crf": None,
        },
        "input_convention": net.input_convention.to_dict(),
        "class_names": None,
        "source": {"path": str(args.src), "layout": report.layout, "dropped": sorted(report.dropped)},
    }
    save_checkpoint(args.dst, payload)
    print(report)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
