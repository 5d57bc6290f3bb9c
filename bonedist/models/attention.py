"""AG-CNN attention crops, batched on the device with Kornia (paper V-D1).

feature map (B, C, h, w) → channel sum (or max) → per-image rescale to 0-255 → upsample to the input size →
Otsu threshold per image (or a fixed fraction) → 8-connected components (exact union-find) → the component with
the largest sum of heat → its bounding box → crop the original image there and resize it to the input size.
An image with no foreground keeps the whole image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.filters import otsu_threshold
from kornia.geometry.transform import crop_and_resize

from bonedist.ops import largest_component, mask_boxes


def attention_heatmap(features: torch.Tensor, size: tuple[int, int], reduction: str = "sum") -> torch.Tensor:
    """(B, C, h, w) features → (B, 1, H, W) heat in [0, 255], each image rescaled on its own range."""
    if reduction == "sum":
        heat = features.sum(dim=1, keepdim=True)
    elif reduction == "max":
        heat = features.abs().amax(dim=1, keepdim=True)
    else:
        raise ValueError(f"reduction must be 'sum' or 'max', got {reduction!r}")
    heat = heat.float()
    lo = heat.amin(dim=(2, 3), keepdim=True)
    hi = heat.amax(dim=(2, 3), keepdim=True)
    heat = (heat - lo) * (255.0 / (hi - lo).clamp_min(1e-12))
    return F.interpolate(heat, size=size, mode="bilinear", align_corners=False)


def threshold_mask(heat: torch.Tensor, threshold: str | float = "otsu") -> torch.Tensor:
    """Boolean foreground (B, 1, H, W): Otsu per image, or ``heat > fraction * 255``."""
    if threshold == "otsu":
        # Each image was rescaled to 0-255 on its own, so the histogram range is per image whatever Kornia
        # release is installed (older ones took it over the whole batch).
        mask, _ = otsu_threshold(heat, return_mask=True)
        return mask
    fraction = float(threshold)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"threshold must be 'otsu' or a fraction in (0, 1), got {threshold!r}")
    return heat > fraction * 255.0


def attention_boxes(features: torch.Tensor, size: tuple[int, int], reduction: str = "sum",
                    threshold: str | float = "otsu", support: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (B, 4) and chosen-component masks (B, 1, H, W) from a feature map, without gradients.

    ``support`` (B, 1, H, W) bool, e.g. the hand mask, confines the attention: heat outside it is zeroed before
    the threshold and no component may leave it, so background markers can never be chosen.
    """
    with torch.no_grad():
        heat = attention_heatmap(features.detach(), size, reduction)
        if support is not None:
            heat = heat * support
        mask = threshold_mask(heat, threshold)
        if support is not None:
            mask = mask & support
        component = largest_component(mask, heat)
        return mask_boxes(component), component


def crop_boxes(image: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop (B, C, H, W) images to inclusive (x1, y1, x2, y2) boxes and resize each crop to ``size``."""
    x1, y1, x2, y2 = boxes.to(image.dtype if image.is_floating_point() else torch.float32).unbind(1)
    corners = torch.stack([torch.stack([x1, y1], 1), torch.stack([x2, y1], 1), torch.stack([x2, y2], 1),
                           torch.stack([x1, y2], 1)], dim=1)  # (B, 4, 2): TL, TR, BR, BL in (x, y)
    return crop_and_resize(image, corners.to(image.dtype), size, mode="bilinear", align_corners=True)
