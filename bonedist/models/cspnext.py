"""CSPNeXt regressors with a sex input: RTMDet's backbone (Lyu et al. 2022; timm's ``cspnext_*``: cross-stage-partial
stages of 3x3 and large-kernel 5x5 depthwise convolutions with channel attention, SiLU, BatchNorm), trained from
random weights.

Why the tiny one is ``scratch``'s default: on a CPU at 100 px it learned the most per CPU-minute of the
architectures screened, and alone with the whole budget it beat an ensemble of three sharing it. In ``scratch`` it
trains on hand-masked radiographs (all but the hand zeroed), predicting a distribution over age bins
(``age_bins.py``), and the small one on whole ones, so that as ensemble
members they see different inputs and their errors correlate less. The measurements behind these choices are in
``docs/results.md`` ("Accuracy on real radiographs").
"""

from __future__ import annotations

from bonedist.models.recipes import TimmOptions, modern_recipes
from bonedist.models.registry import register_model
from bonedist.models.timm_regressor import timm_regressor

CPU_PRECISION = ("bf16", True)  # its 1x1 and 3x3 convolutions carry most of the work (bench train-step)
# the tiny one's stem and first two stages have 12-48 channels over 50x50 and 25x25 maps, where BatchNorm's backward
# pass is several times slower channels_last than NCHW on a CPU: channels_last from the third stage on (bench
# train-step: faster than channels_last throughout; not so for the small one, whose maps are wider)
TINY_CPU_PRECISION = ("bf16", "backbone.stages.2")
# 100 epochs (warmup 30 %, as scratch's 9 of 30): more than a CPU budget holds, even a whole hour on a fast day (60
# ended a 60-minute run after 45-54 minutes), so that with a time budget the clock, which warmup and cosine follow,
# decides where training ends rather than the epoch count; a run the clock ends has the same schedule either way
RECIPES = modern_recipes(scratch={"epochs": 100, "warmup_epochs": 30.0})
# hand-masked: the default's input, and a different input from the whole-radiograph models for a less alike ensemble
# member (masks computed once per cached split, so it keeps its unmasked speed); with an age-distribution head of 65
# bins (an eighth of the ages' standard deviation each), which won bench compare on both seeds (docs/results.md)
MASKED = modern_recipes(scratch={"epochs": 100, "warmup_epochs": 30.0, "input": {"hand_mask": True},
                                 "model": {"age_bins": 65}})


@register_model(options=TimmOptions, channels=(1, 3), cpu_precision=TINY_CPU_PRECISION, recipes=MASKED)
def cspnext_tiny(opts: TimmOptions, in_chans: int):
    """CSPNeXt-tiny (2.3 M parameters, 384 features) → sex-aware head."""
    return timm_regressor("cspnext_tiny", opts, in_chans)


@register_model(options=TimmOptions, channels=(1, 3), cpu_precision=CPU_PRECISION, recipes=RECIPES)
def cspnext_s(opts: TimmOptions, in_chans: int):
    """CSPNeXt-s (4.4 M parameters, 512 features) → sex-aware head."""
    return timm_regressor("cspnext_s", opts, in_chans)
