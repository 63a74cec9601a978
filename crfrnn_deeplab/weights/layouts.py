"""External checkpoint layouts: which layout a checkpoint is in, and its tensors under our canonical keys.

Every supported layout maps key by key onto the canonical keys: a bare :class:`~crfrnn_deeplab.models.DeepLabV2`'s
(``backbone.*`` with torchvision's ResNet names, ``head.branches.{i}.*``) plus the CRF's (``crf.*``).
:func:`convert_state_dict` does it once per checkpoint; loading (:mod:`.loading`) and building the model a
checkpoint needs (:mod:`.factory`) both work from its :class:`ConvertedStateDict`.

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
    ``num_batches_tracked`` counters (PyTorch < 0.4.1).
``torchvision_resnet``
    torchvision ImageNet ResNet-18/34/50/101 (``conv1``, ``bn1``, ``layerN.i.*``); the 1000-class ``fc`` is
    dropped and reported.
``torchvision_deeplabv3``
    torchvision ``deeplabv3_resnet50/101``: the ``backbone.*`` trunk only. Its head (``classifier.*``: ASPP
    with image pooling and 1×1 projection; ``aux_classifier.*``: FCN head) is not DeepLab v2's and is dropped
    and reported.
``crfrnn_deeplab``
    Our own checkpoints (:mod:`.checkpoint`) or state dicts: ``DeepLabV2`` keys, ``MSC``'s ``model.*``,
    ``CRFRNN``'s ``network.*`` + ``crf.*``.

Conventions travel with the weights: the Caffe layouts expect BGR input in 0–255 with the mean subtracted and no
std (:data:`~crfrnn_deeplab.models.CAFFE_CONVENTION`), torchvision's RGB in 0–1 with the ImageNet mean/std
(:data:`~crfrnn_deeplab.models.TORCHVISION_CONVENTION`); ours record theirs
(:attr:`ConvertedStateDict.input_convention`).

Wrapper prefixes (``module.`` of DataParallel/DDP, ``_orig_mod.`` of ``torch.compile``, the ports' MSC wrappers
``base.`` / ``scale.`` / ``Scale.``, our MSC's ``model.``) are removed in one place, :func:`strip_prefixes`.

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

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from crfrnn_deeplab.models.conventions import CAFFE_CONVENTION, TORCHVISION_CONVENTION, InputConvention
from crfrnn_deeplab.weights.checkpoint import (
    FORMAT,
    CheckpointError,
    ModelConfig,
    check_model_entries,
    load_checkpoint,
)

__all__ = [
    "CAFFE_LAYOUTS",
    "IN_MEMORY",
    "LAYOUTS",
    "TORCHVISION_LAYOUTS",
    "ConversionError",
    "ConvertedStateDict",
    "convert_state_dict",
    "detect_layout",
    "strip_prefixes",
]

#: The layouts :func:`convert_state_dict` reads (see the module docstring).
LAYOUTS: tuple[str, ...] = (
    "caffe_deeplabv2",
    "scale_ports",
    "torchvision_resnet",
    "torchvision_deeplabv3",
    "crfrnn_deeplab",
)
#: The layouts of the Caffe DeepLab v2 network (its block layout, its input convention).
CAFFE_LAYOUTS: tuple[str, ...] = ("caffe_deeplabv2", "scale_ports")
#: The layouts of torchvision's ResNet (its block layout, its input convention).
TORCHVISION_LAYOUTS: tuple[str, ...] = ("torchvision_resnet", "torchvision_deeplabv3")
#: How messages and reports name a checkpoint passed as a loaded dict instead of a file.
IN_MEMORY = "<in-memory checkpoint>"

# Removed when every key carries them: DataParallel/DDP, the ports' MSC wrappers (kazuto1011's ``base.`` and, in
# 2018, ``scale.``; isht7's ``Scale.``) and our MSC's ``model.``.
_WRAPPERS = ("module.", "base.", "scale.", "Scale.", "model.")
_PORT_MSC_WRAPPERS = frozenset({"base.", "scale.", "Scale."})
_COMPILE = "_orig_mod."  # torch.compile's wrapper: removed wherever it occurs (a compiled submodule has it inside)
# Where checkpoints of other projects keep their state dict; ours keep it under "model".
_STATE_DICT_ENTRIES = ("state_dict", "model_state_dict", "model_state", "model", "net")


class ConversionError(ValueError):
    """A checkpoint that cannot be loaded into the model as asked; the message says why and what to change."""


@dataclass
class ConvertedStateDict:
    """A checkpoint's tensors under canonical keys, and what else the checkpoint says (see :func:`convert_state_dict`).

    Attributes:
        layout: the layout that was read (one of :data:`LAYOUTS`).
        source: the file, or :data:`IN_MEMORY`.
        state_dict: canonical key -> tensor, in the checkpoint's order.
        source_keys: canonical key -> the checkpoint's own key.
        dropped: checkpoint key -> reason, for keys the layout drops on purpose (``fc``, v3 classifiers).
        unknown: checkpoint keys with no place in the layout, in the checkpoint's order.
        removed_prefix: the wrapper prefixes stripped from every key (``"base."``, ``"module."``, ...), or ``""``.
        metadata: the entries of one of our checkpoints besides its state dict (``model_config``,
            ``input_convention``, ``class_names``, ...); ``{}`` for anything else.
        checkpoint_keys: every key of the checkpoint's state dict, in its order.
    """

    layout: str
    source: str
    state_dict: dict[str, Tensor] = field(default_factory=dict)
    source_keys: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    removed_prefix: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    checkpoint_keys: tuple[str, ...] = ()

    @property
    def saved_from_msc(self) -> bool:
        """The weights were saved from a multi-scale wrapper (the Caffe ports' ``base.`` / ``scale.`` / ``Scale.``).
        Only the Caffe layouts have one: a torchvision ResNet under ``base.`` is a network someone named ``base``."""
        return self.layout in CAFFE_LAYOUTS and any(
            wrapper in _PORT_MSC_WRAPPERS for wrapper in _split_prefix(self.removed_prefix)
        )

    @property
    def num_classes(self) -> int | None:
        """The checkpoint's number of classes (its classifier's, else its CRF's), ``None`` if it has neither."""
        head = self.state_dict.get("head.branches.0.weight")
        if head is not None:
            return int(head.shape[0])
        crf = self.state_dict.get("crf.compatibility")
        return int(crf.shape[0]) if crf is not None else None

    @property
    def has_head(self) -> bool:
        return any(k.startswith("head.") for k in self.state_dict)

    @property
    def has_crf(self) -> bool:
        return any(k.startswith("crf.") for k in self.state_dict)

    @property
    def input_convention(self) -> InputConvention | None:
        """The input convention the weights expect: the layout's, or the one our checkpoint records (``None``
        if it records none)."""
        if self.layout in CAFFE_LAYOUTS:
            return CAFFE_CONVENTION
        if self.layout in TORCHVISION_LAYOUTS:
            return TORCHVISION_CONVENTION
        recorded = self.metadata.get("input_convention")
        return InputConvention.from_dict(dict(recorded)) if isinstance(recorded, Mapping) else None

    @property
    def model_config(self) -> Mapping[str, Any] | None:
        """Our checkpoint's ``model_config`` (builder name, classes, options, CRF), ``None`` if not recorded."""
        config = self.metadata.get("model_config")
        return config if isinstance(config, Mapping) and "name" in config else None


# ---------------------------------------------------------------------------------------------------------
# Reading: the state dict inside a checkpoint, wrapper prefixes, layout detection.


def _state_dict_problem(obj: Mapping[Any, Any]) -> str | None:
    """Why a mapping is not a usable state dict (string keys, dense tensors with values), or ``None``."""
    if not obj:
        return "it is empty"
    for key, value in obj.items():
        if not isinstance(key, str):
            return f"its key {key!r} is not a string (type {type(key).__name__})"
        if not isinstance(value, Tensor):
            return f"{key!r} holds a value of type {type(value).__name__}, not a tensor"
        if value.is_meta:
            return f"{key!r} is a meta tensor (a shape without values)"
        if value.layout != torch.strided:
            return f"{key!r} is a {str(value.layout).removeprefix('torch.')} tensor; a state dict holds dense tensors"
    return None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and _state_dict_problem(obj) is None


def _holds_tensors(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values())


def _unwrap_checkpoint(obj: Any, where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict inside a loaded checkpoint, and the checkpoint's other entries (ours, also one saved without
    its ``format`` entry; ``{}`` otherwise).

    Raises:
        CheckpointError: a checkpoint of a newer format, or an object holding no state dict, or a state dict with
            a key that is not a string or a value that is not a dense tensor with values (naming ``where`` and the
            key).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a checkpoint or a state dict (a dict), got a {type(obj).__name__}")
    if not obj:
        raise CheckpointError(f"{where} is an empty dict: no state dict to load")
    fmt = obj.get("format")
    if (isinstance(fmt, str) and fmt.startswith("crfrnn_deeplab/")) or (fmt is None and _describes_our_model(obj)):
        if fmt is not None and fmt != FORMAT:
            raise CheckpointError(f"{where}: checkpoint format {fmt!r} is not the {FORMAT!r} this version reads")
        model = obj.get("model")
        problem = _state_dict_problem(model) if isinstance(model, Mapping) else f"type {type(model).__name__}"
        if problem is not None:
            raise CheckpointError(f"{where}: crfrnn_deeplab checkpoint without a state dict under 'model' ({problem})")
        return dict(model), {k: v for k, v in obj.items() if k != "model"}
    if _is_state_dict(obj):
        return dict(obj), {}
    for key in _STATE_DICT_ENTRIES:
        if _is_state_dict(obj.get(key)):
            return dict(obj[key]), {}
    # A dict of tensors with one bad entry: name that entry rather than every key.
    for name, candidate in ((None, obj), *((key, obj.get(key)) for key in _STATE_DICT_ENTRIES)):
        if _holds_tensors(candidate):
            inside = "" if name is None else f" (its state dict under {name!r})"
            raise CheckpointError(f"{where}{inside} is not a usable state dict: {_state_dict_problem(candidate)}")
    raise CheckpointError(
        f"{where} is not a checkpoint: neither a state dict (a dict of tensors) nor a dict with one under 'model' / "
        f"'state_dict'; its top-level keys are {sorted(map(str, obj))[:12]}"
    )


def _describes_our_model(obj: Mapping[Any, Any]) -> bool:
    """One of our checkpoints saved without its ``format`` entry (``torch.save(model_entries(...))``): a state dict
    under ``model`` next to a ``model_config`` of ours (a dict with ``name`` and only :class:`ModelConfig`'s keys)
    or an ``input_convention`` of ours (a dict of :class:`InputConvention`'s fields). Read as a bare state dict,
    the convention, block layout and classes it records would be dropped without a word; another project's
    ``model_config`` of other keys is not taken for ours."""
    if not isinstance(obj.get("model"), Mapping):
        return False
    config, convention = obj.get("model_config"), obj.get("input_convention")
    ours_config = isinstance(config, Mapping) and "name" in config and set(config) <= set(ModelConfig.__annotations__)
    names = {f.name for f in fields(InputConvention)}
    ours_convention = isinstance(convention, Mapping) and bool(convention) and set(convention) <= names
    return ours_config or ours_convention


def _split_prefix(removed: str) -> list[str]:
    """``"module.base."`` -> ``["module.", "base."]`` (the wrappers :func:`_stripped_names` removed, in order)."""
    return [part + "." for part in removed.split(".") if part]


def _stripped_names(keys: Iterable[str]) -> tuple[list[str], str]:
    """Keys without the wrapper prefixes shared by all of them and without ``_orig_mod.`` anywhere, and the
    leading prefix removed. The one place where wrapper prefixes are handled."""
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
    (our MSC) when every key starts with them, repeatedly (``module.base.`` goes too).

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


def _detect(names: list[str], removed: str, metadata: Mapping[str, Any]) -> str:
    """The layout of a checkpoint, from its wrapper-free keys, the prefix removed and its metadata."""
    if metadata:
        return "crfrnn_deeplab"
    keys = set(names)
    if any(re.match(r"layer1\.conv1\.(conv|bn)\.|layer[2-5]\.block\d+\.(reduce|conv3x3|increase)\.", k) for k in keys):
        return "caffe_deeplabv2"
    if "Scale." in _split_prefix(removed) or any(k.startswith("layer5.conv2d_list.") for k in keys):
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


def detect_layout(checkpoint: Mapping[str, Any]) -> str:
    """The layout of a loaded checkpoint or state dict (see the module docstring).

    Raises:
        ConversionError: no known layout matches (the message lists the layouts and some keys).
        CheckpointError: ``checkpoint`` holds no state dict.
    """
    state_dict, metadata = _unwrap_checkpoint(checkpoint, IN_MEMORY)
    names, removed = _stripped_names(state_dict)
    return _detect(names, removed, metadata)


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


_KEY_MAPS: dict[str, Callable[[str], str | None]] = {
    "caffe_deeplabv2": _caffe_key,
    "scale_ports": _scale_key,
    "torchvision_resnet": _torchvision_key,
    "torchvision_deeplabv3": _deeplabv3_key,
    "crfrnn_deeplab": _ours_key,
}

# layout -> (regex of wrapper-free checkpoint keys dropped on purpose, the reason reported)
_DROP_RULES: dict[str, tuple[str, str]] = {
    "caffe_deeplabv2": (r"fc\.(weight|bias)", "DeepLab v1 classifier of the COCO initialisation, not DeepLab v2's"),
    "torchvision_resnet": (r"fc\.(weight|bias)", "ImageNet classifier"),
    "torchvision_deeplabv3": (
        r"(aux_)?classifier\..+",
        "torchvision DeepLab v3 head (ASPP with image pooling) / auxiliary FCN head, not DeepLab v2's",
    ),
}


def _read(source: str | os.PathLike | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if isinstance(source, (str, os.PathLike)):
        return load_checkpoint(source), str(source)
    if not isinstance(source, Mapping):
        raise TypeError(f"source must be a path or a loaded checkpoint / state dict, got {type(source).__name__}")
    return source, IN_MEMORY


def convert_state_dict(
    source: str | os.PathLike | Mapping[str, Any], *, layout: str = "auto"
) -> ConvertedStateDict:
    """Maps a checkpoint of any supported layout onto canonical keys. Loads nothing into a model.

    The checkpoint is read, unwrapped and converted once here; everything downstream works from the result.

    Args:
        source: a checkpoint file (read with ``weights_only=True``), or a loaded checkpoint (ours, or a dict
            with a state dict under ``state_dict`` / ``model``) or state dict.
        layout: one of :data:`LAYOUTS`, or ``"auto"`` (detect it).

    Raises:
        ConversionError: unknown ``layout``, an undetectable one, or two checkpoint keys mapping to one key.
        CheckpointError: ``source`` holds no state dict (or one with a non-string key or a value that is not a
            dense tensor), the file is not a readable checkpoint, or our checkpoint's ``model_config``,
            ``class_names`` or ``input_convention`` is malformed (:func:`~.checkpoint.check_model_entries`).
        FileNotFoundError: no such file.
    """
    obj, where = _read(source)
    state_dict, metadata = _unwrap_checkpoint(obj, where)
    names, removed = _stripped_names(state_dict)
    if layout == "auto":
        layout = _detect(names, removed, metadata)
    elif layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; expected 'auto' or one of {LAYOUTS}")
    if layout == "crfrnn_deeplab":
        names = _split_ours(names)
    key_map = _KEY_MAPS[layout]
    drop, reason = _DROP_RULES.get(layout, (None, ""))
    out = ConvertedStateDict(
        layout, where, removed_prefix=removed, metadata=metadata, checkpoint_keys=tuple(state_dict)
    )
    for original, name, value in zip(state_dict, names, state_dict.values()):
        target = key_map(name)
        if target is not None:
            if target in out.state_dict:
                first = out.source_keys[target]
                raise ConversionError(f"{where}: checkpoint keys {first!r} and {original!r} both map to {target!r}")
            out.state_dict[target] = value
            out.source_keys[target] = original
        elif drop is not None and re.fullmatch(drop, name):
            out.dropped[original] = reason
        else:
            out.unknown.append(original)
    if metadata:
        check_model_entries(metadata, where, classes=out.num_classes)
        recorded = metadata.get("input_convention")
        if recorded is not None:
            try:
                InputConvention.from_dict(dict(recorded))
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{where}: input_convention {recorded!r:.120} is not valid: {e}") from e
    return out
