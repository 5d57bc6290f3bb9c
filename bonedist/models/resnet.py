"""A plain ResNet-18 regressor with a sex input: the yardstick's network, and a cheap step per image beside Xception
(``docs/results.md`` compares them). Deeper ResNets: ``--model timm/resnet34`` and so on."""

from __future__ import annotations

from bonedist.models.recipes import TimmOptions, modern_recipes
from bonedist.models.registry import register_model
from bonedist.models.timm_regressor import timm_regressor

CPU_PRECISION = ("bf16", True)  # the faster choice in `bonedist bench train-step` (docs/results.md, "Speed")


@register_model(options=TimmOptions, channels=(1, 3), cpu_precision=CPU_PRECISION, recipes=modern_recipes())
def resnet18(opts: TimmOptions, in_chans: int):
    """ResNet-18 (11.2 M parameters, 512 features) → sex-aware head."""
    return timm_regressor("resnet18", opts, in_chans)

