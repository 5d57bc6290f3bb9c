"""CSPDarkNet regressors with a sex input: the cross-stage-partial DarkNet of YOLOv5 (timm's ``cs3darknet_*``: SiLU,
BatchNorm, each stage's blocks on half of its channels), trained from random weights.

Why it has a ``scratch`` recipe: on a CPU at 100 px the small one learns bone age faster per CPU-minute than
ResNet-18, at about a third of its FLOPs per radiograph. In ``scratch`` it trains on whole radiographs, an ensemble
partner for the hand-masked CSPNeXt-tiny (it was in the default list until one model with the whole budget beat the
three sharing it). The measurements are in ``docs/results.md``.
"""

from __future__ import annotations

from bonedist.models.recipes import TimmOptions, modern_recipes
from bonedist.models.registry import register_model
from bonedist.models.timm_regressor import timm_regressor

CPU_PRECISION = ("bf16", True)  # dense 3x3 and 1x1 convolutions: bf16 autocast + channels_last (bench train-step)
# 100 epochs (warmup 30 %): a time budget, not the epoch count, ends a CPU run (as cspnext's)
RECIPES = modern_recipes(scratch={"epochs": 100, "warmup_epochs": 30.0})


@register_model(options=TimmOptions, channels=(1, 3), cpu_precision=CPU_PRECISION, recipes=RECIPES)
def cs3darknet_s(opts: TimmOptions, in_chans: int):
    """CSPDarkNet-S (2.8 M parameters, 512 features) → sex-aware head."""
    return timm_regressor("cs3darknet_s", opts, in_chans)
