"""Xception with a sex input, as the paper trains it (Table 3: 20,885 trainable parameters on a frozen backbone)."""

from __future__ import annotations

from bonedist.models.recipes import BF16_CL, BackboneOptions, imagenet_recipes
from bonedist.models.registry import register_model


@register_model(options=BackboneOptions, channels=(3, 1), paper={"xception": (0.18, 0.42, 0.91)}, paper_weight=0.1,
                recipes=imagenet_recipes(), cpu_precision=BF16_CL)
def xception(opts: BackboneOptions, in_chans: int):
    """sex -> Dense(32, sigmoid); concat; Dense(10, ReLU); Dense(1).

    ``feature_norm`` (not in the paper; no parameters) layer-normalises the pooled features before the head. The
    features of a ReLU backbone are all >= 0, so every weight of a head unit gets a gradient of the same sign and
    Adam moves them together: with a backbone that trains, the whole Dense(10, ReLU) layer died within 80 steps on
    real radiographs (every unit negative for every input, the output a constant); centred features keep it alive.
    """
    from torch import nn

    from bonedist.models.regressor import SexImageRegressor, mlp, sigmoid_sex_encoder

    head = mlp([2048 + 32, 10, 1], nn.ReLU)
    return SexImageRegressor("legacy_xception", head, sigmoid_sex_encoder(), opts, in_chans)
