"""Optimizers as registered components: ``--optimizer NAME`` → a torch optimizer over the model's parameter groups
(a backbone at its own learning rate, one group per AG-CNN branch, ...). A new optimizer is one entry here and its
name in ``bonedist.choices.OPTIMIZERS``."""

from __future__ import annotations

import torch
from torch import nn

from bonedist.choices import OPTIMIZERS as OPTIMIZER_NAMES

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES, "bonedist.choices.OPTIMIZERS names every optimizer here"


def param_groups(model: nn.Module, lr: float, backbone_lr: float | None, weight_decay: float) -> list[dict]:
    """The model's own groups when it has them (``param_groups``), else one group of every trainable parameter."""
    if hasattr(model, "param_groups"):
        return model.param_groups(lr, backbone_lr, weight_decay)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay,
             "name": "all"}]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer, fused: one kernel over all parameters per step, where PyTorch's default on a CPU loops over
    them tensor by tensor (the same update; bench train-loop times the optimizer's share of a step)."""
    groups = param_groups(model, cfg.lr, cfg.backbone_lr, cfg.weight_decay)
    return OPTIMIZERS[cfg.optimizer](groups, lr=cfg.lr, fused=True)
