"""Hand masks computed from the radiograph itself, batched on the device with Kornia.

Lead "L" markers, technician initials and cassette edges are bright, so they attract thresholds and attention crops.
The mask keeps the hand and zeroes the rest before augmentation, training, evaluation and AG-CNN attention:

    image (B, 1, H, W) → area-downsample to ``work_size`` → Gaussian blur → Otsu (``kornia.filters.otsu_threshold``)
    → opening (drops letters' strokes and thin frame lines) → closing (bridges the growth-plate gaps between bones)
    → the largest 8-connected component (``connected_components_union_find``)
    → if that component is a plate (a cassette or a bright frame: nearly convex, or most of the picture),
      Otsu again over the pixels inside it and repeat, up to ``max_levels``
    → dilation by ``margin`` (the soft tissue around the bones) → upsample to (H, W).

The Otsu threshold of a region is taken over evenly spaced quantiles of that region's pixels, so every image in
the batch gets its own threshold from its own pixels in one call, whatever else is in the batch. An image whose
mask would be empty keeps everything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d, otsu_threshold
from kornia.morphology import closing, dilation, opening

from bonedist.ops import largest_component


@dataclass(frozen=True)
class HandMaskConfig:
    work_size: int = 128  # masks are computed at this resolution (cheap), then upsampled
    blur_sigma: float = 1.0
    open_size: int = 3  # removes strokes narrower than this (work pixels)
    close_size: int = 5  # joins bones separated by growth plates
    margin: int = 11  # dilation (work pixels) that adds the soft tissue around the bones
    max_levels: int = 3  # cassette inside cassette inside the picture
    plate_solidity: float = 0.93  # a component this convex is a plate, not a hand
    plate_area: float = 0.45  # ... as is one that covers this share of the region and is fairly convex
    plate_area_solidity: float = 0.8
    plate_min_area: float = 0.2  # plates are large: a component under this share of the picture is the hand
    samples: int = 4096  # quantiles of a region's pixels that its Otsu threshold is computed from

    def to_dict(self) -> dict:
        return asdict(self)


def _region_threshold(small: torch.Tensor, region: torch.Tensor, samples: int) -> torch.Tensor:
    """Otsu threshold (B, 1, 1, 1) of each image's pixels inside ``region``.

    Each region's pixel values are reduced to ``samples`` evenly spaced quantiles (a deterministic sample with the
    region's distribution, independent of the other images in the batch), which Kornia thresholds per image.
    """
    batch = small.shape[0]
    inside = region.flatten(1)
    count = inside.sum(dim=1, keepdim=True)
    values = torch.where(inside, small.flatten(1), torch.full_like(small.flatten(1), float("inf")))
    whole = count == 0  # an empty region: the whole image
    values = torch.where(whole, small.flatten(1), values)
    count = torch.where(whole, torch.full_like(count, inside.shape[1]), count)
    ordered = values.sort(dim=1).values
    side = int(samples ** 0.5)
    steps = (torch.arange(side * side, device=small.device, dtype=torch.float64) + 0.5) / (side * side)
    idx = (steps.view(1, -1) * count.double()).long().clamp_max(inside.shape[1] - 1)
    sample = torch.gather(ordered, 1, idx).view(batch, 1, side, side)
    _, threshold = otsu_threshold(sample)
    return threshold.view(batch, 1, 1, 1)


def _solidity(component: torch.Tensor, coarse: int = 32, close: int = 7) -> torch.Tensor:
    """Area over the area after a large closing (B,): near 1 for plates, well below for spread fingers."""
    small = F.interpolate(component.float(), size=(coarse, coarse), mode="area")
    closed = closing(small, torch.ones(close, close, device=component.device))
    return small.sum(dim=(1, 2, 3)) / closed.sum(dim=(1, 2, 3)).clamp_min(1e-6)


@torch.no_grad()
def hand_mask(images: torch.Tensor, cfg: HandMaskConfig | None = None) -> torch.Tensor:
    """Boolean hand masks (B, 1, H, W) for grayscale images (B, 1, H, W), uint8 or float, on their device."""
    return upsample_mask(hand_mask_small(images, cfg), *images.shape[-2:])


def upsample_mask(small: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A mask computed at the work size (``hand_mask_small``) at the image's size (B, 1, H, W), as ``hand_mask``
    returns it: what a cache of masks keeps is the small one (16 KB a radiograph at the default work size)."""
    full = F.interpolate(small.float(), size=(height, width), mode="bilinear", align_corners=False)
    return full > 0.5


@torch.no_grad()
def hand_mask_small(images: torch.Tensor, cfg: HandMaskConfig | None = None) -> torch.Tensor:
    """The hand masks at ``cfg.work_size`` (B, 1, W, W) bool, before ``upsample_mask`` brings them to the images'
    size: each image's mask depends on its own pixels only, so it can be computed once and kept."""
    cfg = cfg or HandMaskConfig()
    batch = images.shape[0]
    device = images.device
    x = images.float()
    x = x / 255.0 if images.dtype == torch.uint8 else x
    small = F.interpolate(x, size=(cfg.work_size, cfg.work_size), mode="area")
    if cfg.blur_sigma:
        k = 2 * round(2 * cfg.blur_sigma) + 1
        small = gaussian_blur2d(small, (k, k), (cfg.blur_sigma, cfg.blur_sigma))
    open_k = torch.ones(cfg.open_size, cfg.open_size, device=device)
    close_k = torch.ones(cfg.close_size, cfg.close_size, device=device)
    region = torch.ones_like(small, dtype=torch.bool)
    chosen = torch.zeros_like(region)
    settled = torch.zeros(batch, dtype=torch.bool, device=device)
    ones = torch.ones_like(small)
    for _ in range(cfg.max_levels):
        foreground = (small > _region_threshold(small, region, cfg.samples)) & region
        foreground = closing(opening(foreground.float(), open_k), close_k) > 0.5
        component = largest_component(foreground, ones)  # by area
        area = component.sum(dim=(1, 2, 3)).float()
        found = area > 0.01 * region.sum(dim=(1, 2, 3)).float()
        update = ~settled & found
        chosen = torch.where(update.view(-1, 1, 1, 1), component, chosen)
        solidity = _solidity(component)
        share = area / region.sum(dim=(1, 2, 3)).float().clamp_min(1.0)
        plate = (solidity > cfg.plate_solidity) | ((share > cfg.plate_area) & (solidity > cfg.plate_area_solidity))
        plate &= area > cfg.plate_min_area * small.shape[-1] * small.shape[-2]
        settled |= ~(plate & found)
        if images.device.type == "cpu" and bool(settled.all()):
            break  # on a GPU every level runs: checking would stop its queue for a host sync
        inner = ~settled
        region = torch.where(inner.view(-1, 1, 1, 1), component, region)
    if cfg.margin:
        chosen = dilation(chosen.float(), torch.ones(cfg.margin, cfg.margin, device=device)) > 0.5
    empty = ~chosen.flatten(1).any(dim=1)
    return chosen | empty.view(-1, 1, 1, 1)
