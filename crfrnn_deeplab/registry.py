"""Model registry: build a model by name, like torchvision's ``get_model`` and timm's ``create_model``.

Builders are functions ``builder(*, num_classes: int, **options) -> nn.Module`` decorated with
:func:`register_model` in the module that defines the model (the DeepLab v2 builders live in
:mod:`crfrnn_deeplab.deeplab`); importing the package imports those modules and so fills the registry.

Example::

    model = get_model("deeplabv2_resnet101", num_classes=21, head="aspp_s", output_stride=16)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

from torch import nn

__all__ = ["register_model", "get_model", "list_models"]

_Builder = TypeVar("_Builder", bound=Callable[..., nn.Module])
_MODELS: dict[str, Callable[..., nn.Module]] = {}


@overload
def register_model(fn: _Builder, /) -> _Builder: ...


@overload
def register_model(*, name: str | None = None) -> Callable[[_Builder], _Builder]: ...


def register_model(fn: _Builder | None = None, /, *, name: str | None = None) -> Any:
    """Register a model builder under its function name (or ``name``).

    Usable bare (``@register_model``) or with a name (``@register_model(name="my_model")``). The builder must
    accept ``num_classes`` as a keyword argument; its other keyword arguments are the model's options.

    Raises:
        ValueError: a model of that name is already registered.
    """

    def register(builder: _Builder) -> _Builder:
        key = builder.__name__ if name is None else name
        if key in _MODELS:
            raise ValueError(f"a model named {key!r} is already registered (by {_MODELS[key].__module__})")
        if "num_classes" not in inspect.signature(builder).parameters:
            raise TypeError(f"model builder {key!r} must take a num_classes keyword argument")
        _MODELS[key] = builder
        return builder

    return register(fn) if fn is not None else register


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


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
        TypeError: ``num_classes`` is not an int, or an option the builder does not accept.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {list_models()}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__} {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    builder = _MODELS[name]
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = sorted(n for n, p in params.items() if n != "num_classes" and p.kind is not p.VAR_POSITIONAL)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for model {name!r}; accepted options: {accepted}")
    return builder(num_classes=num_classes, **options)
