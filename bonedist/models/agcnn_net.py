"""The AG-CNN's network (``agcnn.py`` describes and registers it without importing torch): two ResNet50 branches
with Keras' initialisation and the Fusion head."""

from __future__ import annotations

from functools import partial

import timm
import torch
import torch.nn.functional as F
from torch import nn

from bonedist.models.agcnn import AGCNN_TASK, KERAS_LEAKY_SLOPE, AGCNNOptions
from bonedist.models.attention import attention_boxes, crop_boxes


def he_uniform_(module: nn.Module) -> None:
    """Keras' he_uniform for every conv and dense kernel (limit sqrt(6 / fan_in)), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class AGBranch(nn.Module):
    """ResNet50 (bottleneck blocks, BatchNorm + LeakyReLU, 1-channel input) → GAP 2048 → 256 → Dropout → 1."""

    def __init__(self, in_chans: int = 1, drop_rate: float = 0.5, leaky_slope: float = KERAS_LEAKY_SLOPE,
                 zero_init_residual: bool = False):
        super().__init__()
        act = partial(nn.LeakyReLU, negative_slope=leaky_slope)
        self.backbone = timm.create_model("resnet50", pretrained=False, num_classes=0, global_pool="",
                                          in_chans=in_chans, act_layer=act, zero_init_last=False)
        self.head = nn.Sequential(nn.Linear(2048, 256), act(), nn.Dropout(drop_rate), nn.Linear(256, 1))
        he_uniform_(self)
        if zero_init_residual:  # each residual block starts as the identity (Goyal et al. 2017), after Keras' init
            for block in self.backbone.modules():
                if hasattr(block, "zero_init_last"):
                    block.zero_init_last()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.backbone.forward_features(image)  # (B, 2048, H/32, W/32): 16x16 for 500x500
        pooled = fmap.mean(dim=(2, 3))  # (B, 2048)
        return fmap, pooled, self.head(pooled).squeeze(1)


class AGCNN(nn.Module):
    def __init__(self, opts: AGCNNOptions):
        super().__init__()
        if isinstance(opts.threshold, str) and opts.threshold != "otsu":
            raise ValueError(f"threshold must be 'otsu' or a number in (0, 1), got {opts.threshold!r}")
        self.reduction, self.threshold, self.fusion_grad = opts.reduction, opts.threshold, opts.fusion_grad
        self.fusion_norm = opts.fusion_norm
        drop, slope, zero = opts.drop_rate, opts.leaky_slope, opts.zero_init_residual
        self.global_branch = AGBranch(1, drop, slope, zero)
        self.local_branch = AGBranch(1, drop, slope, zero)
        act = partial(nn.LeakyReLU, negative_slope=slope)
        self.fusion = nn.Sequential(nn.Linear(2048 + 2048 + 1, 256), act(), nn.Dropout(drop),
                                    nn.Linear(256, 128), act(), nn.Dropout(drop), nn.Linear(128, 1))
        he_uniform_(self.fusion)
        self.stage: str | None = None

    def set_stage(self, stage: str | None) -> None:
        if stage not in (None, *AGCNN_TASK.stages):
            raise ValueError(f"stage must be one of {', '.join(AGCNN_TASK.stages)} or None, got {stage!r}")
        self.stage = stage
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.stage is not None:  # fixed branches keep their BatchNorm statistics
            for name, part in (("global", self.global_branch), ("local", self.local_branch), ("fusion", self.fusion)):
                if name != self.stage:
                    part.eval()
        return self

    def _support(self, image: torch.Tensor) -> torch.Tensor | None:
        """The hand: pixels above the per-image minimum, which the hand mask gave everything outside it."""
        if not self.spec.hand_mask:
            return None
        floor = image.detach().float().amin(dim=(1, 2, 3), keepdim=True)
        return image.detach().float() > floor + 1e-3

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> dict[str, torch.Tensor]:
        size = (image.shape[-2], image.shape[-1])
        stage = self.stage if self.training else None
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and stage in (None, "global")):
            g_map, g_vec, g_pred = self.global_branch(image)
        if stage == "global":
            return {"pred": g_pred, "global": g_pred}
        boxes, masks = attention_boxes(g_map, size, self.reduction, self.threshold, self._support(image))
        crops = crop_boxes(image.float(), boxes, size).to(image.dtype)  # (B, 1, H, W)
        with torch.set_grad_enabled(grad and stage in (None, "local")):
            _, l_vec, l_pred = self.local_branch(crops)
        if stage == "local":
            return {"pred": l_pred, "local": l_pred, "boxes": boxes, "masks": masks}
        if self.fusion_grad == "isolated":
            g_vec, l_vec = g_vec.detach(), l_vec.detach()
        if self.fusion_norm:  # parameter-free: each branch's pooled features to zero mean, unit variance
            g_vec, l_vec = F.layer_norm(g_vec, g_vec.shape[1:]), F.layer_norm(l_vec, l_vec.shape[1:])
        fused = torch.cat([g_vec, l_vec, male.to(g_vec.dtype).view(-1, 1)], dim=1)  # (B, 4097)
        f_pred = self.fusion(fused).squeeze(1)
        return {"pred": f_pred, "global": g_pred, "local": l_pred, "fusion": f_pred, "boxes": boxes, "masks": masks}

    def param_groups(self, lr: float, backbone_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
        """One group per branch (the paper's three optimizers are three Adam states over disjoint parameters)."""
        return [{"params": [p for p in part.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay,
                 "name": name}
                for name, part in (("global", self.global_branch), ("local", self.local_branch),
                                   ("fusion", self.fusion))]
