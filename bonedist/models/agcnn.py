"""AG-CNN (paper V-D, after Guan et al.): Global and Local ResNet50 branches from scratch plus a Fusion head.

The Local branch sees the Global branch's attention crop of the original radiograph. With ``fusion_grad="isolated"``
(the paper) the Fusion head gets detached branch features, so with the task's loss
0.8·L_global + 0.1·L_local + 0.1·L_fusion every branch is updated by its own term only; ``"joint"`` (Guan et al.)
back-propagates the whole loss through everything.

Staged training (Guan et al.): ``set_stage("global" | "local" | "fusion" | None)``. In training mode a stage runs
only what it needs and trains only its branch: global alone; then local on the (fixed) global branch's crops; then
the Fusion head on both fixed branches. Evaluation always runs every branch. With ``hand_mask`` the attention is
confined to the hand (the non-background pixels of the masked input), so markers cannot attract the crop.
"""

from __future__ import annotations

from functools import partial

import timm
import torch
import torch.nn.functional as F
from torch import nn

from bonedist.models.attention import attention_boxes, crop_boxes
from bonedist.models.registry import register_model
from bonedist.models.task import Task
from bonedist.spec import InputSpec

KERAS_LEAKY_SLOPE = 0.3  # Keras' LeakyReLU default alpha


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


# The paper's convex combination 0.8·L_global + 0.1·L_local + 0.1·L_fusion; staged training (Guan et al.) trains
# the branches one after another; the prediction is the Fusion branch's; the local branch's crop is drawn.
AGCNN_TASK = Task(branches=("global", "local", "fusion"), weights={"global": 0.8, "local": 0.1, "fusion": 0.1},
                  main_branch="fusion", stages=("global", "local", "fusion"), attention=True,
                  compilable=False)  # the union-find of the attention crop breaks graphs


class AGCNN(nn.Module):
    def __init__(self, image_size: int = 500, reduction: str = "sum", threshold: str | float = "otsu",
                 fusion_grad: str = "isolated", drop_rate: float = 0.5, leaky_slope: float = KERAS_LEAKY_SLOPE,
                 fusion_norm: bool = False, hand_mask: bool = False, contrast: str = "none",
                 zero_init_residual: bool = False):
        super().__init__()
        if fusion_grad not in ("isolated", "joint"):
            raise ValueError(f"fusion_grad must be 'isolated' (paper) or 'joint' (Guan et al.), got {fusion_grad!r}")
        if reduction not in ("sum", "max"):
            raise ValueError(f"reduction must be 'sum' (paper) or 'max' (Guan et al.), got {reduction!r}")
        self.reduction, self.threshold, self.fusion_grad = reduction, threshold, fusion_grad
        self.fusion_norm = fusion_norm
        self.global_branch = AGBranch(1, drop_rate, leaky_slope, zero_init_residual)
        self.local_branch = AGBranch(1, drop_rate, leaky_slope, zero_init_residual)
        act = partial(nn.LeakyReLU, negative_slope=leaky_slope)
        self.fusion = nn.Sequential(nn.Linear(2048 + 2048 + 1, 256), act(), nn.Dropout(drop_rate),
                                    nn.Linear(256, 128), act(), nn.Dropout(drop_rate), nn.Linear(128, 1))
        he_uniform_(self.fusion)
        self.spec = InputSpec(image_size=image_size, input_size=image_size, channels=1, mean=(0.5,), std=(0.5,),
                              hand_mask=hand_mask, contrast=contrast)
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


@register_model(task=AGCNN_TASK, pretrained=False,
                paper={"agcnn_global": (0.18, 0.43, 0.91), "agcnn_local": (0.79, 0.89, 0.57),
                       "agcnn_fusion": (0.22, 0.47, 0.89)})
def agcnn(image_size: int = 500, reduction: str = "sum", threshold: str | float = "otsu",
          fusion_grad: str = "isolated", drop_rate: float = 0.5, leaky_slope: float = KERAS_LEAKY_SLOPE,
          fusion_norm: bool = False, hand_mask: bool = False, contrast: str = "none", zero_init_residual: bool = False,
          pretrained: str | None = None, freeze_backbone: bool = False) -> AGCNN:
    """The attention-guided three-branch CNN, trained from scratch (``pretrained`` must stay None).

    ``fusion_norm`` (not in the paper; no parameters) layer-normalises each branch's pooled features before the
    Fusion head, which otherwise starts from very large inputs and converges slowly in short runs.
    ``zero_init_residual`` (not in the paper) zeroes the last BatchNorm scale of every residual block after the
    Keras initialisation, so each branch starts as a shallow network: trained from scratch at a high learning rate
    the Keras-initialised local branch did not recover in its stage (training MAE 90 months).
    """
    if pretrained not in (None, "", "none") or freeze_backbone:
        raise ValueError("agcnn is trained from scratch: it takes no pretrained weights and nothing is frozen")
    return AGCNN(image_size, reduction, threshold, fusion_grad, drop_rate, leaky_slope, fusion_norm, hand_mask,
                 contrast, zero_init_residual)
