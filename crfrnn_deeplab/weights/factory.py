"""The model a checkpoint needs, built from the registry and loaded strictly.

For our checkpoints it is the recorded builder (``model_config``: name, options, CRF); for the external layouts it
is the DeepLab v2 model of the trunk's depth with the block layout and input convention of the weights, ASPP-L
when the checkpoint has a classifier, and the multi-scale (MSC) model when the weights were saved from an MSC
wrapper. The checkpoint is read and converted once (:func:`~.layouts.convert_state_dict`); the recipe and the
load both work from that conversion.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from crfrnn_deeplab.crf.mean_field import MeanFieldCRF
from crfrnn_deeplab.models.aspp import ASPP_L_RATES
from crfrnn_deeplab.models.conventions import InputConvention
from crfrnn_deeplab.models.crfrnn import CRFRNN
from crfrnn_deeplab.models.registry import builder_defaults, get_model, list_models, model_spec
from crfrnn_deeplab.weights.architecture import (
    CAFFE_BLOCKS,
    TORCHVISION_BLOCKS,
    checkpoint_trunk,
    model_parts,
    model_trunk,
)
from crfrnn_deeplab.weights.checkpoint import CheckpointError
from crfrnn_deeplab.weights.layouts import CAFFE_LAYOUTS, ConversionError, ConvertedStateDict, convert_state_dict
from crfrnn_deeplab.weights.loading import LoadReport, load_converted

__all__ = [
    "ModelRecipe",
    "build_for_checkpoint",
    "check_crf_options",
    "model_for_checkpoint",
    "model_variant",
    "network_name",
    "recorded_crf_options",
]

# How crfrnn_deeplab.models.builders names the MSC model it registers for each single-scale builder; a candidate
# name is only used once the registry confirms it is that model's twin.
_MSC_SUFFIX = "_msc"


@dataclass(frozen=True)
class ModelRecipe:
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


def check_crf_options(options: Any, *, what: str = "crf") -> dict[str, Any]:
    """The keyword options of :class:`~crfrnn_deeplab.crf.MeanFieldCRF` in ``options``, checked by name (their values
    are MeanFieldCRF's to check). ``num_classes`` is not one of them: the CRF has the model's classes.

    Args:
        options: a dict of MeanFieldCRF keyword options.
        what: how messages name ``options`` (e.g. ``"crf"``, ``"runs/a/last.pt: model_config.crf"``).

    Raises:
        TypeError: not a dict with string keys, ``num_classes`` among them, or an option MeanFieldCRF does not take.
    """
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise TypeError(f"{what} must be a dict of MeanFieldCRF options, got {type(options).__name__} {options!r:.80}")
    if "num_classes" in options:
        raise TypeError(f"{what}: num_classes is not a CRF option: the CRF gets the model's number of classes")
    accepted = sorted(n for n in inspect.signature(MeanFieldCRF).parameters if n != "num_classes")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"{what}: unknown MeanFieldCRF option(s) {unknown}; accepted: {accepted}")
    return dict(options)


def model_variant(name: str, *, multi_scale: bool) -> str:
    """The registered model that is ``name``'s network with (``multi_scale=True``) or without the MSC wrapper.

    Raises:
        TypeError: ``multi_scale`` is not a bool.
        ValueError: ``name`` is not registered, or has no registered twin of the asked kind.
    """
    if not isinstance(multi_scale, bool):
        raise TypeError(f"multi_scale must be True or False, got {type(multi_scale).__name__} {multi_scale!r}")
    if model_spec(name).multi_scale == multi_scale:
        return name
    twin = name + _MSC_SUFFIX if multi_scale else name.removesuffix(_MSC_SUFFIX)
    if twin == name or twin not in list_models() or model_spec(twin).multi_scale != multi_scale:
        kind = "multi-scale (MSC)" if multi_scale else "single-scale"
        known = [n for n in list_models() if model_spec(n).multi_scale == multi_scale]
        raise ValueError(f"model {name!r} has no registered {kind} twin; registered {kind} models: {known}")
    return twin


def network_name(model: nn.Module) -> str | None:
    """The registry name of a model's single-scale network (``"deeplabv2_resnet101"`` for a ResNet-101 DeepLab v2,
    also inside MSC or CRFRNN), or ``None`` for a trunk of no registered depth.

    Raises:
        TypeError: not a DeepLabV2, MSC or CRFRNN model.
    """
    found = model_trunk(model_parts(model).network.backbone)
    return None if found is None else found[0].network


def _choosable_options(name: str) -> list[str]:
    """The options of a registered builder that a checkpoint's model may set: all but ``input_convention``, which
    comes with the weights."""
    return sorted(set(builder_defaults(name)) - {"input_convention"})


def _unknown_options(name: str, options: Mapping[str, Any]) -> list[str]:
    """The options not among :func:`_choosable_options` (none when the builder takes ``**kwargs``)."""
    params = inspect.signature(model_spec(name).builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return sorted(set(options) - set(_choosable_options(name)))


def _check_caller_options(name: str, options: Mapping[str, Any]) -> None:
    """Raises TypeError naming the caller's options that model ``name`` does not take, and those it does."""
    unknown = _unknown_options(name, options)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for model {name!r}; accepted: {_choosable_options(name)}")


def _recorded_recipe(converted: ConvertedStateDict, *, num_classes: int | None, msc: bool | None,
                     options: Mapping[str, Any]) -> ModelRecipe:
    """The recipe one of our checkpoints records, switched to the MSC or single-scale twin when ``msc`` asks."""
    config = converted.model_config
    if config is None:
        raise ConversionError(
            f"the crfrnn_deeplab state dict {converted.source} records no model_config (builder name and options): "
            "build the model with get_model(...) and load it with load_into(model, ...)"
        )
    # check_model_entries (run by convert_state_dict) made sure of the entries' types; here: what they name.
    where = f"{converted.source}: model_config"
    name = config["name"]
    if name not in list_models():
        raise CheckpointError(f"{where}.name {name!r} is not a registered model; registered: {list_models()}")
    recorded = {k: v for k, v in dict(config.get("options") or {}).items() if k != "input_convention"}
    unknown = _unknown_options(name, recorded)
    if unknown:
        raise CheckpointError(f"{where}.options: {unknown} not option(s) of {name!r}; its options: "
                              f"{_choosable_options(name)}")
    if msc is not None:
        twin = model_variant(name, multi_scale=msc)
        for option in set(builder_defaults(name)) - set(builder_defaults(twin)):  # the wrapper's own (scales)
            recorded.pop(option, None)
        name = twin
    _check_caller_options(name, options)
    return ModelRecipe(
        name=name,
        num_classes=num_classes if num_classes is not None else config["num_classes"],
        options={**recorded, **options},
        crf=recorded_crf_options(converted),
        convention=converted.input_convention,
    )


def recorded_crf_options(converted: ConvertedStateDict) -> dict[str, Any] | None:
    """The :class:`~crfrnn_deeplab.crf.MeanFieldCRF` options our checkpoint's ``model_config.crf`` records, checked
    by name (a CheckpointError naming the file), or None where it records no CRF layer."""
    recorded = (converted.model_config or {}).get("crf")
    if recorded is None:
        return None
    try:
        return check_crf_options(recorded, what=f"{converted.source}: model_config.crf")
    except TypeError as e:
        raise CheckpointError(str(e)) from e


def _inferred_recipe(converted: ConvertedStateDict, *, num_classes: int | None, msc: bool | None,
                     options: Mapping[str, Any]) -> ModelRecipe:
    """The DeepLab v2 model an external checkpoint's weights fit: depth, block layout, head, classes, wrapper."""
    trunk = checkpoint_trunk(converted)
    if trunk is None:
        raise ConversionError(
            f"the {converted.layout!r} checkpoint {converted.source} has no complete ResNet trunk (layer1..layer4)"
        )
    if trunk.network is None:
        raise ConversionError(f"the checkpoint holds {trunk.describe()}; the DeepLab v2 models are ResNet-18/34/50/101")
    arch: dict[str, Any] = dict(CAFFE_BLOCKS if converted.layout in CAFFE_LAYOUTS else TORCHVISION_BLOCKS)
    if not trunk.bottleneck:  # BasicBlocks have no 1×1 to carry the stride; their width is the stem's
        del arch["stride_in_1x1"]
        arch["base_width"] = int(converted.state_dict["backbone.conv1.weight"].shape[0])
    branches = sum(bool(re.fullmatch(r"head\.branches\.\d+\.weight", k)) for k in converted.state_dict)
    if branches:
        if branches != len(ASPP_L_RATES):
            raise ConversionError(f"the checkpoint's classifier has {branches} ASPP branches, ASPP-L has 4")
        arch["head"] = "aspp_l"
    classes = num_classes if num_classes is not None else converted.num_classes
    if classes is None:
        raise ConversionError(
            "the checkpoint has no DeepLab v2 classifier to count the classes: pass num_classes (CLI: --num-classes)"
        )
    multi_scale = converted.saved_from_msc if msc is None else msc
    if multi_scale and converted.layout == "caffe_deeplabv2":
        # kazuto1011's MSC: the max over scales at the unscaled input's score map, inputs resized with
        # F.interpolate(scale_factor=s); these options make the converted model compute the same fused output.
        arch.update(fusion="score_map", image_resize="scale_factor")
    name = model_variant(trunk.network, multi_scale=multi_scale)
    _check_caller_options(name, options)
    return ModelRecipe(
        name=name,
        num_classes=classes,
        options={**arch, **options},
        crf=None,
        convention=converted.input_convention,
    )


def build_for_checkpoint(
    converted: ConvertedStateDict,
    *,
    num_classes: int | None = None,
    msc: bool | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[ModelRecipe, nn.Module, LoadReport]:
    """The recipe a converted checkpoint needs, the model built from it, and the strict load's report (see
    :func:`model_for_checkpoint`)."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise TypeError(f"num_classes must be an int >= 1 (the model's classes) or None (the checkpoint's), got "
                        f"{type(num_classes).__name__} {num_classes!r}")
    if num_classes is not None and num_classes < 1:  # checked here, or the model_config would be blamed for it
        raise ValueError(f"num_classes must be an int >= 1 (the model's classes) or None (the checkpoint's), got "
                         f"{num_classes}")
    options = dict(options or {})
    if "input_convention" in options:
        raise TypeError("input_convention comes with the checkpoint's weights; it cannot be chosen here")
    if msc is not None and not isinstance(msc, bool):
        raise TypeError(f"msc must be True, False or None (as the checkpoint was), got {type(msc).__name__} {msc!r}")
    recorded = converted.layout == "crfrnn_deeplab"
    recipe_for = _recorded_recipe if recorded else _inferred_recipe
    recipe = recipe_for(converted, num_classes=num_classes, msc=msc, options=options)
    if recorded and converted.has_crf and recipe.crf is None:
        # A hand-made file: built as model_config says, the trained CRF would be left out of the model (and of a
        # converted file) with only a line in the report. (The reverse, a CRF recorded without weights, is the
        # documented network-only case: the CRF starts at its initial values, reported.)
        raise CheckpointError(
            f"{converted.source}: its weights hold a CRF layer (crf.*) but model_config.crf records none, so the "
            "model built from it would leave the trained CRF out; record the CRF's options in model_config.crf, or "
            "build the model yourself (CRFRNN) and load the weights with load_into(model, ...)"
        )
    try:
        model = recipe.build()
    except (TypeError, ValueError) as e:  # a recorded value the builder or the CRF refuses: say where it comes from
        if not recorded:
            raise
        passed = f" with the options passed ({options})" if options else ""
        raise CheckpointError(
            f"{converted.source}: the model its model_config records ({recipe.name}, options {recipe.options}, "
            f"crf {recipe.crf}){passed} cannot be built: {e}"
        ) from e
    return recipe, model, load_converted(model, converted, strict=True)


def model_for_checkpoint(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    num_classes: int | None = None,
    layout: str = "auto",
    msc: bool | None = None,
    **options: Any,
) -> tuple[nn.Module, LoadReport]:
    """Builds the model a checkpoint needs and loads it (strict, see :func:`~.loading.load_into`).

    For our checkpoints the recorded builder (``model_config``: name, options, CRF); for the others the DeepLab v2
    model of the trunk's depth (ResNet-18/34/50/101) with the block layout and input convention of the weights
    (Caffe or torchvision), ASPP-L when the checkpoint has a classifier, and MSC when the weights were saved from
    an MSC wrapper.

    Args:
        source: a checkpoint file or a loaded checkpoint / state dict.
        num_classes: classes of the model; default: the checkpoint's. Required for checkpoints without a DeepLab v2
            classifier (torchvision, the COCO DeepLab v1 init). Another number re-initialises the classifier.
        layout: one of :data:`~.layouts.LAYOUTS`, or ``"auto"``.
        msc: the registered multi-scale (MSC) model (True) or its single-scale twin (False); ``None``: as the
            checkpoint was.
        **options: further builder options (e.g. ``norm="frozen"``, ``output_stride=16``), applied last.

    Returns:
        ``(model, report)``; the model is in training mode, as built.

    Raises:
        ConversionError, CheckpointError, FileNotFoundError: see :func:`~.loading.load_into`; also a checkpoint
            without a classifier and no ``num_classes``, or a trunk of an unsupported depth. CheckpointError also
            for our checkpoint's ``model_config`` naming an unregistered model, an option the builder or
            MeanFieldCRF does not take, or a value they refuse (naming the file and the entry), and for weights
            that hold a CRF layer where ``model_config.crf`` records none.
        ValueError: ``msc`` asks for a twin the registry does not have; ``num_classes`` < 1.
        TypeError: ``msc`` is not True, False or None; ``num_classes`` is not an int or None; an option the
            builder does not take, or ``input_convention`` (it comes with the weights); ``source`` is neither a
            path nor a mapping.
    """
    converted = convert_state_dict(source, layout=layout)
    _, model, report = build_for_checkpoint(converted, num_classes=num_classes, msc=msc, options=options)
    return model, report
