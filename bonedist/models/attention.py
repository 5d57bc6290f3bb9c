"""AG-CNN attention crops (paper V-D1): batched on a GPU, one image at a time with OpenCV on a CPU.

feature map (B, C, h, w) → channel sum (or max) → per-image rescale to 0-255 → upsample to the input size →
Otsu threshold of the 8-bit heat per image, as the paper's code did with OpenCV (or a fixed fraction) →
8-connected components → the component with the largest sum of heat → its bounding box → crop the original image
there and resize it to the input size. An image with no foreground keeps the whole image.

On a GPU every step runs for the whole batch (Otsu from one histogram per image, Kornia's union-find, Kornia's
crop); on a CPU, where those have no parallel hardware to use, the same steps run image by image in OpenCV, the
way the paper's Keras code did, and give the same boxes (tested).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
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


def otsu_levels(heat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's ``THRESH_OTSU`` on each image's 8-bit heat, for a whole batch: (mask (B, 1, H, W), level (B,)).

    The heat (0-255) is truncated to 8 bits as ``astype(np.uint8)`` does; one 256-bin histogram per image (a single
    ``bincount``); the level that maximises the between-class variance (the first, as OpenCV); foreground = above it.
    """
    batch = heat.shape[0]
    levels = heat.detach().clamp(0, 255).to(torch.uint8)  # (B, 1, H, W)
    offsets = (torch.arange(batch, device=heat.device) * 256).view(-1, 1)
    hist = torch.bincount((levels.flatten(1).long() + offsets).flatten(), minlength=batch * 256)
    p = hist.view(batch, 256).double()
    p = p / p.sum(dim=1, keepdim=True)
    w0 = p.cumsum(dim=1)
    mu = (p * torch.arange(256, device=heat.device, dtype=torch.float64)).cumsum(dim=1)
    w1 = 1.0 - w0
    between = (mu[:, -1:] * w0 - mu) ** 2 / (w0 * w1).clamp_min(1e-300)
    between = torch.where((w0 > 1e-12) & (w1 > 1e-12), between, torch.full_like(between, -1.0))
    level = between.argmax(dim=1)  # the first maximum
    return levels > level.view(-1, 1, 1, 1).to(torch.uint8), level


def threshold_mask(heat: torch.Tensor, threshold: str | float = "otsu") -> torch.Tensor:
    """Boolean foreground (B, 1, H, W): Otsu on each image's 8-bit heat, or ``heat > fraction * 255``."""
    if threshold == "otsu":
        return otsu_levels(heat)[0]
    return heat > _fraction(threshold) * 255.0


def _fraction(threshold: str | float) -> float:
    fraction = float(threshold)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"threshold must be 'otsu' or a fraction in (0, 1), got {threshold!r}")
    return fraction


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
        if heat.device.type == "cpu":
            return _attention_boxes_opencv(heat, threshold, support)
        mask = threshold_mask(heat, threshold)
        if support is not None:
            mask = mask & support
        component = largest_component(mask, heat)
        return mask_boxes(component), component


def _attention_boxes_opencv(heat: torch.Tensor, threshold: str | float, support: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_boxes`` one image at a time with OpenCV (the CPU path): the same thresholds, components, ties
    (the first component in raster order) and boxes as the batched path."""
    batch, _, height, width = heat.shape
    heats = heat[:, 0].numpy()
    levels = heats.astype(np.uint8)  # heat is within [0, 255]: truncation, as the batched path
    supports = support[:, 0].numpy().astype(np.uint8) if support is not None else None
    boxes = np.tile(np.array([0, 0, width - 1, height - 1], dtype=np.int64), (batch, 1))
    chosen = np.zeros((batch, height, width), dtype=bool)
    for i in range(batch):
        if threshold == "otsu":
            _, mask = cv2.threshold(levels[i], 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        else:
            mask = (heats[i] > _fraction(threshold) * 255.0).astype(np.uint8)
        if supports is not None:
            mask &= supports[i]
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_32S)
        if count < 2:
            continue
        sums = []  # each component's heat, summed inside its own bounding box only
        for k in range(1, count):
            x, y, w, h = stats[k, :4]
            window = (slice(y, y + h), slice(x, x + w))
            sums.append(heats[i][window][labels[window] == k].sum(dtype=np.float64))
        best = 1 + int(np.argmax(sums))  # the first maximum: the first component in raster order
        x, y, w, h = stats[best, :4]
        boxes[i] = (x, y, x + w - 1, y + h - 1)
        np.equal(labels, best, out=chosen[i])
    return torch.from_numpy(boxes), torch.from_numpy(chosen).unsqueeze(1)


def crop_boxes(image: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop (B, C, H, W) images to inclusive (x1, y1, x2, y2) boxes and resize each crop to ``size`` (bilinear,
    box corners on output corners). On a CPU OpenCV warps image by image, sampling at the same points."""
    if image.device.type == "cpu" and image.dtype == torch.float32:
        return _crop_boxes_opencv(image, boxes, size)
    x1, y1, x2, y2 = boxes.to(image.dtype if image.is_floating_point() else torch.float32).unbind(1)
    corners = torch.stack([torch.stack([x1, y1], 1), torch.stack([x2, y1], 1), torch.stack([x2, y2], 1),
                           torch.stack([x1, y2], 1)], dim=1)  # (B, 4, 2): TL, TR, BR, BL in (x, y)
    return crop_and_resize(image, corners.to(image.dtype), size, mode="bilinear", align_corners=True)


def _crop_boxes_opencv(image: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    out_h, out_w = size
    images = image.detach().numpy()
    out = np.empty((image.shape[0], image.shape[1], out_h, out_w), dtype=np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        # output pixel (u, v) samples input (x1 + u (x2 - x1) / (W - 1), y1 + v (y2 - y1) / (H - 1))
        sx, sy = (x2 - x1) / max(out_w - 1, 1), (y2 - y1) / max(out_h - 1, 1)
        matrix = np.array([[sx, 0.0, x1], [0.0, sy, y1]], dtype=np.float64)
        for c in range(image.shape[1]):
            out[i, c] = cv2.warpAffine(images[i, c], matrix, (out_w, out_h),
                                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    return torch.from_numpy(out).to(image.dtype)
