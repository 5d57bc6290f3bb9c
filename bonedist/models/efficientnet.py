"""EfficientNet regressors with a sex input, as Deeplasia (Rassmann et al. 2023)
trains two of its three models: without ImageNet weights, on hand-masked radiographs, L1 on z, each model's bias
corrected by a fitted line (``--calibration linear``). B0 for CPUs and short runs, B4 for GPUs."""

from __future__ import annotations

from bonedist.models.recipes import TimmOptions, modern_recipes
from bonedist.models.registry import register_model
from bonedist.models.timm_regressor import timm_regressor

# Depthwise convolutions: bf16 autocast is slower than fp32 on CPUs with bf16 units, channels_last helps
# (`bonedist bench train-step`; docs/results.md, "Speed").
CPU_PRECISION = ("fp32", True)


# the tiny preset's learning rate is raised for it: at 1e-3 it barely left the mean in a few phantom epochs
@register_model(options=TimmOptions, channels=(1, 3), cpu_precision=CPU_PRECISION,
                recipes=modern_recipes(tiny={"lr": 3e-3}))
def efficientnet_b0(opts: TimmOptions, in_chans: int):
    """EfficientNet-B0 (4.0 M parameters, 1,280 features) → sex-aware head."""
    return timm_regressor("efficientnet_b0", opts, in_chans)
