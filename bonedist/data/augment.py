"""GPU augmentation with Kornia and conversion to each model's input spec, on the training device.

uint8 (B, 1, H, W) → float [0, 1] → resize to ``spec.image_size`` → (``spec.contrast``) stretch each radiograph's
own contrast → (``spec.hand_mask``) zero all but the hand, and
draw training patches centred on the hand → (train) the paper's Table 2 affine + flip with
per-sample parameters → whole images, or K random patches (rotation + flip) for patch models, or (eval) the
deterministic overlapping patch grid → 1 or 3 channels → the backbone's mean/std (→ channels_last). Reproducible
from a seed: each call seeds Kornia's parameter sampling from (seed, rank, step).

``InputPipeline.model_batch`` is the one batch → model-input step that training, validation, recalibration,
inference and every benchmark use: inputs, the sex repeated per patch, and the z-scored target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import kornia.augmentation as K
import kornia.geometry.transform as KT
import torch
import torch.nn.functional as F

from bonedist import BonedistError
from bonedist.data.handmask import hand_mask_small, upsample_mask
from bonedist.data.sampling import mix_seed
from bonedist.spec import AugmentConfig, InputSpec


def _whole_image_ops(cfg: AugmentConfig) -> list[torch.nn.Module]:
    ops: list[torch.nn.Module] = []
    if cfg.rotation or any(cfg.translate) or cfg.shear or cfg.scale != (1.0, 1.0):
        ops.append(K.RandomAffine(degrees=cfg.rotation, translate=cfg.translate if any(cfg.translate) else None,
                                  scale=cfg.scale if cfg.scale != (1.0, 1.0) else None,
                                  shear=cfg.shear if cfg.shear else None, p=1.0, padding_mode="zeros"))
    if cfg.hflip:
        ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
    return ops


def _patch_ops(cfg: AugmentConfig) -> list[torch.nn.Module]:
    ops: list[torch.nn.Module] = []
    if cfg.patch_rotation:
        ops.append(K.RandomRotation(degrees=cfg.patch_rotation, p=1.0))
    if cfg.patch_hflip:
        ops.append(K.RandomHorizontalFlip(p=cfg.patch_hflip))
    return ops


def eval_grid_size(spec: InputSpec) -> int:
    """Patches per side of the evaluation grid: covers the image, overlapping, at least sqrt(K) per side."""
    if spec.input_size >= spec.image_size:
        return 1
    if spec.eval_grid:
        return spec.eval_grid
    per_side = math.ceil(spec.image_size / spec.input_size)
    if per_side * spec.input_size == spec.image_size:
        per_side += 1  # an exact tiling would not overlap
    return max(per_side, math.ceil(math.sqrt(spec.num_patches or 1)))


def stretch_contrast(x: torch.Tensor, low: float = 0.01, high: float = 0.99, work_size: int = 64) -> torch.Tensor:
    """Each image (B, 1, H, W) in [0, 1] mapped so its ``low``-``high`` quantile range fills [0, 1] (clipped).

    The quantiles come from an area-downsampled copy (cheap, and independent of the rest of the batch).
    """
    small = F.interpolate(x, size=(work_size, work_size), mode="area").flatten(1)  # (B, work_size**2)
    bounds = torch.quantile(small, torch.tensor([low, high], device=x.device, dtype=x.dtype), dim=1)  # (2, B)
    lo, hi = bounds[0].view(-1, 1, 1, 1), bounds[1].view(-1, 1, 1, 1)
    return ((x - lo) / (hi - lo).clamp_min(1.0 / 255.0)).clamp_(0.0, 1.0)


def view_transform(x: torch.Tensor, degrees: float, zoom: float) -> torch.Tensor:
    """Images (B, C, H, W) rotated by ``degrees`` (counter-clockwise) and zoomed by ``zoom`` about their centre,
    bilinear, zeros outside: a test-time view. OpenCV's matrix and pixel convention (``cv2.getRotationMatrix2D``,
    ``cv2.warpAffine``), so the serving runtime repeats it without torch."""
    if degrees == 0.0 and zoom == 1.0:
        return x
    batch, _, h, w = x.shape
    centre = torch.tensor([[(w - 1) / 2.0, (h - 1) / 2.0]], device=x.device, dtype=torch.float32).expand(batch, -1)
    angle = torch.full((batch,), float(degrees), device=x.device, dtype=torch.float32)
    scale = torch.full((batch, 2), float(zoom), device=x.device, dtype=torch.float32)
    matrix = KT.get_rotation_matrix2d(centre, angle, scale)
    return KT.warp_affine(x, matrix.to(x.dtype), (h, w), mode="bilinear", padding_mode="zeros", align_corners=True)


def gather_patches(images: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size: int) -> torch.Tensor:
    """Patches (B*K, C, P, P) with top-left corners ``ys``, ``xs`` of shape (B, K), without copying whole images."""
    batch, channels, _, _ = images.shape
    k = ys.shape[1]
    offs = torch.arange(size, device=images.device)
    rows = (ys.reshape(-1, 1) + offs).view(-1, size, 1)  # (B*K, P, 1)
    cols = (xs.reshape(-1, 1) + offs).view(-1, 1, size)  # (B*K, 1, P)
    owner = torch.arange(batch, device=images.device).repeat_interleave(k).view(-1, 1, 1)
    patches = images.permute(0, 2, 3, 1)[owner, rows, cols]  # (B*K, P, P, C)
    return patches.permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class TargetScale:
    """z = (age - mu) / sigma: the targets' scale, saved with every run."""

    mu: float
    sigma: float

    def z(self, age: torch.Tensor) -> torch.Tensor:
        return ((age - self.mu) / self.sigma).float()


@dataclass(frozen=True)
class ModelBatch:
    """What the network gets for a batch of B radiographs: ``image`` (B*R, C, S, S) (R inputs per radiograph: the
    patches of a patch model), ``male`` (B*R,), ``target`` (B*R,) z values (None without a scale), ``repeats`` R."""

    image: torch.Tensor
    male: torch.Tensor
    target: torch.Tensor | None
    repeats: int


class InputPipeline:
    """Turns device uint8 batches into model inputs for one ``InputSpec`` (in channels_last when asked)."""

    def __init__(self, spec: InputSpec, cfg: AugmentConfig | None = None, seed: int = 0, rank: int = 0,
                 channels_last: bool = False):
        self.spec, self.cfg, self.seed, self.rank = spec, cfg or AugmentConfig(), seed, rank
        self.channels_last = channels_last
        enabled = self.cfg.enabled
        self.image_ops = torch.nn.Sequential(*_whole_image_ops(self.cfg)) if enabled else torch.nn.Sequential()
        self.patch_ops = torch.nn.Sequential(*_patch_ops(self.cfg)) if enabled else torch.nn.Sequential()
        self.grid = eval_grid_size(spec)

    @property
    def train_repeats(self) -> int:
        """Model inputs per radiograph in training (labels are repeated this many times)."""
        return self.spec.num_patches or 1

    @property
    def eval_repeats(self) -> int:
        return self.grid * self.grid if self.spec.is_patch else 1

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)  # (B, 1, H, W) in [0, 1]
        size = self.spec.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if self.spec.contrast == "stretch":
            x = stretch_contrast(x)
        return x

    def hand_masks(self, images: torch.Tensor) -> torch.Tensor:
        """The hand masks of uint8 images (B, 1, H, W) at the mask's work size, as ``model_batch`` computes them:
        a cache of the split keeps them (``DeviceCache.keep_masks``) and passes them back as ``hand_mask``."""
        return hand_mask_small(self._resized(images))

    def _to_unit(self, images: torch.Tensor, keep_mask: bool = False, small_mask: torch.Tensor | None = None):
        x = self._resized(images)
        mask = None
        if self.spec.hand_mask:
            small = small_mask if small_mask is not None else hand_mask_small(x)
            mask = upsample_mask(small, *x.shape[-2:])
            x = x * mask.to(x.dtype)
        return (x, mask) if keep_mask else x

    @staticmethod
    def _patch_corners(mask: torch.Tensor | None, batch: int, k: int, size: int, p: int, device):
        """Top-left corners (B, K) of training patches: uniform, or with the hand mask centred on the hand."""
        span = size - p + 1
        if mask is None:
            return (torch.randint(0, span, (batch, k), device=device),
                    torch.randint(0, span, (batch, k), device=device))
        half = p // 2
        centres = mask[:, 0, half: half + span, half: half + span].flatten(1).float()  # a corner's patch centre
        empty = centres.sum(dim=1, keepdim=True) == 0
        centres = torch.where(empty, torch.ones_like(centres), centres)
        flat = torch.multinomial(centres, k, replacement=True)
        return flat // span, flat % span

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.spec.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std, device=x.device).view(1, -1, 1, 1)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return ((x - mean) / std).contiguous(memory_format=fmt)

    def model_batch(self, batch: dict, step: int | None = None, scale: TargetScale | None = None,
                    flip: bool = False, view: tuple[float, float] | None = None,
                    size: int | None = None) -> ModelBatch:
        """A loader batch (uint8 ``image`` (B, 1, H, W), ``male``, ``age``; ``hand_mask``: the images' hand masks
        when a cache kept them) → the model's inputs: augmented for training step ``step`` (``size``: downsampled
        to this side after augmentation, progressive resizing), or the deterministic evaluation inputs (``step``
        None; ``flip``: of the mirror; ``view``: (degrees, zoom) of a test-time view, ``view_transform``)."""
        images, small = batch["image"], batch.get("hand_mask")
        if flip:
            images, small = images.flip(-1), (small.flip(-1) if small is not None else None)
        if step is None:
            x, repeats = self.eval(images, small, view), self.eval_repeats
        else:
            x, repeats = self.train(images, step, small, size), self.train_repeats
        target = scale.z(batch["age"]).repeat_interleave(repeats) if scale is not None else None
        return ModelBatch(x, batch["male"].repeat_interleave(repeats), target, repeats)

    def _seed(self, step: int) -> None:
        torch.manual_seed(mix_seed(self.seed, self.rank, step))

    def train(self, images: torch.Tensor, step: int, small_mask: torch.Tensor | None = None,
              size: int | None = None) -> torch.Tensor:
        """Augmented model inputs: (B, C, S, S), or (B*K, C, P, P) for patch models (patch k of image b at b*K+k).
        ``small_mask``: the images' hand masks at the work size, when kept (else computed here); ``size``: whole
        images downsampled to this side after augmentation (antialiased, as a smaller radiograph would be)."""
        if size not in (None, self.spec.image_size) and self.spec.is_patch:
            raise BonedistError("--low-res is for whole-image models; a patch model's patches keep their size")
        x, mask = self._to_unit(images, keep_mask=True, small_mask=small_mask)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # Kornia samples from the global RNG: seed it, then restore
            self._seed(step)
            if not self.spec.is_patch:
                x = self.image_ops(x) if len(self.image_ops) else x
                if size not in (None, self.spec.image_size):
                    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                return self._finish(x)
            batch, size, p, k = x.shape[0], self.spec.image_size, self.spec.input_size, self.spec.num_patches
            ys, xs = self._patch_corners(mask, batch, k, size, p, x.device)
            patches = gather_patches(x, ys, xs, p)  # (B*K, 1, P, P)
            return self._finish(self.patch_ops(patches) if len(self.patch_ops) else patches)

    def eval(self, images: torch.Tensor, small_mask: torch.Tensor | None = None,
             view: tuple[float, float] | None = None) -> torch.Tensor:
        """Deterministic inputs: whole images, or the G x G overlapping grid (B*G*G, C, P, P) per radiograph;
        ``view``: of the (hand-masked) images rotated and zoomed (``view_transform``) before the grid."""
        x = self._to_unit(images, small_mask=small_mask)
        if view is not None:
            x = view_transform(x, *view)
        if not self.spec.is_patch:
            return self._finish(x)
        size, p, g = self.spec.image_size, self.spec.input_size, self.grid
        starts = torch.linspace(0, size - p, g, device=x.device).round().long()  # (G,)
        ys = starts.repeat_interleave(g).expand(x.shape[0], -1)  # (B, G*G)
        xs = starts.repeat(g).expand(x.shape[0], -1)
        return self._finish(gather_patches(x, ys, xs, p))
