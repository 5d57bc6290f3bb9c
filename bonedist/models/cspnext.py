"""CSPNeXt regressors with a sex input: RTMDet's backbone (Lyu et al. 2022; timm's ``cspnext_*``: cross-stage-partial
stages of 3x3 and large-kernel 5x5 depthwise convolutions with channel attention, SiLU, BatchNorm), trained from
random weights.

On this project's 2-core CPU at 100 px the tiny one learned the most per CPU-minute of the architectures measured:
12.05 months on 1,200 held-out real radiographs after 10 minutes (ResNet-18: 18.81), 10.36 after 20 (README section
7), at about 210 radiographs/s in bf16 with channels_last. In ``scratch`` the tiny one trains on hand-masked
radiographs (all but the hand zeroed: 10.38 after 20 minutes) and the small one on whole ones (10.42): the default
list's members see different inputs, and their errors correlated 0.78-0.82 where the same three networks on one
kind of input correlated up to 0.86; the three members' mean was 0.94x the best of them (README section 7).
"""

from __future__ import annotations

from bonedist.models.registry import register_model
from bonedist.models.timm_regressor import TimmOptions, modern_recipes, timm_regressor

CPU_PRECISION = ("bf16", True)  # 1.3x fp32 eager at 100 px (its 1x1 and 3x3 convolutions carry most of the work)
# 60 epochs (warmup 30 %, as scratch's 9 of 30): at ~0.75 min per 100-px epoch on 2 cores, 30 would end a 30-minute
# share after 23 minutes; with a time budget the cosine follows the clock, so the budget decides
RECIPES = modern_recipes(scratch={"epochs": 60, "warmup_epochs": 18.0})
# the default list's hand-masked member: a different input for a less alike ensemble member (masks computed once per
# cached split, so it keeps its unmasked speed)
MASKED = modern_recipes(scratch={"epochs": 60, "warmup_epochs": 18.0, "input": {"hand_mask": True}})


@register_model(options=TimmOptions, channels=(1, 3), cpu_precision=CPU_PRECISION, recipes=MASKED,
                roster={"scratch": 1.0})
def cspnext_tiny(opts: TimmOptions, in_chans: int):
    """CSPNeXt-tiny (2.3 M parameters, 384 features) → sex-aware head."""
    return timm_regressor("cspnext_tiny", opts, in_chans)


@register_model(options=TimmOptions, channels=(1, 3), cpu_precision=CPU_PRECISION, recipes=RECIPES,
                roster={"scratch": 1.0})
def cspnext_s(opts: TimmOptions, in_chans: int):
    """CSPNeXt-s (4.4 M parameters, 512 features) → sex-aware head."""
    return timm_regressor("cspnext_s", opts, in_chans)
