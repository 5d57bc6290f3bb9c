"""EfficientNet regressors with a sex input, as Deeplasia (Rassmann et al. 2023; MAE 3.87 months on the RSNA test)
trains two of its three models: without ImageNet weights, on hand-masked radiographs, L1 on z, each model's bias
corrected by a fitted line (``--calibration linear``). B0 for CPUs and short runs, B4 for GPUs."""

from __future__ import annotations

from bonedist.models.registry import register_model
from bonedist.models.timm_regressor import TimmOptions, modern_recipes, timm_regressor

# Depthwise convolutions: bf16 autocast is slower than fp32 on AMX CPUs here (0.80-1.08x), channels_last helps
# (1.34x at 100 px, 1.47x at 64 px; `bonedist bench train-step`).
CPU_PRECISION = ("fp32", True)


# the tiny preset's 1e-3 left it at 0.80x the mean after 4 phantom epochs; 3e-3 reached 0.54x
@register_model(options=TimmOptions, channels=(1, 3), cpu_precision=CPU_PRECISION,
                recipes=modern_recipes(tiny={"lr": 3e-3}))
def efficientnet_b0(opts: TimmOptions, in_chans: int):
    """EfficientNet-B0 (4.0 M parameters, 1,280 features) → sex-aware head."""
    return timm_regressor("efficientnet_b0", opts, in_chans)
