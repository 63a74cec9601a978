"""Experiment configuration: one typed schema of defaults, YAML files that override what differs, and
``key=value`` command-line overrides last. Unknown keys and wrong types are errors naming the key.

Modules never read the config: ``train.py``'s ``build_*`` functions turn it into constructor arguments.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "CRFConfig",
    "StageConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration key or value that does not fit the schema."""


@dataclass
class DataConfig:
    """Where the images come from and how they are batched."""

    dataset: str = "synthetic"  # synthetic | voc12_aug | voc12 | coco_stuff | cityscapes | folder
    root: str | None = None  # data root (required for every dataset but synthetic)
    image_size: int = 161  # synthetic images (square)
    train_images: int = 1000  # synthetic training split length
    val_images: int = 100  # synthetic validation split length
    held_out_images: int = 30  # images for the post-processing CRF grid search
    crop_size: int = 129
    batch_size: int = 8
    workers: int = 0
    ignore_index: int = 255


@dataclass
class ModelConfig:
    name: str = "deeplabv2_resnet18"
    num_classes: int = 6
    options: dict[str, Any] = field(default_factory=lambda: {"base_width": 24})
    init_from: str | None = None  # a checkpoint of any layout crfrnn_deeplab.convert reads


@dataclass
class CRFConfig:
    """The CRF layer's initial (fixed-weight) parameters and what it learns."""

    spatial_weight: float = 3.0
    bilateral_weight: float = 5.0
    theta_alpha: float = 20.0
    theta_beta: float = 30.0
    theta_gamma: float = 2.0
    normalization: str = "symmetric"
    train_iterations: int = 5
    eval_iterations: int = 5
    learn_bandwidths: bool = True


@dataclass
class StageConfig:
    """One training stage (SGD, poly schedule)."""

    iterations: int = 0
    lr: float = 2.5e-3
    crf_lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    accumulate: int = 1  # gradient accumulation steps per optimiser step


@dataclass
class Config:
    """A whole run: stage 1 trains the network, stage 2 (if it has iterations) the network + CRF jointly."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(iterations=2000, lr=2.5e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(iterations=400, lr=1e-4, crf_lr=1e-3))
    out_dir: str = "runs/synthetic"
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    log_every: int = 20


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Returns ``value`` if it fits ``annotation`` (ints accepted for floats), else raises ConfigError."""
    hint = typing.get_origin(annotation)
    if hint in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected None, got {value!r}")
    if hint is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; known here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping of {sorted(f.name for f in dataclasses.fields(current))}")
            _merge(current, value, path + ".")
        else:
            setattr(obj, key, _check_type(value, hints[key], path))


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Applies ``key.sub=value`` strings (values parsed as YAML: ``1e-3``, ``true``, ``null``, ``{a: 1}``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        nested: dict[str, Any] = {}
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        _merge(config, nested)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then the overrides."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _merge(config, data)
    apply_overrides(config, overrides or [])
    if config.data.dataset != "synthetic" and not config.data.root:
        raise ConfigError(f"data.root is required for dataset {config.data.dataset!r} (e.g. data.root=/path/to/data)")
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data (JSON/YAML-able)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
