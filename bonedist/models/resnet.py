"""A plain ResNet-18 regressor with a sex input: the yardstick's network (a ResNet-18 step costs about a third of an
Xception step per image; at 100 px on 2 CPU cores CSPNeXt-tiny learns about 1.5x as fast per minute, README section
7). Deeper ResNets: ``--model timm/resnet34`` and so on."""

from __future__ import annotations

from bonedist.models.registry import register_model
from bonedist.models.timm_regressor import TimmOptions, modern_recipes, timm_regressor

CPU_PRECISION = ("bf16", True)  # 1.98x fp32 eager at 100 px on 2 AMX cores (`bonedist bench train-step`)


@register_model(options=TimmOptions, channels=(1, 3), cpu_precision=CPU_PRECISION, recipes=modern_recipes())
def resnet18(opts: TimmOptions, in_chans: int):
    """ResNet-18 (11.2 M parameters, 512 features) → sex-aware head."""
    return timm_regressor("resnet18", opts, in_chans)

