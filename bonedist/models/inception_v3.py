"""InceptionV3 with a sex input: the RSNA 2017 winner's layout, as the paper trains it (Table 3)."""

from __future__ import annotations

from dataclasses import dataclass

from bonedist.models.recipes import BF16_CL, MODEL, BackboneOptions, imagenet_recipes
from bonedist.models.registry import register_model
from bonedist.options import option

INCEPTION_MIN_SIZE = 75  # the smallest input timm's (and Keras') InceptionV3 stem accepts


@dataclass
class InceptionOptions(BackboneOptions):
    drop_rate: float = option(0.5, "dropout of the head's hidden layers", group=MODEL, minimum=0,
                              maximum=1)


@register_model(options=InceptionOptions, channels=(3, 1), paper={"inception_v3": (0.19, 0.44, 0.89)},
                paper_weight=0.1, cpu_precision=BF16_CL, recipes=imagenet_recipes(tiny={"input": {"image_size": 96}}))
def inception_v3(opts: InceptionOptions, in_chans: int):
    """sex -> Dense(32, sigmoid); concat; Dense(1000, tanh) x2 with dropout; Dense(1).

    Inception's stem needs at least 75 px: smaller radiographs are resized up to that by the input pipeline.
    """
    from torch import nn

    from bonedist.models.regressor import SexImageRegressor, mlp, sigmoid_sex_encoder

    head = mlp([2048 + 32, 1000, 1000, 1], nn.Tanh, opts.drop_rate)
    return SexImageRegressor("inception_v3", head, sigmoid_sex_encoder(), opts, in_chans,
                             min_input_size=INCEPTION_MIN_SIZE)
