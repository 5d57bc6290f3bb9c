"""A timm-style model registry: ``@register_model`` factories, ``create_model(name, inputs, **options)``,
``list_models()``.

The registry is the one list of models: the CLI, the demo, the benchmarks, ``evaluate`` and the launch scripts
(``bonedist models``) all ask it. A model is one file: its factory takes its typed architecture options and the
number of input channels; its recipes give, per preset it supports, what differs from the preset's shared values
(``bonedist.train.presets``); input settings (size, patches, hand mask, contrast) are the run's ``InputConfig``,
which ``create_model`` resolves against the model into ``model.spec``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bonedist import BonedistError
from bonedist.models.task import REGRESSION, Task
from bonedist.options import build, check_fields
from bonedist.spec import InputConfig, InputSpec

if TYPE_CHECKING:  # the registry describes models without importing torch (a fast CLI); factories import it
    from torch import nn


@dataclass
class NoOptions:
    """A model without architecture options."""


@dataclass(frozen=True)
class ModelInfo:
    """A registered model.

    Attributes:
        name: the factory's name, used everywhere (``--model``, run folders, report rows).
        factory: ``factory(options, in_chans) -> nn.Module``.
        options: the dataclass of its architecture options (flags: ``bonedist train --help``).
        task: what its outputs mean (``bonedist.models.task``).
        recipes: per preset it supports, a function returning what differs from the preset's shared values
            (``TrainConfig`` fields; ``model`` holds its options, ``input`` input settings).
        channels: input channels it accepts, its default first.
        paper: the paper's (MSE z, RMSE z, P) per report row, printed beside ours.
        paper_weight: its weight in the paper's ensemble (VI-D: 0.5 ResNet50-patch, 0.1 InceptionV3, 0.1 Xception).
        cpu_precision: ``(precision, channels_last)`` the engine uses with ``--precision auto`` on a CPU that has
            bf16 matrix units (a measured choice per architecture, see ``bonedist.train.precision``; fp32 for a
            model nobody measured); ``channels_last`` may be a module's path, where channels_last starts.
    """

    name: str
    factory: Callable[..., nn.Module]
    options: type = NoOptions
    task: Task = REGRESSION
    recipes: dict = field(default_factory=dict)
    channels: tuple[int, ...] = (1,)
    paper: dict = field(default_factory=dict)
    paper_weight: float = 0.0
    cpu_precision: tuple[str, bool | str] = ("fp32", False)
    listed: bool = True  # in list_models() (and so in every default model list); False for models made on demand

    @property
    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]

    @property
    def pretrained(self) -> bool:
        """Whether it takes ImageNet backbone weights (``--pretrained``); else it trains from scratch."""
        return "pretrained" in self.option_names

    @property
    def presets(self) -> list[str]:
        return list(self.recipes)

    def recipe(self, preset: str) -> dict:
        if preset not in self.recipes:
            raise BonedistError(f"model {self.name} has no recipe for preset {preset!r}; its presets: "
                                f"{', '.join(self.recipes) or 'none'}")
        return self.recipes[preset]()

    def build_options(self, values: dict | None = None):
        """Its typed options from ``values`` (unknown names and bad values are one line naming the model)."""
        opts = build(self.options, dict(values or {}), f"model {self.name}")
        try:
            check_fields(opts)
        except BonedistError as exc:
            raise BonedistError(f"model {self.name}: {exc}") from exc
        return opts

    def without_weights(self, values: dict) -> dict:
        """Options to rebuild a trained model: its weights come from the checkpoint, never from the hub."""
        return {**values, "pretrained": None} if self.pretrained else dict(values)

    def input_channels(self, requested: int | None) -> int:
        if requested is None:
            return self.channels[0]
        if requested not in self.channels:
            raise BonedistError(f"--channels {requested}: {self.name} takes {' or '.join(map(str, self.channels))}")
        return requested


_MODELS: dict[str, ModelInfo] = {}  # in registration order: the order of every table and script
_RESOLVERS: list[Callable[[str], bool]] = []  # register a model on first use of its name (``timm/ARCH``)


def add_resolver(resolve: Callable[[str], bool]) -> None:
    """``resolve(name)`` registers the model ``name`` and returns True, or returns False for names not its own."""
    _RESOLVERS.append(resolve)


def register_model(fn: Callable[..., nn.Module] | None = None, **info):
    """Register a factory under its function name: ``@register_model(options=..., recipes=..., ...)``, the
    keywords being ``ModelInfo``'s fields."""

    def register(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = factory.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = ModelInfo(name, factory, **info)
        return factory

    return register(fn) if fn is not None else register


def unregister_model(name: str) -> None:
    _MODELS.pop(name, None)


def list_models(preset: str | None = None) -> list[str]:
    """The registered models in registration order (only those with a recipe for ``preset`` when given)."""
    return [name for name, info in _MODELS.items() if info.listed and (preset is None or preset in info.recipes)]


def default_models(preset: str) -> dict[str, float]:
    """The models a preset trains when none are named (``bench accuracy``, ``bonedist models --preset``), each with
    its relative share of a time budget per run: the preset's own list (``register_preset(models=...)``, chosen by
    measurement, see ``docs/results.md``), or, without one, every model with a recipe for it at equal shares."""
    return {name: share for name, (share, _) in default_roster(preset).items()}


def default_roster(preset: str) -> dict[str, tuple[float, int]]:
    """``default_models`` with each model's number of runs (seed replicas, ``replica_run``)."""
    from bonedist.train.presets import DEFAULT_MODELS

    if preset not in DEFAULT_MODELS:
        return {name: (1.0, 1) for name in list_models(preset)}
    for name in DEFAULT_MODELS[preset]:
        if preset not in model_info(name).recipes:
            raise BonedistError(f"preset {preset!r} lists {name} among its default models, which has no recipe for it")
    return {name: _roster_entry(value) for name, value in DEFAULT_MODELS[preset].items()}


def _roster_entry(value) -> tuple[float, int]:
    share, replicas = value if isinstance(value, (tuple, list)) else (value, 1)
    return float(share), int(replicas)


REPLICA_SEED_STEP = 1000  # replica k of a run seeded s is seeded s + 1000 k: apart from `bench --seeds 0,1,...`


def replica_run(model: str, replica: int, seed: int = 0) -> tuple[str, int]:
    """The run name and seed of a model's ``replica``-th run (0: the model's own run, named as the model): another
    seed of the same model, a separate row and ensemble member (``resnet18``, ``resnet18-2``, ``resnet18-3``)."""
    if replica < 0:
        raise BonedistError(f"replica {replica}: 0 or more")
    if replica == 0:
        return model, seed
    return f"{model.replace('/', '-')}-{replica + 1}", seed + REPLICA_SEED_STEP * replica


def model_info(name: str) -> ModelInfo:
    if name not in _MODELS and not any(resolve(name) for resolve in _RESOLVERS):
        raise BonedistError(f"unknown model {name!r}; known models: {', '.join(list_models())}, or timm/ARCH for "
                            f"any timm architecture")
    return _MODELS[name]


def is_model(name: str) -> bool:
    try:
        model_info(name)
    except BonedistError:
        return False
    return True


def create_model(name: str, inputs: InputConfig | dict | None = None, spec: InputSpec | None = None,
                 **options) -> nn.Module:
    """Build a registered model with its ``options``; ``model.spec`` is ``inputs`` resolved against it (or the
    given ``spec`` of a trained run). Unknown names and options raise with what is known."""
    info = model_info(name)
    opts = info.build_options(options)
    if not isinstance(inputs, InputConfig):
        inputs = build(InputConfig, dict(inputs or {}), "the input")
    channels = spec.channels if spec is not None else info.input_channels(inputs.channels)
    try:
        model = info.factory(opts, channels)
    except ValueError as exc:  # option values checked by the model itself
        raise BonedistError(f"model {name!r}: {exc}") from exc
    model.spec = spec or InputSpec.resolve(inputs, channels, getattr(model, "input_norm", None),
                                           getattr(model, "min_input_size", 0))
    if getattr(model, "task", None) is None:  # a factory may derive its task from the options (an age head's labels)
        model.task = info.task
    return model
