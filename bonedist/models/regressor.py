"""What the sex-input regressors share: a timm backbone with global average pooling, an encoded sex, a dense head to
one z value (their options and recipes are in ``recipes.py``, which needs no torch).

Every model: ``forward(image, male) -> {"pred": (B,)}`` in z units (z = (age - mu) / sigma); ``male`` is a float
(B,) tensor, 1 for boys and 0 for girls. A model file (``xception.py``) adds its head, its options and its recipes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bonedist.models.backbones import create_backbone
from bonedist.models.recipes import BackboneOptions


class BoneAgeModel(nn.Module):
    """Shared plumbing: a backbone that can be frozen (kept in eval mode, as Keras does) and parameter groups."""

    def __init__(self, backbone: nn.Module, freeze_backbone: bool):
        super().__init__()
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen BatchNorm statistics, like a Keras layer with trainable=False
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in backbone]

    def param_groups(self, lr: float, backbone_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups: the head at ``lr``, an unfrozen backbone at ``backbone_lr`` (default ``lr``)."""
        groups = [{"params": self.head_parameters(), "lr": lr, "weight_decay": weight_decay, "name": "head"}]
        if self.backbone_parameters():
            groups.append({"params": self.backbone_parameters(), "lr": backbone_lr if backbone_lr is not None else lr,
                           "weight_decay": weight_decay, "name": "backbone"})
        return groups


class SexImageRegressor(BoneAgeModel):
    """GAP features of a backbone, concatenated with an encoded sex, through a dense head to one z value.

    ``head``: the head, or a function of the backbone's feature count that builds it.
    """

    def __init__(self, arch: str, head: nn.Module | Callable[[int], nn.Module], sex_encoder: nn.Module | None,
                 opts: BackboneOptions, in_chans: int, min_input_size: int = 0, **backbone_kw):
        super().__init__(create_backbone(arch, opts.pretrained, in_chans=in_chans, **backbone_kw),
                         opts.freeze_backbone)
        self.sex_encoder = sex_encoder
        # what the pooled backbone returns: timm's head_hidden_size where a pre-logits layer follows the pooling
        # (MobileNetV3/V4, HGNetV2, LCNet), else num_features
        features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = head if isinstance(head, nn.Module) else head(features)
        self.feature_norm = opts.feature_norm
        self.min_input_size = min_input_size
        cfg = self.backbone.pretrained_cfg
        mean, std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
        if in_chans == 1:  # a grayscale stem summed from RGB filters sees the mean of the RGB statistics
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        self.input_norm = (mean, std)

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(image)  # (B, F) after global average pooling
        if self.feature_norm:
            features = F.layer_norm(features, features.shape[1:])
        sex = male.to(features.dtype).view(-1, 1)  # (B, 1)
        if self.sex_encoder is not None:
            sex = self.sex_encoder(sex)  # (B, 32)
        out = self.head(torch.cat([features, sex], dim=1))
        return out if isinstance(out, dict) else {"pred": out.squeeze(1)}  # a dict: an age-distribution head


def mlp(sizes: list[int], act: type[nn.Module], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def sigmoid_sex_encoder() -> nn.Sequential:
    """The paper's sex branch: Dense(32, sigmoid)."""
    return nn.Sequential(nn.Linear(1, 32), nn.Sigmoid())
