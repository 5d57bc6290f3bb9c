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

from dataclasses import dataclass
from functools import partial

import timm
import torch
import torch.nn.functional as F
from torch import nn

from bonedist.models.attention import attention_boxes, crop_boxes
from bonedist.models.registry import register_model
from bonedist.models.regressor import BF16_CL
from bonedist.models.task import Task
from bonedist.options import option

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


@dataclass
class AGCNNOptions:
    reduction: str = option("sum", "attention heat from the last feature map: channel sum (the paper) or max (Guan "
                                   "et al.)", ("sum", "max"), "model")
    threshold: str | float = option("otsu", "attention threshold: otsu, or a fixed share of the heat range",
                                    group="model")
    fusion_grad: str = option("isolated", "isolated: each branch learns from its own loss term (the paper); joint: "
                                          "the whole loss through everything (Guan et al.)", ("isolated", "joint"),
                              "model")
    drop_rate: float = option(0.5, "dropout of the head's hidden layers", group="model", minimum=0, maximum=1)
    leaky_slope: float = option(KERAS_LEAKY_SLOPE, "LeakyReLU slope (Keras' default 0.3)", group="model", minimum=0)
    fusion_norm: bool = option(False, "layer-normalise each branch's pooled features before the Fusion head",
                               group="model")
    zero_init_residual: bool = option(False, "start every residual block as the identity", group="model")


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


def _recipes() -> dict:
    """What AG-CNN adds to each preset's shared values."""
    staged = {"reduction": "max", "fusion_norm": True}
    return {
        # from scratch, 16 epochs at a constant 1e-5 (the paper's three Adam optimizers: one group per branch)
        "paper": lambda: {"epochs": 16, "lr": 1e-5, "scheduler": "constant", "early_stopping": 0,
                          "model": {"reduction": "sum", "threshold": "otsu", "fusion_grad": "isolated"}},
        # staged after Guan et al.: global branch, then local on the fixed global's crops, then the Fusion head
        "improved": lambda: {"lr": 3e-4, "stages": [["global", 15], ["local", 10], ["fusion", 5]],
                             "model": {**staged, "threshold": "otsu", "fusion_grad": "isolated"}},
        # 12 epochs with warmups of 3.6, the schedule the AG-CNN was tuned with (warmup is per stage)
        "scratch": lambda: {"epochs": 12, "warmup_epochs": 3.6, "stages": [["global", 6], ["local", 4], ["fusion", 2]],
                            "model": {**staged, "drop_rate": 0.1}},
        "tiny": lambda: {"model": {"drop_rate": 0.1, "fusion_norm": True}},
    }


@register_model(options=AGCNNOptions, task=AGCNN_TASK, channels=(1,), recipes=_recipes(), cpu_precision=BF16_CL,
                paper={"agcnn_global": (0.18, 0.43, 0.91), "agcnn_local": (0.79, 0.89, 0.57),
                       "agcnn_fusion": (0.22, 0.47, 0.89)})
def agcnn(opts: AGCNNOptions, in_chans: int) -> AGCNN:
    """The attention-guided three-branch CNN, trained from scratch (it takes no ImageNet weights).

    ``fusion_norm`` (not in the paper; no parameters) layer-normalises each branch's pooled features before the
    Fusion head, which otherwise starts from very large inputs and converges slowly in short runs.
    ``zero_init_residual`` (not in the paper) zeroes the last BatchNorm scale of every residual block after the
    Keras initialisation, so each branch starts as a shallow network: trained from scratch at a high learning rate
    the Keras-initialised local branch did not recover in its stage.
    """
    return AGCNN(opts)
