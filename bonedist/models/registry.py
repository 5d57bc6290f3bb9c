"""A timm-style model registry: ``@register_model`` factories, ``create_model(name, **cfg)``, ``list_models()``.

The registry is the one list of models: the CLI, the demo, the benchmarks, ``evaluate`` and the launch scripts
(``bonedist models``) all ask it. A new model is one new file with a registered factory (see the README).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from bonedist import BonedistError
from bonedist.models.task import REGRESSION, Task


@dataclass(frozen=True)
class ModelInfo:
    """A registered model.

    Attributes:
        name: the factory's name, used everywhere (``--model``, run folders, report rows).
        factory: builds the model from its options (``image_size``, ``pretrained``, ...).
        task: what its outputs mean (``bonedist.models.task``).
        pretrained: whether it takes ImageNet backbone weights (``--pretrained``); else it trains from scratch.
        paper: the paper's (MSE z, RMSE z, P) per report row, printed beside ours.
        paper_weight: its weight in the paper's ensemble (VI-D: 0.5 ResNet50-patch, 0.1 InceptionV3, 0.1 Xception).
    """

    name: str
    factory: Callable[..., nn.Module]
    task: Task = REGRESSION
    pretrained: bool = True
    paper: dict = field(default_factory=dict)
    paper_weight: float = 0.0


_MODELS: dict[str, ModelInfo] = {}  # in registration order: the order of every table and script


def register_model(fn: Callable[..., nn.Module] | None = None, *, task: Task = REGRESSION, pretrained: bool = True,
                   paper: dict | None = None, paper_weight: float = 0.0):
    """Register a factory under its function name (``@register_model`` or ``@register_model(task=...)``)."""

    def register(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = factory.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = ModelInfo(name, factory, task, pretrained, dict(paper or {}), paper_weight)
        return factory

    return register(fn) if fn is not None else register


def unregister_model(name: str) -> None:
    _MODELS.pop(name, None)


def list_models() -> list[str]:
    return list(_MODELS)


def model_info(name: str) -> ModelInfo:
    if name not in _MODELS:
        raise BonedistError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, **cfg) -> nn.Module:
    """Build a registered model; unknown names and options raise with what is known."""
    info = model_info(name)
    try:
        model = info.factory(**cfg)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise BonedistError(f"model {name!r}: {exc}") from exc
        raise
    except ValueError as exc:  # option values checked by the model itself
        raise BonedistError(f"model {name!r}: {exc}") from exc
    model.task = info.task
    return model
