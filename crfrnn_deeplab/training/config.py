"""Experiment configuration: one typed schema of defaults, YAML files that override only what differs, and
``key=value`` command-line overrides last.

The defaults are the published recipes (DeepLab v2 on PASCAL VOC for the network, CRF-as-RNN for the joint
stage); ``configs/*.yaml`` override what an experiment changes, and the command line overrides last::

    cfg = load_config("configs/voc12_deeplabv2.yaml", ["data.root=/data/voc", "stage1.lr=1e-4"])

Unknown keys, values of the wrong type and inconsistent settings are :class:`ConfigError` naming the key and
what was expected. Modules never read the config: ``train.py``'s ``build_*`` functions turn it into
constructor arguments. :func:`save_config` writes the resolved config next to a run's outputs.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "FolderConfig",
    "ModelConfig",
    "CRFConfig",
    "StageConfig",
    "EvalConfig",
    "GridSearchConfig",
    "Config",
    "DATASETS",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "validate",
    "to_dict",
    "save_config",
]

DATASETS = ("synthetic", "voc12_aug", "voc12", "coco_stuff", "cityscapes", "folder")


class ConfigError(ValueError):
    """A configuration key or value that does not fit the schema (the message names the key)."""


@dataclass
class FolderConfig:
    """An image/mask folder dataset (``data.dataset=folder``), ADE20K-style layout under ``data.root``:
    ``<root>/<image_dir>/<split>/<id>.jpg`` and ``<root>/<mask_dir>/<split>/<id><mask_suffix>``."""

    class_names: list[str] = field(default_factory=list)
    image_dir: str = "images"
    mask_dir: str = "annotations"
    train_split: str = "training"
    val_split: str = "validation"
    mask_suffix: str = ".png"
    reduce_zero_label: bool = False  # ADE20K: mask value 0 is "other" (ignored), 1..N are the classes


@dataclass
class DataConfig:
    """Where the images come from and how training crops are made (DeepLab v2: scale 0.5-1.5, crop 321, flip)."""

    dataset: Literal["synthetic", "voc12_aug", "voc12", "coco_stuff", "cityscapes", "folder"] = "voc12_aug"
    root: str | None = None  # required for every dataset but synthetic; voc12_aug: holds VOC2012/ and SBD/
    crop_size: int = 321
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    hflip_prob: float = 0.5
    workers: int = 2  # DataLoader worker processes (0: load in the training process)
    # the embedded synthetic dataset (crfrnn_deeplab.data.SyntheticSegmentation)
    image_size: int = 161
    train_images: int = 1000
    val_images: int = 100
    folder: FolderConfig = field(default_factory=FolderConfig)


@dataclass
class ModelConfig:
    """The network: a registered model name (``crfrnn_deeplab.list_models()``) and its builder options."""

    name: str = "deeplabv2_resnet101_msc"
    num_classes: int = 21
    options: dict[str, Any] = field(default_factory=dict)  # keyword options of the builder, e.g. base_width
    init_from: str | None = None  # weights for the network at the start of the first stage that runs
    init_layout: str = "auto"  # the layout of init_from (crfrnn_deeplab.weights.convert.LAYOUTS), or auto-detected


@dataclass
class CRFConfig:
    """The CRF layer's initial (fixed-weight) parameters and what it learns: MeanFieldCRF's keyword arguments.

    The defaults are DeepLab v2's post-processing CRF for VOC (w_bilateral 4, θα 121, θβ 5, w_spatial 3, θγ 3).
    """

    spatial_weight: float = 3.0
    bilateral_weight: float = 4.0
    theta_alpha: float = 121.0
    theta_beta: float = 5.0
    theta_gamma: float = 3.0
    normalization: Literal["symmetric", "after"] = "symmetric"
    train_iterations: int = 5
    eval_iterations: int = 10
    learn_kernel_weights: bool = True
    learn_compatibility: bool = True
    learn_bandwidths: bool = True


@dataclass
class StageConfig:
    """One training stage: SGD (momentum, weight decay), poly schedule, batches, evaluation and checkpoints.

    Learning rates: ``lr`` on the backbone, 10× on the head's weights, 20× on its biases (no weight decay),
    ``crf_lr`` on the CRF's parameters (no weight decay).
    """

    iterations: int = 0  # optimiser steps; 0 skips the stage
    batch_size: int = 10  # images per process per forward pass
    accumulate: int = 1  # forward/backward passes per optimiser step (effective batch: batch × accumulate × ranks)
    lr: float = 2.5e-4
    crf_lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    network_loss_weight: float = 0.0  # stage 2: weight of the network's own loss next to the CRF's (0: CRF only)
    eval_every: int = 0  # evaluate on the validation split every N steps (0: only at the end)
    checkpoint_every: int = 1000  # write last.pt every N steps (and at the end, on SIGINT/SIGTERM)


@dataclass
class EvalConfig:
    """Evaluation: whole images or a sliding window; what is saved."""

    mode: Literal["whole", "sliding"] = "whole"
    window: int = 513  # sliding-window size (pixels)
    stride: int = 342  # sliding-window step
    batch_size: int = 1  # whole-image mode: images of equal size only when > 1 (e.g. synthetic)
    max_images: int = 0  # evaluations during training use at most this many images (0: the whole split)
    panels: int = 4  # validation images drawn in the PNG panel at each evaluation (0: none)


@dataclass
class GridSearchConfig:
    """The post-processing CRF baseline: bilateral weight, θα, θβ searched for mIoU on held-out images, the
    spatial kernel fixed (DeepLab v2, Sec. 4.1). The defaults are the paper's VOC grid."""

    enabled: bool = True
    held_out_images: int = 100
    bilateral_weights: list[float] = field(default_factory=lambda: [3.0, 4.0, 5.0, 6.0])
    theta_alphas: list[float] = field(default_factory=lambda: [30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0])
    theta_betas: list[float] = field(default_factory=lambda: [3.0, 4.0, 5.0, 6.0])


@dataclass
class Config:
    """A whole run: stage 1 trains the network, stage 2 the network + CRF jointly (a stage with 0 iterations is
    skipped; stage 2 then starts from ``model.init_from``)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(iterations=20000, eval_every=2000))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(iterations=0, lr=1e-5, eval_every=2000))
    eval: EvalConfig = field(default_factory=EvalConfig)
    grid_search: GridSearchConfig = field(default_factory=GridSearchConfig)
    out_dir: str = "runs/experiment"
    seed: int = 0
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N
    amp: bool = True  # mixed precision on CUDA (the CRF always computes in float32); ignored on CPU
    threads: int = 0  # torch CPU threads per process (0: PyTorch's default)
    log_every: int = 20  # steps between progress/metrics records


# --------------------------------------------------------------------------------------------------------
# Type checking and merging


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"a list of {_type_name(item)}"
    if origin is dict or annotation is dict:
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Returns ``value`` (ints widened to floats) if it fits ``annotation``, else raises ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {_describe(value)}")
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {_describe(value)}")
        return value
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {_describe(value)}")
        return None
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {_describe(value)}")
        (item,) = typing.get_args(annotation)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        return dict(value)
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected float, got {_describe(value)}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected int, got {_describe(value)}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {_describe(value)}")
    return value


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Sets the fields of dataclass ``obj`` named in ``updates`` (recursively), type-checked."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_describe(updates)}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; known keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                fields = ", ".join(f.name for f in dataclasses.fields(current))
                raise ConfigError(f"{path}: expected a mapping of {fields}, got {_describe(value)}")
            _merge(current, value, path + ".")
        else:
            setattr(obj, key, _check_type(value, hints[key], path))


def _field_annotation(config: Config, parts: list[str]) -> tuple[Any, Any] | None:
    """(owning object, annotation) of a dotted key, or None where the path leaves the schema."""
    obj: Any = config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return None
        if i == len(parts) - 1:
            return obj, typing.get_type_hints(type(obj))[part]
        obj = getattr(obj, part)
    return None


def _parse_value(raw: str, annotation: Any) -> Any:
    """A command-line value: YAML (``1e-3``, ``true``, ``null``, ``[1, 2]``, ``{a: 1}``), except that fields
    holding strings take the text as it is (``data.root=2012`` is the string "2012")."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    if annotation is str or str in options:
        if raw in ("null", "~", "None") and type(None) in options:
            return None
        return raw
    return yaml.safe_load(raw) if raw else ""


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Applies ``key.sub=value`` strings in order (see :func:`_parse_value`).

    A key inside a mapping field sets one entry: ``model.options.base_width=16``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. stage1.lr=1e-3)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        found = _field_annotation(config, parts)
        if found is None and len(parts) > 1:  # an entry of a mapping field, e.g. model.options.base_width
            parent = _field_annotation(config, parts[:-1])
            if parent is not None and typing.get_origin(parent[1]) is dict:
                mapping = dict(getattr(parent[0], parts[-2]))
                mapping[parts[-1]] = yaml.safe_load(raw) if raw else ""
                setattr(parent[0], parts[-2], mapping)
                continue
        annotation = found[1] if found is not None else Any
        nested: dict[str, Any] = {}
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_value(raw, annotation)
        _merge(config, nested)
    return config


def validate(config: Config) -> Config:
    """Checks the settings that depend on each other or on a range; raises ConfigError naming the key."""
    d = config.data
    if d.dataset != "synthetic" and not d.root:
        raise ConfigError(
            f"data.root is required for dataset {d.dataset!r}: pass it on the command line, e.g. data.root=/path/to/data"
        )
    if d.dataset == "folder" and not d.folder.class_names:
        raise ConfigError("data.folder.class_names is required for dataset 'folder' (one name per class)")
    if len(d.scale_range) != 2 or not 0 < d.scale_range[0] <= d.scale_range[1]:
        raise ConfigError(f"data.scale_range: expected [min, max] with 0 < min <= max, got {d.scale_range}")
    positive = {
        "data.crop_size": d.crop_size,
        "data.image_size": d.image_size,
        "data.train_images": d.train_images,
        "data.val_images": d.val_images,
        "model.num_classes": config.model.num_classes,
        "eval.window": config.eval.window,
        "eval.stride": config.eval.stride,
        "eval.batch_size": config.eval.batch_size,
        "log_every": config.log_every,
    }
    for name in ("stage1", "stage2"):
        stage: StageConfig = getattr(config, name)
        positive.update({f"{name}.batch_size": stage.batch_size, f"{name}.accumulate": stage.accumulate,
                         f"{name}.checkpoint_every": stage.checkpoint_every})
        non_negative = {f"{name}.iterations": stage.iterations, f"{name}.lr": stage.lr,
                        f"{name}.crf_lr": stage.crf_lr, f"{name}.weight_decay": stage.weight_decay,
                        f"{name}.eval_every": stage.eval_every, f"{name}.network_loss_weight": stage.network_loss_weight}
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key in ("data.workers", "threads", "eval.max_images", "eval.panels", "grid_search.held_out_images"):
        section, _, name = key.rpartition(".")
        value = getattr(getattr(config, section) if section else config, name)
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    c = config.crf
    for key in ("theta_alpha", "theta_beta", "theta_gamma"):
        if getattr(c, key) <= 0:
            raise ConfigError(f"crf.{key} must be > 0, got {getattr(c, key)}")
    g = config.grid_search
    if g.enabled:
        for key in ("bilateral_weights", "theta_alphas", "theta_betas"):
            values = getattr(g, key)
            if not values or (key != "bilateral_weights" and min(values) <= 0):
                raise ConfigError(f"grid_search.{key} must be a non-empty list of positive numbers, got {values}")
    if config.stage1.iterations == 0 and config.stage2.iterations == 0:
        raise ConfigError("nothing to train: stage1.iterations and stage2.iterations are both 0")
    if not (config.device in ("auto", "cpu", "cuda") or config.device.startswith("cuda:")):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {config.device!r}")
    return config


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> Config:
    """The defaults overridden by a (possibly partial) nested mapping, e.g. a checkpoint's ``"config"``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    config = Config()
    try:
        _merge(config, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The defaults, then the YAML file (if any), then the ``key=value`` overrides; validated.

    Raises:
        FileNotFoundError: no file at ``path``.
        ConfigError: unknown key, wrong type, or an invalid setting (the message names the key).
    """
    if path is None:
        config = Config()
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        config = config_from_dict(data, source=str(path))
    apply_overrides(config, overrides or [])
    return validate(config)


def to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data (JSON/YAML-able)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_config(config: Config, path: str | Path) -> Path:
    """Writes the resolved config as YAML (loadable with ``--config``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# resolved config of this run (python train.py --config <this file> reproduces it)\n"
    path.write_text(text + yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    return path
