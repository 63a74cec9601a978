"""Reading an experiment's configuration with OmegaConf: the typed schema's defaults (:mod:`.schema`), then a
YAML file that overrides only what differs, then ``key=value`` command-line overrides; then checks::

    cfg = load_config("configs/voc12_deeplabv2.yaml", ["data.root=/data/voc", "stage1.lr=1e-4"])

OmegaConf merges and type-checks (``OmegaConf.structured`` of the schema, ``OmegaConf.merge``); its errors
become :class:`ConfigError` naming the key. :func:`validate` then checks, before any work, what a type cannot
say: every number finite and in its range, names that must exist (model and its options, dataset, device) and
settings that depend on each other. :func:`save_config` writes the resolved config next to a run's outputs.
The schema's classes are re-exported here, the one import a caller needs.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from crfrnn_deeplab.crf import BilateralFilter, MeanFieldCRF, Normalization, fixed_crf
from crfrnn_deeplab.data import dataset_spec, list_datasets
from crfrnn_deeplab.data.transforms import SCALE_LIMITS  # the transform's own limits
from crfrnn_deeplab.files import atomic_write
from crfrnn_deeplab.models import get_model, list_models
from crfrnn_deeplab.models.registry import builder_defaults
from crfrnn_deeplab.weights import LAYOUTS
from crfrnn_deeplab.training import schema
from crfrnn_deeplab.training.schema import (
    Config,
    ConfigError,
    CRFConfig,
    DataConfig,
    EvalConfig,
    FolderConfig,
    GridSearchConfig,
    ModelConfig,
    StageConfig,
)

# The schema's classes are re-exported: callers load and inspect configs from this one module.
__all__ = [
    *schema.__all__,
    "load_config",
    "read_config",
    "resolve_config",
    "config_from_dict",
    "apply_overrides",
    "validate",
    "to_dict",
    "save_config",
    "is_resolved_config",
]

#: The evaluation modes (``eval.mode``).
EVAL_MODES = ("whole", "sliding")

# --------------------------------------------------------------------------------------------------------
# Merging (OmegaConf) and its errors, named by key


def _annotation(key: str) -> Any:
    """The schema's type of a dotted key (``a.b[1]``: the list's item type), or None outside the schema."""
    owner: Any = Config
    annotation = None
    for part in key.split("."):
        name, _, index = part.partition("[")
        if not dataclasses.is_dataclass(owner) or name not in (hints := typing.get_type_hints(owner)):
            return None
        annotation = owner = hints[name]
        if index:
            annotation = owner = (typing.get_args(annotation) or (Any,))[0]
    return annotation


def _type_name(annotation: Any) -> str:
    if dataclasses.is_dataclass(annotation):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(annotation))
    options = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(options[0])}"
    if typing.get_origin(annotation) is dict:
        return "a mapping"
    if options:  # X | None
        return " or ".join("null" if a is type(None) else _type_name(a) for a in options)
    return getattr(annotation, "__name__", str(annotation))


def _shown(value: Any) -> str:
    """A value as a message shows it: its type and repr, OmegaConf's containers as the dict / list they hold,
    None as the schema's null."""
    if value is None:
        return "null"
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return f"{type(value).__name__} {value!r}"


def _misplaced_value(updates: Mapping, owner: Any = Config, prefix: str = "") -> str | None:
    """The first key of ``updates`` whose value has the wrong shape for the schema: a section or a mapping field
    given something else than a mapping, a list field given something else than a list (or items that are
    mappings or lists), any other field given a mapping or a list, a null where the schema allows none.
    OmegaConf raises a bare TypeError for some of these (``data.scale_range={}``) and lets others through
    (``[{}]`` as a list of floats). An interpolation (``${...}``) is left to OmegaConf to resolve."""
    hints = typing.get_type_hints(owner)
    for key, value in updates.items():
        annotation, where = hints.get(key), f"{prefix}{key}"
        if annotation is None or (isinstance(value, str) and ("${" in value or value == "???")):
            continue  # an unknown key, an interpolation, "???" (missing): OmegaConf names, resolves or keeps them
        section = dataclasses.is_dataclass(annotation)
        expected = f"{where}: expected {_type_name(annotation)}, got {_shown(value)}"
        if value is None:
            if type(None) not in typing.get_args(annotation):
                return expected
        elif section or typing.get_origin(annotation) is dict:
            if not isinstance(value, Mapping):
                return expected
            if section and (found := _misplaced_value(value, annotation, f"{where}.")):
                return found
        elif typing.get_origin(annotation) is list:
            if not isinstance(value, (list, tuple)):
                return expected
            item = typing.get_args(annotation)[0]
            for i, v in enumerate(value):
                if isinstance(v, (Mapping, list, tuple)):
                    return f"{where}[{i}]: expected {_type_name(item)}, got {_shown(v)}"
        elif isinstance(value, (Mapping, list, tuple)):
            return expected
    return None


def _replaced_container(base: Mapping, updates: Mapping, prefix: str = "") -> str | None:
    """The first key at which ``updates`` puts a mapping where ``base`` holds a list, or the other way round:
    OmegaConf's merge raises a bare TypeError there (in ``model.options``, whose values the schema leaves
    untyped; :func:`_misplaced_value` catches the typed fields first)."""
    for key, value in updates.items():
        old, where = base.get(key), f"{prefix}{key}"
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            if found := _replaced_container(old, value, f"{where}."):
                return found
        elif isinstance(old, (Mapping, list)) and isinstance(value, (Mapping, list)) \
                and isinstance(old, Mapping) != isinstance(value, Mapping):
            return (f"{where}: expected {'a mapping' if isinstance(old, Mapping) else 'a list'} like the value it "
                    f"replaces ({old!r}), got {_shown(value)}")
    return None


def _config_error(error: OmegaConfBaseException) -> ConfigError:
    """OmegaConf's exception as a ConfigError that names the key and what it expects."""
    key = error.full_key
    if isinstance(error, ConfigKeyError) and key:
        parent = _annotation(key.rpartition(".")[0]) if "." in key else Config
        known = ", ".join(f.name for f in dataclasses.fields(parent)) if dataclasses.is_dataclass(parent) else ""
        return ConfigError(f"unknown config key {key!r}" + (f"; known keys here: {known}" if known else ""))
    annotation = _annotation(key) if key else None
    if annotation is not None:
        return ConfigError(f"{key}: expected {_type_name(annotation)}, got {_shown(error.value)}")
    return ConfigError(f"{key or 'config'}: {str(error).splitlines()[0]}")


def _merge(base: DictConfig, updates: Any) -> DictConfig:
    plain = OmegaConf.to_container(updates) if isinstance(updates, DictConfig) else updates
    if isinstance(plain, Mapping) and (found := _misplaced_value(plain)):
        raise ConfigError(found)
    try:
        return OmegaConf.merge(base, updates)
    except OmegaConfBaseException as e:
        raise _config_error(e) from None
    except TypeError as e:  # "Cannot merge incompatible container types"
        found = _replaced_container(OmegaConf.to_container(base), plain) if isinstance(plain, Mapping) else None
        raise ConfigError(found or f"config: {e}") from None


def _to_config(merged: DictConfig) -> Config:
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # an interpolation (${...}) that does not resolve, or not to this shape
        found = _misplaced_interpolation(merged)
        raise ConfigError(found or f"{e.full_key or 'config'}: {str(e).splitlines()[0]}") from None


def _misplaced_interpolation(merged: DictConfig) -> str | None:
    """The first key whose interpolation (``crf=${seed}``) resolves to a value of the wrong shape for the schema
    (:func:`_misplaced_value`), with the interpolation. OmegaConf refuses such a value without naming the key
    ("Invalid type assigned: int is not a subclass of CRFConfig"); here it is resolved in an untyped copy of the
    config, which checks no types."""
    written = OmegaConf.to_container(merged)  # interpolations as written
    untyped = OmegaConf.create(written)

    def search(values: dict, owner: Any, prefix: str) -> str | None:
        hints = typing.get_type_hints(owner)
        for key, value in values.items():
            annotation, where = hints.get(key), f"{prefix}{key}"
            items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
            if annotation is not None and any(isinstance(v, str) and "${" in v for v in items):
                try:
                    resolved = OmegaConf.select(untyped, where)
                    if OmegaConf.is_config(resolved):
                        resolved = OmegaConf.to_container(resolved, resolve=True)
                except OmegaConfBaseException:
                    continue  # one that does not resolve: OmegaConf's own message names it
                shown = value if isinstance(value, str) else "[" + ", ".join(map(str, value)) + "]"
                if found := _misplaced_value({key: resolved}, owner, prefix):
                    return f"{found} (the value of {shown})"
                if dataclasses.is_dataclass(annotation) and isinstance(resolved, Mapping):  # another section
                    fields = {f.name for f in dataclasses.fields(annotation)}
                    if unknown := sorted(set(resolved) - fields):
                        return (f"{where}: expected {_type_name(annotation)}, got a mapping with the keys {unknown} "
                                f"(the value of {shown})")
            elif dataclasses.is_dataclass(annotation) and isinstance(value, dict):
                if found := search(value, annotation, f"{where}."):
                    return found
        return None

    return search(written, Config, "")


def _is_text(key: str) -> bool:
    """A field that holds text (``str`` or ``str | None``): its command-line value is taken as written."""
    annotation = _annotation(key)
    return annotation is str or (typing.get_origin(annotation) not in (list, dict)
                                 and str in typing.get_args(annotation))


#: ``key[i]``: item ``i`` of the list at ``key`` (``data.scale_range[0]``; ``[-1]``: the last item).
_INDEXED = re.compile(r"(?P<list>[^\[\]]+)(?P<indices>(?:\[-?\d+\])+)")


def _override(item: str) -> tuple[str, Any]:
    """One ``key=value`` as the key and its value, read as YAML (``1e-3``, ``true``, ``null``, ``[1, 2]``), except
    that text fields keep the text (``data.root=2012`` is "2012", ``out_dir=on`` is "on")."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. stage1.lr=1e-3)")
    key, raw = (s.strip() for s in item.split("=", 1))
    try:
        if _is_text(key):  # (OmegaConf checks the grammar of an interpolation in it)
            read = OmegaConf.create({"value": None if raw in ("null", "~", "None") else raw})
        else:
            read = OmegaConf.from_dotlist([f"value={raw}"])
        return key, OmegaConf.to_container(read)["value"]
    except yaml.YAMLError as e:  # e.g. an unquoted "[0.5, 1.5]" that the shell split in two
        problem = str(e).splitlines()[0]
        raise ConfigError(f"{key}: the value {raw!r} is not valid YAML ({problem}); quote an override whose "
                          f"value holds spaces, or the shell splits it in two", keys=(key,)) from None
    except OmegaConfBaseException as e:  # e.g. an unclosed interpolation "${a"
        raise ConfigError(f"{key}: the value {raw!r} cannot be read: {str(e).splitlines()[0]}", keys=(key,)) from None


def _update(key: str, value: Any, current: DictConfig) -> DictConfig:
    """What ``key=value`` merges into ``current``: a nested DictConfig that sets ``key`` (a mapping value sets
    only its own entries). For an item of a list, ``key[i]``, the whole list with that item replaced: OmegaConf
    would read ``[0]`` as the key ``"0"`` of a mapping, and a merge replaces a list as a whole."""
    if indexed := _INDEXED.fullmatch(key):
        return _nested(indexed["list"], _with_item(current, indexed, value))
    return _nested(key, value)


def _nested(key: str, value: Any) -> DictConfig:
    update = OmegaConf.create()
    try:
        OmegaConf.update(update, key, value, force_add=True)
    except OmegaConfBaseException as e:  # a key OmegaConf cannot parse
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}", keys=(key,)) from None
    return update


def _with_item(current: DictConfig, indexed: re.Match, value: Any) -> list:
    """The list that the key ``indexed`` matched (:data:`_INDEXED`: ``name[i]``, or ``name[i][j]`` in a list of
    lists) indexes in ``current``, with that item replaced by ``value``; a negative index counts from the end, as in
    Python.

    Raises:
        ConfigError: ``name`` is not a key of the config, or holds no list; the index is past the list's end (an
            override sets an item, it does not add one: the whole list sets its length).
    """
    key, name = indexed.string, indexed["list"]
    indices = [int(i) for i in re.findall(r"-?\d+", indexed["indices"])]
    node, where = current, ""
    try:
        for part in name.split("."):
            if not isinstance(node, DictConfig):  # seed.x[0]
                raise ConfigError(f"{key}: {where} is {_held(where, node)}, not a mapping, so it has no key {part!r}",
                                  keys=(name,))
            node, where = node[part], f"{where}.{part}".lstrip(".")
    except ConfigKeyError as e:
        parent = e.full_key.rpartition(".")[0]
        if not dataclasses.is_dataclass(_annotation(parent) if parent else Config):  # an entry of a mapping field
            raise ConfigError(f"{key}: {e.full_key} is not set, so it has no item to replace; give the whole list "
                              f"({e.full_key}=[...])", keys=(name,)) from None
        raise _config_error(e) from None
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        raise ConfigError(f"{name}: {str(e).splitlines()[0]}", keys=(name,)) from None
    items = target = OmegaConf.to_container(node) if isinstance(node, ListConfig) else node
    for depth, index in enumerate(indices):
        if not isinstance(target, list):
            raise ConfigError(f"{key}: {where} is {_held(where, target)}, not a list, so it has no item [{index}]",
                              keys=(name,))
        if not -len(target) <= index < len(target):
            size = ("is empty" if not target else
                    f"has {len(target)} item{'s' if len(target) > 1 else ''} (indices 0 to {len(target) - 1}, or "
                    f"-{len(target)} to -1 from the end)")
            raise ConfigError(f"{key}: index {index} is out of range: {where} {size}; to change its length, give "
                              f"the whole list ({where}=[...])", keys=(name,))
        if depth == len(indices) - 1:
            target[index] = value
        else:
            target, where = target[index], f"{where}[{index}]"
    return items


def _held(key: str, value: Any) -> str:
    """What ``key`` holds, for a message: its type in the schema, else the value (an entry of ``model.options``)."""
    annotation = _annotation(key)
    return _type_name(annotation) if annotation is not None else _shown(value)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """``config`` with the ``key.sub=value`` strings applied in order (see :func:`_override`).

    A key inside a mapping field sets one entry: ``model.options.base_width=16``. An index sets one item of a
    list: ``data.scale_range[1]=2.0`` (``[-1]``: the last one).
    """
    merged = OmegaConf.structured(config)
    for item in overrides:
        merged = _merge(merged, _update(*_override(item), merged))
    return _to_config(merged)


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> Config:
    """The defaults overridden by a (possibly partial) nested mapping, e.g. a checkpoint's ``"config"``."""
    if not isinstance(data, (dict, DictConfig)):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return _to_config(_merge(OmegaConf.structured(Config), data))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The defaults, then the YAML file (if any: :func:`read_config`), then the ``key=value`` overrides; validated.

    Raises:
        FileNotFoundError: no file at ``path``.
        ConfigError: a file that is no config, an unknown key, a wrong type, or an invalid setting (the message names
            the key, and the file when the setting is invalid as the file gives it: :func:`resolve_config`).
    """
    if path is None:
        return validate(apply_overrides(Config(), overrides or []))
    return resolve_config(read_config(path), overrides or [], source=str(path))


def read_config(path: str | Path) -> Config:
    """The defaults overridden by a YAML file of config keys, type-checked but not validated: a config as a file
    gives it, e.g. a run's saved ``config.yaml`` read to compare it with a checkpoint's on a machine that may lack
    the device it names (:func:`load_config` reads a config to run, and validates it).

    An empty file (or one of comments, or ``null``) sets nothing: the defaults.

    Raises:
        FileNotFoundError: no file at ``path``.
        ConfigError: the file is not UTF-8 text, not YAML, or not a mapping of config keys at the top level (a
            number, a text, a list); an unknown key or a wrong type. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # e.g. a checkpoint or an image passed as the config
        raise ConfigError(f"{path}: cannot be read as a config, a YAML mapping of config keys: it is not UTF-8 "
                          f"text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # e.g. no permission
        raise ConfigError(f"{path}: cannot be read as a config ({e})") from None
    try:
        top = yaml.compose(text, Loader=yaml.SafeLoader)  # the top node of the document, nothing constructed yet
        if top is None or top.tag == "tag:yaml.org,2002:null":  # empty, comments only, or null: no settings
            return config_from_dict({}, source=str(path))
        if not isinstance(top, yaml.MappingNode):  # (OmegaConf.load would read a text "x" as the mapping {x: null})
            raise ConfigError(f"{path}: cannot be read as a config, a YAML mapping of config keys (such as "
                              f"'seed: 0'): its top level is {_top_level(top, text)}")
        data = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except OSError as e:  # a top level YAML composes as a mapping that OmegaConf refuses: "!!set {a, b}"
        raise ConfigError(f"{path}: cannot be read as a config, a YAML mapping of config keys ({e})") from None
    except OmegaConfBaseException as e:  # e.g. an unclosed interpolation "${a"
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    return config_from_dict(data, source=str(path))


def _top_level(node: yaml.Node, text: str) -> str:
    """A YAML document's top level other than a mapping, for a message: a list, or the scalar's type and value."""
    if isinstance(node, yaml.SequenceNode):
        return f"a list ({len(node.value)} item{'s' if len(node.value) != 1 else ''})"
    value = yaml.safe_load(text)  # one scalar
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 60 else shown[:56] + '...'}"


def resolve_config(config: Config, overrides: list[str], *, source: str) -> Config:
    """``config``, read from ``source`` (a YAML file, a checkpoint's config), with the ``key=value`` overrides
    on top (:func:`apply_overrides`), validated (:func:`validate`).

    Raises:
        ConfigError: an override that does not fit the schema, or an invalid setting. A setting that is invalid
            as ``source`` gave it (the overrides did not make it so) is reported with ``source`` in front: that
            is where it comes from, to fix there or to override.
    """
    resolved = apply_overrides(config, overrides)
    try:
        return validate(resolved)
    except ConfigError as e:
        if not _from_source(e, config, overrides):
            raise
        raise ConfigError(f"{source}: {e}", keys=e.keys, context=e.context) from None


def _from_source(error: ConfigError, config: Config, overrides: list[str]) -> bool:
    """Whether a refused setting comes from ``config``'s source: no override sets any of its keys or context
    keys, and the source sets at least one of its keys (to a value other than the schema's default: a value left
    at the default, such as a missing ``data.root``, is for the command line to give)."""
    if not error.keys:
        return False
    given = [leaf for item in overrides for leaf in _keys_set(*_override(item))]
    related = (*error.keys, *error.context)
    if any(g == k or g.startswith(k + ".") or k.startswith(g + ".") for g in given for k in related):
        return False
    default = Config()
    return any(_value(config, key) != _value(default, key) for key in error.keys)


def _keys_set(key: str, value: Any) -> list[str]:
    """The dotted keys an override sets: an item of a list sets the list (``data.scale_range[0]``:
    ``data.scale_range``); a mapping only its own entries (:func:`_leaves`)."""
    indexed = _INDEXED.fullmatch(key)
    return [indexed["list"]] if indexed else _leaves(OmegaConf.to_container(_nested(key, value)))


def _leaves(update: Any, prefix: str = "") -> list[str]:
    """The dotted keys an override sets: ``{"stage1": {"batch_size": 2}}`` sets ``stage1.batch_size`` only (a
    mapping is merged into the one it overrides); a list or a scalar is one leaf."""
    if isinstance(update, dict) and update:
        return [leaf for k, v in update.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")]


def _value(config: Any, key: str) -> Any:
    """The value at a dotted key of a config (a section's dataclass for a section's key)."""
    for name in key.split("."):
        config = getattr(config, name)
    return config


# --------------------------------------------------------------------------------------------------------
# Validation: ranges, names, consistency


@dataclass(frozen=True)
class _Range:
    """An interval of allowed values, each end closed unless marked open; printed as ">= 1" or "in [0, 1)"."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.open_low else '>='} {_number(self.low)}"
        return f"in {'(' if self.open_low else '['}{_number(self.low)}, {_number(self.high)}{')' if self.open_high else ']'}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


_AT_LEAST_1, _NON_NEGATIVE, _POSITIVE = _Range(1), _Range(0), _Range(0, open_low=True)
_PROBABILITY = _Range(0, 1)
_STAGE_RANGES = {
    "iterations": _NON_NEGATIVE, "batch_size": _AT_LEAST_1, "accumulate": _AT_LEAST_1, "lr": _NON_NEGATIVE,
    "crf_lr": _NON_NEGATIVE, "momentum": _Range(0, 1, open_high=True), "weight_decay": _NON_NEGATIVE,
    "poly_power": _NON_NEGATIVE, "network_loss_weight": _NON_NEGATIVE, "eval_every": _NON_NEGATIVE,
    "checkpoint_every": _AT_LEAST_1, "max_grad_norm": _NON_NEGATIVE,
}
#: The allowed range of each bounded number (the other numbers need only be finite).
RANGES: dict[str, _Range] = {
    "data.crop_size": _AT_LEAST_1, "data.hflip_prob": _PROBABILITY, "data.workers": _NON_NEGATIVE,
    "data.image_size": _AT_LEAST_1, "data.train_images": _AT_LEAST_1, "data.val_images": _AT_LEAST_1,
    "model.num_classes": _Range(1, 255),  # labels are uint8, and 255 is the ignore label
    "crf.spatial_weight": _NON_NEGATIVE, "crf.bilateral_weight": _NON_NEGATIVE,
    "crf.theta_alpha": _POSITIVE, "crf.theta_beta": _POSITIVE, "crf.theta_gamma": _POSITIVE,
    "crf.train_iterations": _NON_NEGATIVE, "crf.eval_iterations": _NON_NEGATIVE,
    **{f"{stage}.{key}": r for stage in ("stage1", "stage2") for key, r in _STAGE_RANGES.items()},
    "eval.window": _AT_LEAST_1, "eval.stride": _AT_LEAST_1, "eval.batch_size": _AT_LEAST_1,
    "eval.max_images": _NON_NEGATIVE, "eval.panels": _NON_NEGATIVE,
    "grid_search.held_out_images": _NON_NEGATIVE, "grid_search.bilateral_weights": _NON_NEGATIVE,
    "grid_search.theta_alphas": _POSITIVE,
    "grid_search.theta_betas": _POSITIVE,
    "seed": _Range(0, 2**32 - 1), "threads": _NON_NEGATIVE, "log_every": _AT_LEAST_1,
    "divergence_factor": _NON_NEGATIVE,
}



def _numbers(obj: Any, prefix: str = "") -> Iterator[tuple[str, str, float]]:
    """``(field key, key of the number, number)`` for every int/float of a config, list items included."""
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, key + ".")
        elif isinstance(value, list):
            yield from ((key, f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, (int, float)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, key, value


def _check_numbers(config: Config) -> None:
    for field_key, key, value in _numbers(config):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}", keys=(field_key,))
        allowed = RANGES.get(field_key)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{key} must be {allowed}, got {_number(value)}", keys=(field_key,))


def _check_choice(key: str, value: str, choices: list[str] | tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}", keys=(key,))


def _check_data(config: Config) -> None:
    d = config.data
    _check_choice("data.dataset", d.dataset, list_datasets())
    spec = dataset_spec(d.dataset)
    if "root" in spec.options and not d.root:
        raise ConfigError(
            f"data.root is required for dataset {d.dataset!r}: pass it on the command line, e.g. data.root=/path/to/data",
            keys=("data.root",), context=("data.dataset",),
        )
    if "class_names" in spec.options and not d.folder.class_names:
        raise ConfigError(f"data.folder.class_names is required for dataset {d.dataset!r} (one name per class)",
                          keys=("data.folder.class_names",))
    classes = spec.class_names if spec.class_names is not None else d.folder.class_names
    if (spec.class_names is not None or "class_names" in spec.options) and len(classes) != config.model.num_classes:
        raise ConfigError(f"model.num_classes={config.model.num_classes}, but dataset {d.dataset!r} has "
                          f"{len(classes)} classes", keys=("model.num_classes", "data.dataset", "data.folder.class_names"))
    low, high = SCALE_LIMITS
    if len(d.scale_range) != 2 or not low <= d.scale_range[0] <= d.scale_range[1] <= high:
        raise ConfigError(f"data.scale_range: expected [min, max] with {low:g} <= min <= max <= {high:g}, "
                          f"got {d.scale_range}", keys=("data.scale_range",))


def _check_model(config: Config) -> None:
    """The model's name and options, checked by its builder, and the smallest input it takes against the
    training crop and the sliding window."""
    m = config.model
    _check_choice("model.name", m.name, list_models())
    accepted = builder_defaults(m.name)
    unknown = sorted(set(m.options) - set(accepted))
    if unknown:
        raise ConfigError(f"model.options: {unknown} not options of {m.name!r}; its options: {', '.join(accepted)}",
                          keys=("model.options", "model.name"))
    _check_choice("model.init_layout", m.init_layout, ("auto", *LAYOUTS))
    try:
        with torch.device("meta"):  # the builder checks its options; the weights are not allocated
            network = get_model(m.name, num_classes=m.num_classes, **m.options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.options of {m.name!r}: {e} (model.options={dict(m.options)})",
                          keys=("model.options", "model.name")) from None  # (num_classes: range-checked before)
    smallest = network.min_input_size
    if config.data.crop_size < smallest:
        raise ConfigError(f"data.crop_size={config.data.crop_size} is smaller than the {smallest} pixels {m.name!r} "
                          f"takes with these options", keys=("data.crop_size", "model.name", "model.options"))
    if config.eval.mode == "sliding" and config.eval.window < smallest:
        raise ConfigError(f"eval.window={config.eval.window} is smaller than the {smallest} pixels {m.name!r} "
                          f"takes with these options", keys=("eval.window", "model.name", "model.options"),
                          context=("eval.mode",))


def _check_crf(config: Config) -> None:
    """The CRF layer's settings and the grid's corners, checked by building the CRFs they describe."""
    c, g = config.crf, config.grid_search
    _check_choice("crf.normalization", c.normalization, typing.get_args(Normalization))
    _check_choice("crf.bilateral_filter", c.bilateral_filter, typing.get_args(BilateralFilter))
    try:
        MeanFieldCRF(num_classes=config.model.num_classes, **dataclasses.asdict(c))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"crf: {e}", keys=("crf",)) from None  # (num_classes: range-checked before)
    if not g.enabled:
        return
    for pick, corner in ((min, "smallest"), (max, "largest")):
        try:
            fixed_crf(num_classes=config.model.num_classes, bilateral_weight=pick(g.bilateral_weights),
                      theta_alpha=pick(g.theta_alphas), theta_beta=pick(g.theta_betas),
                      spatial_weight=c.spatial_weight, theta_gamma=c.theta_gamma, iterations=c.eval_iterations,
                      normalization=c.normalization)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"grid_search: the {corner} values of the grid do not make a CRF: {e}",
                              keys=("grid_search", "crf")) from None


def _check_device(device: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}", keys=("device",))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device}: CUDA is not available on this machine (use device=cpu or auto)",
                              keys=("device",))
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                              keys=("device",))


def validate(config: Config) -> Config:
    """Checks what the types cannot: finite numbers in their :data:`RANGES`, names that must exist, settings
    that depend on each other, the device. Raises ConfigError naming the key; returns ``config``."""
    _check_numbers(config)
    if not config.out_dir.strip():
        raise ConfigError("out_dir must name a directory (use out_dir=. for the current one), got ''",
                          keys=("out_dir",))
    _check_data(config)
    _check_choice("eval.mode", config.eval.mode, EVAL_MODES)
    if config.eval.mode == "sliding" and config.eval.stride > config.eval.window:
        raise ConfigError(f"eval.stride={config.eval.stride} must be <= eval.window={config.eval.window}: a larger "
                          f"step leaves pixels between the windows without a prediction",
                          keys=("eval.stride", "eval.window"), context=("eval.mode",))
    _check_model(config)
    g = config.grid_search
    if g.enabled:
        for key in ("bilateral_weights", "theta_alphas", "theta_betas"):
            if not getattr(g, key):
                raise ConfigError(f"grid_search.{key} must be a non-empty list of numbers (or grid_search.enabled=false)",
                                  keys=(f"grid_search.{key}", "grid_search.enabled"))
    _check_crf(config)
    if 0 < config.divergence_factor <= 1:
        raise ConfigError(f"divergence_factor must be 0 (off) or > 1, got {_number(config.divergence_factor)}",
                          keys=("divergence_factor",))
    if config.stage1.iterations == 0 and config.stage2.iterations == 0:
        raise ConfigError("nothing to train: stage1.iterations and stage2.iterations are both 0",
                          keys=("stage1.iterations", "stage2.iterations"))
    _check_device(config.device)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data (JSON/YAML-able)."""
    return OmegaConf.to_container(OmegaConf.structured(config))


#: The first line of every config :func:`save_config` writes.
_RESOLVED_HEADER = "# resolved config of this run (python train.py --config <this file> reproduces it)\n"


def save_config(config: Config, path: str | Path) -> Path:
    """Writes the resolved config as YAML (loadable with ``--config``), whole or not at all (:func:`atomic_write`:
    a resumed run rewrites its run's ``config.yaml``, and a kill or a full disk then must not leave half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write((_RESOLVED_HEADER + yaml.safe_dump(to_dict(config), sort_keys=False)).encode("utf-8"))
    return path


def is_resolved_config(path: str | Path) -> bool:
    """Whether ``path`` is a config that :func:`save_config` wrote (it starts with that function's header): how
    a run directory is told from any other directory that holds a ``config.yaml``."""
    try:
        with Path(path).open(encoding="utf-8") as f:
            return f.readline() == _RESOLVED_HEADER
    except (OSError, UnicodeDecodeError):
        return False
