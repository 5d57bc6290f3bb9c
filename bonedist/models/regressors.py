"""The paper's three ImageNet-backbone regressors with a sex input (Table 3), exact to its parameter counts.

Every model: ``forward(image, male) -> {"pred": (B,)}`` in z units (z = (age - mu) / sigma); ``male`` is a float
(B,) tensor, 1 for boys and 0 for girls.
"""

from __future__ import annotations

import torch
from torch import nn

from bonedist.models.backbones import create_backbone
from bonedist.models.registry import register_model
from bonedist.models.spec import InputSpec


class BoneAgeModel(nn.Module):
    """Shared plumbing: a backbone that can be frozen (kept in eval mode, as Keras does) and parameter groups."""

    spec: InputSpec
    task: str = "regression"

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


def _spec_from_backbone(backbone: nn.Module, image_size: int, input_size: int, in_chans: int, **kw) -> InputSpec:
    cfg = backbone.pretrained_cfg
    mean, std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
    if in_chans == 1:  # a grayscale stem summed from RGB filters sees the mean of the RGB statistics
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return InputSpec(image_size=image_size, input_size=input_size, channels=in_chans, mean=mean, std=std, **kw)


class SexImageRegressor(BoneAgeModel):
    """GAP features of a backbone, concatenated with an encoded sex, through a dense head to one z value."""

    def __init__(self, arch: str, head: nn.Module, sex_encoder: nn.Module | None, image_size: int, input_size: int,
                 pretrained: str | None, freeze_backbone: bool, in_chans: int, **spec_kw):
        super().__init__(create_backbone(arch, pretrained, in_chans=in_chans), freeze_backbone)
        self.sex_encoder = sex_encoder
        self.head = head
        self.spec = _spec_from_backbone(self.backbone, image_size, input_size, in_chans, **spec_kw)

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(image)  # (B, 2048) after global average pooling
        sex = male.to(features.dtype).view(-1, 1)  # (B, 1)
        if self.sex_encoder is not None:
            sex = self.sex_encoder(sex)  # (B, 32)
        return {"pred": self.head(torch.cat([features, sex], dim=1)).squeeze(1)}


def _mlp(sizes: list[int], act: type[nn.Module], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


@register_model
def inception_v3(pretrained: str | None = None, freeze_backbone: bool = True, image_size: int = 500,
                 in_chans: int = 3, drop_rate: float = 0.5, hand_mask: bool = False) -> SexImageRegressor:
    """RSNA 2017 winner's layout: sex -> Dense(32, sigmoid); concat; Dense(1000, tanh) x2 with dropout; Dense(1)."""
    sex = nn.Sequential(nn.Linear(1, 32), nn.Sigmoid())
    head = _mlp([2048 + 32, 1000, 1000, 1], nn.Tanh, drop_rate)
    return SexImageRegressor("inception_v3", head, sex, image_size, image_size, pretrained, freeze_backbone, in_chans,
                             hand_mask=hand_mask)


@register_model
def xception(pretrained: str | None = None, freeze_backbone: bool = True, image_size: int = 500,
             in_chans: int = 3, hand_mask: bool = False) -> SexImageRegressor:
    """The paper's Xception: sex -> Dense(32, sigmoid); concat; Dense(10, ReLU); Dense(1)."""
    sex = nn.Sequential(nn.Linear(1, 32), nn.Sigmoid())
    head = _mlp([2048 + 32, 10, 1], nn.ReLU)
    return SexImageRegressor("legacy_xception", head, sex, image_size, image_size, pretrained, freeze_backbone,
                             in_chans, hand_mask=hand_mask)


@register_model
def resnet50_patch(pretrained: str | None = None, freeze_backbone: bool = True, image_size: int = 500,
                   patch_size: int = 224, num_patches: int = 3, eval_grid: int | None = None,
                   in_chans: int = 3, hand_mask: bool = False) -> SexImageRegressor:
    """ResNet50 on P x P patches: concat raw sex; Dense(14, ReLU); Dense(1). One prediction per patch.

    Training draws ``num_patches`` random patches per radiograph; evaluation averages an overlapping
    ``eval_grid`` x ``eval_grid`` grid (default: just enough patches per side to overlap and cover the image).
    With ``hand_mask`` the patches are cut from the masked radiograph (background patches are black).
    """
    head = _mlp([2048 + 1, 14, 1], nn.ReLU)
    return SexImageRegressor("resnet50", head, None, image_size, patch_size, pretrained, freeze_backbone, in_chans,
                             num_patches=num_patches, eval_grid=eval_grid, hand_mask=hand_mask)
