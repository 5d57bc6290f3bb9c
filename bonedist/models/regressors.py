"""The paper's three ImageNet-backbone regressors with a sex input (Table 3), exact to its parameter counts.

Every model: ``forward(image, male) -> {"pred": (B,)}`` in z units (z = (age - mu) / sigma); ``male`` is a float
(B,) tensor, 1 for boys and 0 for girls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bonedist.models.backbones import create_backbone
from bonedist.models.registry import register_model
from bonedist.spec import InputSpec

INCEPTION_MIN_SIZE = 75  # the smallest input timm's (and Keras') InceptionV3 stem accepts


class BoneAgeModel(nn.Module):
    """Shared plumbing: a backbone that can be frozen (kept in eval mode, as Keras does) and parameter groups."""

    spec: InputSpec

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
                 pretrained: str | None, freeze_backbone: bool, in_chans: int, feature_norm: bool = False,
                 **spec_kw):
        super().__init__(create_backbone(arch, pretrained, in_chans=in_chans), freeze_backbone)
        self.sex_encoder = sex_encoder
        self.head = head
        self.feature_norm = feature_norm
        self.spec = _spec_from_backbone(self.backbone, image_size, input_size, in_chans, **spec_kw)

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(image)  # (B, 2048) after global average pooling
        if self.feature_norm:
            features = F.layer_norm(features, features.shape[1:])
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


# paper: the paper's Tables 6-7 (MSE z, RMSE z, P); paper_weight: its ensemble (VI-D)
@register_model(paper={"inception_v3": (0.19, 0.44, 0.89)}, paper_weight=0.1)
def inception_v3(pretrained: str | None = None, freeze_backbone: bool = True, image_size: int = 500,
                 in_chans: int = 3, drop_rate: float = 0.5, hand_mask: bool = False,
                 feature_norm: bool = False, contrast: str = "none") -> SexImageRegressor:
    """RSNA 2017 winner's layout: sex -> Dense(32, sigmoid); concat; Dense(1000, tanh) x2 with dropout; Dense(1).

    Inception's stem needs at least 75 px: smaller radiographs are resized up to that by the input pipeline.
    """
    sex = nn.Sequential(nn.Linear(1, 32), nn.Sigmoid())
    head = _mlp([2048 + 32, 1000, 1000, 1], nn.Tanh, drop_rate)
    size = max(image_size, INCEPTION_MIN_SIZE)
    return SexImageRegressor("inception_v3", head, sex, size, size, pretrained, freeze_backbone, in_chans,
                             feature_norm, hand_mask=hand_mask, contrast=contrast)


@register_model(paper={"xception": (0.18, 0.42, 0.91)}, paper_weight=0.1)
def xception(pretrained: str | None = None, freeze_backbone: bool = True, image_size: int = 500,
             in_chans: int = 3, hand_mask: bool = False, feature_norm: bool = False,
             contrast: str = "none") -> SexImageRegressor:
    """The paper's Xception: sex -> Dense(32, sigmoid); concat; Dense(10, ReLU); Dense(1).

    ``feature_norm`` (not in the paper; no parameters) layer-normalises the pooled features before the head. The
    features of a ReLU backbone are all >= 0, so every weight of a head unit gets a gradient of the same sign and
    Adam moves them together: with a backbone that trains, the whole Dense(10, ReLU) layer died within 80 steps on
    real radiographs (every unit negative for every input, the output a constant); centred features keep it alive.
    """
    sex = nn.Sequential(nn.Linear(1, 32), nn.Sigmoid())
    head = _mlp([2048 + 32, 10, 1], nn.ReLU)
    return SexImageRegressor("legacy_xception", head, sex, image_size, image_size, pretrained, freeze_backbone,
                             in_chans, feature_norm, hand_mask=hand_mask, contrast=contrast)


@register_model(paper={"resnet50_patch": (0.06, 0.24, 0.97)}, paper_weight=0.5)
def resnet50_patch(pretrained: str | None = None, freeze_backbone: bool = True, image_size: int = 500,
                   patch_size: int = 224, num_patches: int = 3, eval_grid: int | None = None,
                   in_chans: int = 3, hand_mask: bool = False, feature_norm: bool = False,
                   contrast: str = "none") -> SexImageRegressor:
    """ResNet50 on P x P patches: concat raw sex; Dense(14, ReLU); Dense(1). One prediction per patch.

    Training draws ``num_patches`` random patches per radiograph; evaluation averages an overlapping
    ``eval_grid`` x ``eval_grid`` grid (default: just enough patches per side to overlap and cover the image).
    With ``hand_mask`` the patches are cut from the masked radiograph (background patches are black).
    ``feature_norm``: as for ``xception`` (the Dense(14, ReLU) head dies the same way).
    """
    head = _mlp([2048 + 1, 14, 1], nn.ReLU)
    return SexImageRegressor("resnet50", head, None, image_size, patch_size, pretrained, freeze_backbone, in_chans,
                             feature_norm, num_patches=num_patches, eval_grid=eval_grid, hand_mask=hand_mask,
                             contrast=contrast)
