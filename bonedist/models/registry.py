"""A timm-style model registry: ``@register_model`` factories, ``create_model(name, **cfg)``, ``list_models()``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bonedist import BonedistError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **cfg) -> nn.Module:
    """Build a registered model; unknown names and options raise with what is known."""
    if name not in _MODELS:
        raise BonedistError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    try:
        return _MODELS[name](**cfg)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise BonedistError(f"model {name!r}: {exc}") from exc
        raise
    except ValueError as exc:  # option values checked by the model itself
        raise BonedistError(f"model {name!r}: {exc}") from exc
