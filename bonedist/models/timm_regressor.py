"""Any timm architecture as a bone-age regressor with the same sex input and head conventions as the models built
on it here: the backbone's pooled features (layer-normalised with ``feature_norm``), concatenated with an encoded
sex (Dense(32, sigmoid)), through Dense(``head_width``, ReLU) to one z value.

    bonedist train --model timm/regnety_004 --shards shards/rsna --preset scratch
    bonedist train --model timm/convnext_nano --shards shards/rsna --preset improved --pretrained default

``timm/ARCH`` models are registered on first use (``models.registry.model_info``), with the recipes of a modern
regressor (``modern_recipes``); ``efficientnet.py`` and ``resnet.py`` register named ones with their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
from torch import nn

from bonedist import BonedistError
from bonedist.models.registry import add_resolver, register_model
from bonedist.models.regressor import MODEL, BackboneOptions, SexImageRegressor, mlp, sigmoid_sex_encoder
from bonedist.options import option

PREFIX = "timm/"


@dataclass
class TimmOptions(BackboneOptions):
    """A modern regressor: trained end to end (nothing frozen) unless asked."""

    freeze_backbone: bool = option(False, "freeze the backbone", group=MODEL, flag="--freeze")
    head_width: int = option(256, "units of the head's hidden Dense layer", group=MODEL, minimum=1)
    drop_path: float = option(0.0, "stochastic depth of the backbone's blocks (timm's drop_path_rate)",
                              group=MODEL, minimum=0, maximum=1)


def timm_regressor(arch: str, opts: TimmOptions, in_chans: int) -> SexImageRegressor:
    backbone_kw = {"drop_path_rate": opts.drop_path} if opts.drop_path else {}
    return SexImageRegressor(arch, lambda features: mlp([features + 32, opts.head_width, 1], nn.ReLU),
                             sigmoid_sex_encoder(), opts, in_chans, **backbone_kw)


def modern_recipes(scratch: dict | None = None, improved: dict | None = None, tiny: dict | None = None,
                   cpu_fast: dict | None = None) -> dict:
    """The presets of a regressor that is not in the paper (no ``paper`` recipe): ``scratch`` from random weights on
    1-channel radiographs, ``improved`` fine-tuned from ImageNet, ``tiny`` for CPU tests."""

    def merged(base: dict, extra: dict | None):
        def make() -> dict:
            out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
            for key, value in (extra or {}).items():
                out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
            return out

        return make

    scratch_base = {"model": {"pretrained": None}, "input": {"channels": 1}}
    return {"improved": merged({"model": {"pretrained": "default"}, "backbone_lr": 1e-4}, improved),
            "scratch": merged(scratch_base, scratch),
            "tiny": merged(scratch_base, tiny)}


def _resolve(name: str) -> bool:
    """Register ``timm/ARCH`` on first use, for an architecture timm knows; False for other names."""
    if not name.startswith(PREFIX):
        return False
    arch = name[len(PREFIX):]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise BonedistError(f"unknown model {name!r}: timm has no architecture {arch!r}"
                            + (f" (similar: {', '.join(close)})" if close else ""))

    def factory(opts: TimmOptions, in_chans: int) -> SexImageRegressor:
        return timm_regressor(arch, opts, in_chans)

    factory.__name__ = name
    register_model(factory, options=TimmOptions, channels=(1, 3), recipes=modern_recipes(), listed=False)
    return True


add_resolver(_resolve)
