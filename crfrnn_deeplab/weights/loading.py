"""Strict loading of a checkpoint of any supported layout into our models, with a report of every key.

:func:`load_into` loads into a :class:`~crfrnn_deeplab.models.DeepLabV2`, :class:`~crfrnn_deeplab.models.MSC` or
:class:`~crfrnn_deeplab.models.CRFRNN` and returns a :class:`LoadReport` that accounts for every key of the
checkpoint and of the model. Strict by default: each checkpoint key is loaded, or dropped by a named rule (the
``fc`` / v3 classifiers, the CRF when the model has none) and reported; each model key is loaded, or kept at its
initialisation for a stated reason (no head in the checkpoint, another number of classes, no CRF in the
checkpoint, no BatchNorm counters); anything else — unknown keys, missing keys, shape mismatches outside the
class dimension — is a :class:`~.layouts.ConversionError` naming the keys (and both shapes). ``strict=False``
reports them instead. Loading also refuses a model of another architecture than the weights'
(:func:`~.architecture.check_architecture`) and, strict or not, a checkpoint tensor that holds NaN or infinite
values or negative BatchNorm variances (a model built from it would predict NaN everywhere, and argmax turns that
into class 0 without a word) or whose dtype is of another kind than the model's (an integer, bool or complex tensor
would be cast into the float parameter without a word), and sets the model's input convention to the weights'.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from crfrnn_deeplab.models.conventions import InputConvention
from crfrnn_deeplab.weights.architecture import ModelParts, check_architecture, model_parts
from crfrnn_deeplab.weights.checkpoint import CheckpointError
from crfrnn_deeplab.weights.layouts import ConversionError, ConvertedStateDict, convert_state_dict

__all__ = ["LoadReport", "Mismatch", "load_converted", "load_into"]

logger = logging.getLogger(__name__)

_CLASS_INDEXED = re.compile(r"head\.branches\.\d+\.(weight|bias)|crf\.(spatial_weight|bilateral_weight|compatibility)")


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
        layout: the checkpoint's layout (one of :data:`~.layouts.LAYOUTS`).
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
        class_names: the class names the checkpoint records, when the model has the checkpoint's classes
            (``None`` otherwise).
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
    class_names: list[str] | None = None
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


def _keys(keys: list[str], limit: int = 10) -> str:
    return f"{keys[:limit]}{f' … (+{len(keys) - limit} more)' if len(keys) > limit else ''}"


def _differs_only_in_classes(key: str, source: tuple[int, ...], target: tuple[int, ...], classes: int) -> bool:
    """The shapes of a canonical key differ in the class dimensions only (the classifier's output channels, the
    CRF's C×C matrices), and the model's count ``classes``."""
    if not _CLASS_INDEXED.fullmatch(key) or len(source) != len(target):
        return False
    dims = (0, 1) if key.startswith("crf.") else (0,)
    return all(t == classes if d in dims else s == t for d, (s, t) in enumerate(zip(source, target)))


@dataclass
class _Matching:
    """The checkpoint's canonical tensors matched against the model's state dict (``target``)."""

    loaded: dict[str, Tensor] = field(default_factory=dict)  # model key -> tensor of the right shape
    unknown: list[str] = field(default_factory=list)  # checkpoint keys without a place in the model
    wrong_shape: dict[str, Mismatch] = field(default_factory=dict)  # model key -> mismatch outside the classes
    unexplained: list[str] = field(default_factory=list)  # model keys missing without a stated reason


def _match(converted: ConvertedStateDict, parts: ModelParts, target: Mapping[str, Tensor], *, reinit: bool,
           report: LoadReport) -> _Matching:
    """Matches every checkpoint tensor to its model key; records the dropped CRF and the class mismatches."""
    matching = _Matching(unknown=list(converted.unknown))
    for key, value in converted.state_dict.items():
        src = converted.source_keys[key]
        if key.startswith("crf.") and parts.crf is None:
            report.unexpected[src] = "CRF parameters; the model has no CRF layer"
            continue
        name = key if key.startswith("crf.") else parts.prefix + key
        if name not in target:
            matching.unknown.append(src)
            continue
        shape, wanted = tuple(value.shape), tuple(target[name].shape)
        if shape == wanted:
            matching.loaded[name] = value
        elif reinit and _differs_only_in_classes(key, shape, wanted, parts.network.num_classes):
            report.mismatched[name] = Mismatch(src, shape, wanted, classes=True)
        else:
            matching.wrong_shape[name] = Mismatch(src, shape, wanted)
    order = {key: i for i, key in enumerate(converted.checkpoint_keys)}  # report in the checkpoint's order
    matching.unknown.sort(key=order.__getitem__)
    return matching


def _explain_missing(converted: ConvertedStateDict, prefix: str, target: Mapping[str, Tensor],
                     matching: _Matching, report: LoadReport) -> None:
    """Gives each model key the checkpoint does not fill its reason, or lists it as unexplained."""
    for name in target:
        if name in matching.loaded or name in report.mismatched or name in matching.wrong_shape:
            continue
        if name.endswith(".num_batches_tracked"):
            report.missing[name] = "BatchNorm step counter absent from the checkpoint (unused by DeepLab's BatchNorm)"
        elif name.startswith(prefix + "head.") and not converted.has_head:
            report.missing[name] = "the checkpoint has no DeepLab v2 classifier: initialised from N(0, 0.01²)"
        elif name.startswith("crf.") and not converted.has_crf:
            report.missing[name] = "network-only checkpoint: the CRF keeps its initial values"
        else:
            matching.unexplained.append(name)


def _shape_error(name: str, m: Mismatch) -> str:
    """One shape mismatch, named by the checkpoint's own key (and by the model's when it differs)."""
    where = name if m.source_key == name else f"{m.source_key} (the model's {name})"
    return f"{where}: checkpoint {m.checkpoint_shape} vs model {m.model_shape}"


def _refuse_or_report(converted: ConvertedStateDict, matching: _Matching, report: LoadReport, *, strict: bool) -> None:
    """Strict: raises on unknown keys, unexplained missing keys and shape mismatches; else reports them."""
    if strict and (matching.unknown or matching.unexplained or matching.wrong_shape):
        problems = []
        if matching.unknown:
            hint = f" (nothing matched: is {converted.layout!r} the right layout?)" if not converted.state_dict else ""
            problems.append(
                f"{len(matching.unknown)} checkpoint key(s) have no place in the model{hint}: {_keys(matching.unknown)}"
            )
        if matching.unexplained:
            problems.append(
                f"{len(matching.unexplained)} model key(s) missing from the checkpoint: {_keys(matching.unexplained)}"
            )
        if matching.wrong_shape:
            shapes = [_shape_error(name, m) for name, m in matching.wrong_shape.items()]
            problems.append("shape mismatch: " + "; ".join(shapes[:10]))
        raise ConversionError(
            f"cannot load the {converted.layout!r} checkpoint {converted.source} strictly: " + "; ".join(problems)
            + " (load_into(..., strict=False) loads the rest and reports these)"
        )
    for src in matching.unknown:
        report.unexpected[src] = "no place in the model (strict=False)"
    for name in matching.unexplained:
        report.missing[name] = "missing from the checkpoint (strict=False)"
    report.mismatched.update(matching.wrong_shape)


def _kind(t: Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.is_complex():
        return "complex"
    return "floating-point" if t.is_floating_point() else "integer"


def _refuse_bad_values(converted: ConvertedStateDict, matching: _Matching, target: Mapping[str, Tensor],
                       source_of: Mapping[str, str]) -> None:
    """Raises CheckpointError naming (as in the checkpoint) the tensors to be loaded that would load as something
    else or make the model predict NaN: another kind of dtype than the model's (``load_state_dict`` would cast an
    integer, bool or complex tensor into a float one without a word; float16/bfloat16/float64 into float32 is
    exact enough and stays accepted; a float BatchNorm counter is accepted when its value is a whole number),
    NaN or infinite values (also float64 values that overflow the model's dtype), negative BatchNorm variances."""
    wrong_kind, non_finite, negative = [], [], []
    for name, value in matching.loaded.items():
        wanted = target[name]
        if _kind(value) != _kind(wanted):
            counter = name.endswith(".num_batches_tracked") and value.is_floating_point()
            if counter and bool((torch.isfinite(value) & (value == value.round()) & (value >= 0)).all()):
                continue  # a count saved as a float: exact
            whole = " not a whole count," if counter else ""
            wrong_kind.append(f"{source_of[name]} ({value.dtype},{whole} the model's is {wanted.dtype})")
        elif value.is_floating_point() or value.is_complex():
            count = value.numel() - int(torch.isfinite(value).sum())
            # float64 values beyond float32's range load as inf: count them as the model will hold them
            cast = value.to(wanted.dtype) if value.dtype != wanted.dtype else value
            overflow = value.numel() - int(torch.isfinite(cast).sum()) if not count else 0
            if count:
                non_finite.append(f"{source_of[name]} ({count} of {value.numel()} values)")
            elif overflow:
                non_finite.append(f"{source_of[name]} ({overflow} of {value.numel()} values, finite in {value.dtype} "
                                  f"but not in the model's {wanted.dtype})")
            elif name.endswith(".running_var") and (count := int((value < 0).sum())):
                negative.append(f"{source_of[name]} ({count} of {value.numel()} values)")
    if wrong_kind:
        raise CheckpointError(
            f"the checkpoint {converted.source} holds {len(wrong_kind)} tensor(s) of another kind than the model's: "
            f"{_abbreviate(wrong_kind)}; loading would cast the values (integers and bools into floats, complex "
            "numbers losing their imaginary part), so the file is not the weights it claims to be"
        )
    if non_finite:
        raise CheckpointError(
            f"the checkpoint {converted.source} holds NaN or infinite values in {len(non_finite)} tensor(s): "
            f"{_abbreviate(non_finite)}; a model with these weights predicts NaN (the run that wrote it may have "
            "diverged: use an earlier checkpoint)"
        )
    if negative:
        raise CheckpointError(
            f"the checkpoint {converted.source} holds negative BatchNorm variances in {len(negative)} tensor(s): "
            f"{_abbreviate(negative)}; a variance is >= 0, and a model with these statistics predicts NaN"
        )


def _set_convention(net: nn.Module, converted: ConvertedStateDict, report: LoadReport) -> None:
    convention = converted.input_convention
    if convention is None:
        report.notes.append("the checkpoint records no input convention; the model keeps its own")
        convention = net.input_convention
    elif convention != net.input_convention:
        report.notes.append(f"input convention changed from {_describe(net.input_convention)}")
        net.input_convention = convention
    report.input_convention = convention


def load_converted(model: nn.Module, converted: ConvertedStateDict, *, strict: bool = True) -> LoadReport:
    """Loads an already converted checkpoint (:func:`~.layouts.convert_state_dict`) into ``model``: what
    :func:`load_into` does after reading and converting. Nothing in ``model`` changes when an error is raised."""
    parts = model_parts(model)
    net = parts.network
    classes = converted.num_classes
    reinit = classes is not None and classes != net.num_classes
    notes = check_architecture(net, converted, loads_head=converted.has_head and not reinit)
    report = LoadReport(
        layout=converted.layout, source=converted.source, removed_prefix=converted.removed_prefix,
        checkpoint_classes=classes, notes=notes,
    )
    report.unexpected.update(converted.dropped)
    target = parts.root.state_dict()
    matching = _match(converted, parts, target, reinit=reinit, report=report)
    report.reinitialised_classifier = bool(report.mismatched)
    _explain_missing(converted, parts.prefix, target, matching, report)
    _refuse_or_report(converted, matching, report, strict=strict)
    source_of = {(k if k.startswith("crf.") else parts.prefix + k): src for k, src in converted.source_keys.items()}
    _refuse_bad_values(converted, matching, target, source_of)

    result = parts.root.load_state_dict(matching.loaded, strict=False)
    left = {k for k in [*report.missing, *report.mismatched] if not k.endswith(".num_batches_tracked")}
    assert not result.unexpected_keys and set(result.missing_keys) == left, result  # BatchNorm fills its counter
    report.used = {name: source_of[name] for name in target if name in matching.loaded}
    _set_convention(net, converted, report)
    names = converted.metadata.get("class_names")
    if names is not None and classes == net.num_classes:
        report.class_names = list(names)
    logger.info("%s", report)
    return report


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
        model: a :class:`~crfrnn_deeplab.models.DeepLabV2`, :class:`~crfrnn_deeplab.models.MSC` or
            :class:`~crfrnn_deeplab.models.CRFRNN` (also inside DataParallel/DDP or ``torch.compile``).
        source: a checkpoint file (read with ``weights_only=True``), or a loaded checkpoint / state dict.
        layout: one of :data:`~.layouts.LAYOUTS`, or ``"auto"``.
        strict: refuse checkpoint keys without a place in the model, model keys the checkpoint lacks without a
            stated reason, and shape mismatches outside the class dimension. ``False`` reports them (in
            ``unexpected``, ``missing``, ``mismatched``) and keeps those model tensors at their initial values.

    Returns:
        The :class:`LoadReport`.

    Raises:
        ConversionError: unknown or undetectable layout; a model of another depth, block layout or head than the
            weights (the message names the builder option); with ``strict``, unknown / missing keys and shape
            mismatches, each named as in the checkpoint (with both shapes).
        CheckpointError: the file is truncated, not a checkpoint, or needs pickle execution; a tensor to be loaded
            is of another dtype kind than the model's (integer, bool or complex into float; named with both
            dtypes), or holds NaN or infinite values, or negative BatchNorm variances (named, with how many).
        FileNotFoundError: no such file.
        TypeError: ``model`` is not a DeepLabV2, MSC or CRFRNN model, or ``source`` is neither a path nor a mapping.
    """
    return load_converted(model, convert_state_dict(source, layout=layout), strict=strict)
