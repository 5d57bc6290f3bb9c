"""AG-CNN attention crops, batched on the device with Kornia (paper V-D1).

feature map (B, C, h, w) → channel sum (or max) → per-image rescale to 0-255 → upsample to the input size →
Otsu threshold per image (or a fixed fraction) → 8-connected components (exact union-find) → the component with
the largest sum of heat → its bounding box → crop the original image there and resize it to the input size.
An image with no foreground keeps the whole image.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from kornia.contrib import connected_components_union_find
from kornia.filters import otsu_threshold
from kornia.geometry.transform import crop_and_resize


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


def largest_component(mask: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """The 8-connected component of each image with the largest sum of heat, as a (B, 1, H, W) bool mask.

    Ties go to the component whose first pixel comes first in raster order. On a GPU all images are labelled at once
    (Kornia's union-find, no host sync); on a CPU, where that has no parallel hardware to use, OpenCV labels one
    image at a time, which is several times faster there and gives the same components.
    """
    if mask.device.type == "cpu":
        return _largest_component_opencv(mask, heat)
    return _largest_component_batched(mask, heat)


def _largest_component_batched(mask: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    batch = mask.shape[0]
    labels = connected_components_union_find(mask)  # (B, 1, H, W) int64, distinct across images, 0 = background
    flat = labels.flatten()
    n_labels = flat.numel() + 1  # labels are pixel indices + 1: an upper bound that needs no .item() sync
    sums = torch.zeros(n_labels, dtype=torch.float64, device=heat.device)
    sums.scatter_add_(0, flat, heat.flatten().double())
    image_of = torch.arange(batch, device=labels.device).view(batch, 1, 1, 1).expand_as(labels).flatten()
    owner = torch.full((n_labels,), -1, dtype=torch.long, device=labels.device)
    owner.scatter_reduce_(0, flat, image_of, reduce="amax")
    sums[0], owner[0] = -1.0, -1  # background is never chosen
    valid = owner >= 0
    best_sum = torch.full((batch,), -1.0, dtype=torch.float64, device=heat.device)
    best_sum.scatter_reduce_(0, owner[valid], sums[valid], reduce="amax")
    # ties: the lowest label (the first in raster order) wins, deterministically
    ids = torch.arange(n_labels, device=labels.device)
    winner = valid & (sums == best_sum[owner.clamp_min(0)])
    best_label = torch.full((batch,), n_labels, dtype=torch.long, device=labels.device)
    best_label.scatter_reduce_(0, owner[winner], ids[winner], reduce="amin")
    return labels == best_label.view(batch, 1, 1, 1)


def _largest_component_opencv(mask: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    masks = mask[:, 0].to(torch.uint8).numpy()  # (B, H, W)
    heats = heat.expand_as(mask)[:, 0].double().numpy()
    out = np.zeros(masks.shape, dtype=bool)
    for i in range(masks.shape[0]):
        count, labels = cv2.connectedComponents(masks[i], connectivity=8, ltype=cv2.CV_32S)  # raster order
        if count > 1:
            sums = np.bincount(labels.ravel(), weights=heats[i].ravel(), minlength=count)
            sums[0] = -1.0  # background is never chosen
            out[i] = labels == int(np.argmax(sums))  # the first maximum: the lowest label
    return torch.from_numpy(out).unsqueeze(1)


def mask_boxes(mask: torch.Tensor) -> torch.Tensor:
    """Inclusive (x1, y1, x2, y2) pixel boxes (B, 4) of each mask; an empty mask gives the whole image."""
    _, _, height, width = mask.shape
    rows = mask.any(dim=3).squeeze(1)  # (B, H)
    cols = mask.any(dim=2).squeeze(1)  # (B, W)
    y1 = rows.int().argmax(dim=1)
    y2 = height - 1 - rows.flip(1).int().argmax(dim=1)
    x1 = cols.int().argmax(dim=1)
    x2 = width - 1 - cols.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1)
    empty = ~rows.any(dim=1)
    whole = torch.tensor([0, 0, width - 1, height - 1], device=mask.device)
    return torch.where(empty.view(-1, 1), whole, boxes)


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
