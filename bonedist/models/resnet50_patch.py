"""ResNet50 on patches with a sex input, as the paper trains it (Table 3), and the second RSNA 2017 team's setting.

The patches are input settings (``--patch-size``/``--patch-share``, ``--num-patches``, ``--eval-grid``): training
draws ``num_patches`` random patches per radiograph (centred on the hand with ``--hand-mask``), evaluation averages
(or takes the median of) an overlapping grid. The model itself is a plain regressor with one prediction per patch.
"""

from __future__ import annotations

from bonedist.models.recipes import BF16_CL, BackboneOptions, imagenet_recipes
from bonedist.models.registry import register_model

PAPER_PATCH = 224 / 500  # the paper's 224-px patches of 500-px radiographs, as a share of the side


@register_model(options=BackboneOptions, channels=(3, 1), paper={"resnet50_patch": (0.06, 0.24, 0.97)},
                paper_weight=0.5, cpu_precision=BF16_CL, recipes=imagenet_recipes(
                    paper={"input": {"patch_share": PAPER_PATCH, "num_patches": 3}},
                    # the second-place team: 49 patches of 224 px, the 7 x 7 grid, the median
                    improved={"input": {"patch_share": PAPER_PATCH, "num_patches": 49, "eval_grid": 7},
                              "batch_size": 8, "patch_aggregate": "median"},
                    scratch={"input": {"patch_share": 0.5, "num_patches": 4, "eval_grid": 3}},
                    tiny={"input": {"patch_share": 0.75, "num_patches": 3}}))
def resnet50_patch(opts: BackboneOptions, in_chans: int):
    """ResNet50 on P x P patches: concat raw sex; Dense(14, ReLU); Dense(1). ``feature_norm``: as for ``xception``
    (the Dense(14, ReLU) head dies the same way)."""
    from torch import nn

    from bonedist.models.regressor import SexImageRegressor, mlp

    return SexImageRegressor("resnet50", mlp([2048 + 1, 14, 1], nn.ReLU), None, opts, in_chans)
