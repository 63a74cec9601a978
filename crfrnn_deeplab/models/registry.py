"""Model registry: build a model by name, like torchvision's ``get_model`` and timm's ``create_model``.

Builders are functions ``builder(*, num_classes: int, **options) -> nn.Module`` decorated with
:func:`register_model` in the module that defines them (the DeepLab v2 builders live in
:mod:`crfrnn_deeplab.models.builders`); importing the package imports that module and so fills the registry.
The registry also records what a model is (:class:`ModelSpec`: multi-scale or not), so that no caller has to
guess it from the name.

Example::

    model = get_model("deeplabv2_resnet101", num_classes=21, head="aspp_s", output_stride=16)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from torch import nn

__all__ = ["ModelSpec", "register_model", "get_model", "list_models", "model_spec", "builder_defaults"]

_Builder = TypeVar("_Builder", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model.

    Attributes:
        name: the registered name.
        builder: ``builder(*, num_classes, **options) -> nn.Module``.
        multi_scale: the model is an MSC wrapper (its state-dict keys are the single-scale model's under
            ``model.``; in training mode it returns an ``MSCOutput``).
    """

    name: str
    builder: Callable[..., nn.Module]
    multi_scale: bool = False


_MODELS: dict[str, ModelSpec] = {}


@overload
def register_model(fn: _Builder, /, *, name: str | None = None, multi_scale: bool = False) -> _Builder: ...


@overload
def register_model(*, name: str | None = None, multi_scale: bool = False) -> Callable[[_Builder], _Builder]: ...


def register_model(fn: _Builder | None = None, /, *, name: str | None = None, multi_scale: bool = False) -> Any:
    """Register a model builder under its function name (or ``name``).

    Usable bare (``@register_model``) or with options (``@register_model(name="my_model")``). The builder must
    accept ``num_classes`` as a keyword argument; its other keyword arguments are the model's options.
    ``multi_scale`` records that the builder returns an MSC wrapper (see :class:`ModelSpec`).

    Raises:
        ValueError: a model of that name is already registered.
        TypeError: the builder takes no ``num_classes`` argument.
    """

    def register(builder: _Builder) -> _Builder:
        key = builder.__name__ if name is None else name
        if key in _MODELS:
            raise ValueError(f"a model named {key!r} is already registered (by {_MODELS[key].builder.__module__})")
        if "num_classes" not in inspect.signature(builder).parameters:
            raise TypeError(f"model builder {key!r} must take a num_classes keyword argument")
        _MODELS[key] = ModelSpec(name=key, builder=builder, multi_scale=multi_scale)
        return builder

    return register(fn) if fn is not None else register


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered model.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: unknown ``name`` (the message lists the known ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__} {name!r}; known models: {list_models()}")
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {list_models()}")
    return _MODELS[name]


def builder_defaults(name: str) -> dict[str, Any]:
    """The default values of a registered builder's keyword options (``num_classes`` excluded)."""
    params = inspect.signature(model_spec(name).builder).parameters
    return {k: p.default for k, p in params.items() if k != "num_classes" and p.default is not inspect.Parameter.empty}


def get_model(name: str, *, num_classes: int, **options: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`, e.g. ``"deeplabv2_resnet101"``.
        num_classes: number of classes (>= 1).
        **options: the builder's keyword options (e.g. ``output_stride``, ``head``, ``norm``, ``scales``,
            ``input_convention``); see the builder's docstring.

    Returns:
        The model, randomly initialised (no weights are downloaded).

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones) or ``num_classes < 1``.
        TypeError: ``name`` is not a string, ``num_classes`` is not an int, or an option the builder does not
            accept.
    """
    builder = model_spec(name).builder
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__} {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = sorted(n for n, p in params.items() if n != "num_classes" and p.kind is not p.VAR_POSITIONAL)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for model {name!r}; accepted options: {accepted}")
    return builder(num_classes=num_classes, **options)
