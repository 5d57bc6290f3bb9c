"""Any timm architecture as a bone-age regressor with the same sex input and head conventions as the models built
on it here: the backbone's pooled features (layer-normalised with ``feature_norm``), concatenated with an encoded
sex (Dense(32, sigmoid)), through Dense(``head_width``, ReLU) to one z value, or with ``--age-bins N`` to a
distribution over N age bins whose mean is the prediction (``age_bins.py``).

    bonedist train --model timm/regnety_004 --shards shards/rsna --preset scratch
    bonedist train --model timm/convnext_nano --shards shards/rsna --preset improved --pretrained default

``timm/ARCH`` models are registered on first use (``models.registry.model_info``), with the recipes of a modern
regressor (``modern_recipes``); ``efficientnet.py`` and ``resnet.py`` register named ones with their own.
"""

from __future__ import annotations

from bonedist import BonedistError
from bonedist.models.recipes import TimmOptions, modern_recipes
from bonedist.models.registry import add_resolver, register_model

PREFIX = "timm/"


def timm_regressor(arch: str, opts: TimmOptions, in_chans: int):
    """A ``SexImageRegressor`` on timm's ``arch`` (torch and timm imported here, when a model is built)."""
    from torch import nn

    from bonedist.models.age_bins import AgeBinsHead
    from bonedist.models.regressor import SexImageRegressor, mlp, sigmoid_sex_encoder
    from bonedist.models.task import Task

    def head(features: int) -> nn.Module:
        layers = mlp([features + 32, opts.head_width, opts.age_bins or 1], nn.ReLU)
        return AgeBinsHead(layers, opts.age_bins) if opts.age_bins else layers

    backbone_kw = {"drop_path_rate": opts.drop_path} if opts.drop_path else {}
    model = SexImageRegressor(arch, head, sigmoid_sex_encoder(), opts, in_chans, **backbone_kw)
    if opts.age_bins:  # the soft labels' width is the loss's, which the task computes
        model.task = Task(label_sigma_z=opts.age_sigma)
    return model


def _resolve(name: str) -> bool:
    """Register ``timm/ARCH`` on first use, for an architecture timm knows; False for other names."""
    if not name.startswith(PREFIX):
        return False
    import timm

    arch = name[len(PREFIX):]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise BonedistError(f"unknown model {name!r}: timm has no architecture {arch!r}"
                            + (f" (similar: {', '.join(close)})" if close else ""))

    def factory(opts: TimmOptions, in_chans: int):
        return timm_regressor(arch, opts, in_chans)

    factory.__name__ = name
    register_model(factory, options=TimmOptions, channels=(1, 3), recipes=modern_recipes(), listed=False)
    return True


add_resolver(_resolve)
