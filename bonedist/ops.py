"""Tensor operations shared by the data side (hand mask) and the models (AG-CNN attention): the largest connected
component of a batch of masks, and the bounding boxes of masks."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from kornia.contrib import connected_components_union_find


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
