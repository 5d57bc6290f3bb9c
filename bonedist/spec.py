"""What a model sees: the input settings of a run (``InputConfig``, flags and presets), its training augmentation
(``AugmentConfig``) and, resolved against the model, the exact input spec the data side builds its transforms from
(``InputSpec``), never hard-coded sizes. Light on purpose: the CLI and ``--print-config`` read it without torch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from bonedist import BonedistError
from bonedist.options import check_fields, option

CONTRAST_MODES = ("none", "stretch")
MIN_PATCH = 8  # the smallest patch side a preset's share may give
INPUT = "input"


def tta_views(rotate: float = 0.0, scale: float = 0.0) -> tuple[tuple[float, float], ...]:
    """The views a model's test-time averaging sees beside the radiograph itself, as (degrees, zoom) about its
    centre: rotated by -``rotate`` and +``rotate`` degrees and zoomed by 1 -/+ ``scale`` (Deeplasia's rotations;
    each also mirrored when the flip is on). 0 leaves that kind out."""
    if rotate < 0 or not 0 <= scale < 1:
        raise BonedistError(f"test-time views: rotation {rotate} must be >= 0 degrees and zoom {scale} in [0, 1)")
    views = [(0.0, 1.0)]
    if rotate:
        views += [(-float(rotate), 1.0), (float(rotate), 1.0)]
    if scale:
        views += [(0.0, 1.0 - float(scale)), (0.0, 1.0 + float(scale))]
    return tuple(views)


VIEWS_RULE = "a list of [degrees, zoom] pairs starting with [0, 1] (|degrees| <= 45, zoom 0.5-1.5)"


def valid_views(views) -> bool:
    """Whether ``views`` (read back from a run's meta.json or a bundle) is a list of views as ``tta_views`` makes
    them (``VIEWS_RULE``)."""
    return (isinstance(views, list) and bool(views) and views[0] == [0.0, 1.0]
            and all(isinstance(v, list) and len(v) == 2 and all(isinstance(t, (int, float)) for t in v)
                    and abs(v[0]) <= 45 and 0.5 <= v[1] <= 1.5 for v in views))


@dataclass
class InputConfig:
    """The input settings of a run; a preset gives them, flags override them, ``InputSpec.resolve`` applies them to a
    model (its channels, normalisation and minimum input size)."""

    image_size: int = option(500, "radiograph side the model sees (the packed images are resized to it)", group=INPUT,
                             minimum=8)
    channels: int | None = option(None, "input channels: 1, or 3 (the gray image repeated, as ImageNet backbones "
                                        "expect); default: the model's first choice", (1, 3), INPUT)
    hand_mask: bool = option(False, "zero everything outside the hand (markers, letters) before the model sees it",
                             group=INPUT)
    contrast: str = option("none", "stretch: each radiograph's own 1st-99th percentile range to the full range first",
                           CONTRAST_MODES, INPUT)
    patch_size: int = option(0, "patch models: patch side in pixels (0: --patch-share of the image side)",
                             group=INPUT, minimum=0)
    patch_share: float = option(0.0, "patch models: patch side as a share of the image side (the presets' way, so "
                                     "that patches scale with --image-size); 0 and no --patch-size: whole images",
                                group=INPUT, minimum=0, maximum=1)
    num_patches: int = option(0, "patch models: random patches per radiograph in training", group=INPUT, minimum=0)
    eval_grid: int = option(0, "patch models: G for the G x G overlapping evaluation grid (0: just enough patches to "
                               "cover the image, overlapping)", group=INPUT, minimum=0)

    def __post_init__(self):
        check_fields(self)
        if self.patched and self.num_patches < 1:
            raise BonedistError("--num-patches must be at least 1 when the model sees patches (--patch-size or "
                                "--patch-share)")

    @property
    def patched(self) -> bool:
        return bool(self.patch_size or self.patch_share)

    def patch_side(self, image_size: int) -> int:
        """The patch side at ``image_size``: ``patch_size``, else the share of the side (at least 8 px)."""
        if self.patch_size:
            return min(image_size, self.patch_size)
        return min(image_size, max(MIN_PATCH, round(self.patch_share * image_size)))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InputSpec:
    """Input of one model, resolved: what the data side prepares and the network receives.

    Attributes:
        image_size: side of the square radiograph the data side prepares (the packed size is resized to this).
        input_size: side of what the network itself sees: ``image_size`` for whole-image models, the patch side
            for patch models.
        channels: 1 (grayscale) or 3 (grayscale repeated, for ImageNet backbones).
        mean, std: per-channel normalisation of pixels scaled to [0, 1]; mean = std = 0.5 maps to [-1, 1].
        num_patches: patches drawn per radiograph in training (None: whole image).
        eval_grid: patches per side of the deterministic overlapping evaluation grid (patch models only).
        hand_mask: zero everything outside the hand (``bonedist.data.handmask``) before augmentation and patches,
            in training, evaluation and prediction alike.
        contrast: ``"none"``, or ``"stretch"``: each radiograph's own 1st-99th percentile range is stretched to the
            full range first, so that exposure and processing differences between hospitals (RSNA ids below ~4200
            have half the contrast of the rest) are not something the model must learn to ignore.
    """

    image_size: int
    input_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_patches: int | None = None
    eval_grid: int | None = None
    hand_mask: bool = False
    contrast: str = "none"

    def __post_init__(self):
        for name in ("image_size", "input_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number of pixels, got {value!r}")
        for name in ("num_patches", "eval_grid"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive whole number or absent, got {value!r}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (*self.mean, *self.std)) or \
                min(self.std, default=1) <= 0:
            raise ValueError(f"mean and std must be finite numbers and std above 0, got {self.mean}, {self.std}")
        if self.contrast not in CONTRAST_MODES:
            raise ValueError(f"contrast must be one of {', '.join(CONTRAST_MODES)}, got {self.contrast!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.input_size > self.image_size:
            raise ValueError(f"input_size {self.input_size} exceeds image_size {self.image_size}")

    @property
    def is_patch(self) -> bool:
        return self.num_patches is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> InputSpec:
        if not isinstance(data, dict):
            raise ValueError(f"the input spec must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ValueError(f"unknown input spec field(s) {', '.join(unknown)}")
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})

    @classmethod
    def resolve(cls, cfg: InputConfig, channels: int, norm: tuple[tuple, tuple] | None = None,
                min_size: int = 0) -> InputSpec:
        """The spec of a model with ``channels`` inputs, normalisation ``norm`` (mean, std; default [-1, 1]) and a
        smallest input side ``min_size`` (InceptionV3's stem: 75 px; smaller radiographs are resized up to it)."""
        mean, std = norm or ((0.5,) * channels, (0.5,) * channels)
        size = max(cfg.image_size, min_size)
        if not cfg.patched:
            return cls(size, size, channels, tuple(mean), tuple(std), hand_mask=cfg.hand_mask, contrast=cfg.contrast)
        patch = max(cfg.patch_side(size), min_size)
        return cls(max(size, patch), patch, channels, tuple(mean), tuple(std), num_patches=cfg.num_patches,
                   eval_grid=cfg.eval_grid or None, hand_mask=cfg.hand_mask, contrast=cfg.contrast)


@dataclass
class AugmentConfig:
    """Training augmentation; the defaults are the paper's Table 2 (Keras ImageDataGenerator semantics)."""

    rotation: float = 5.0  # degrees, +-
    translate: tuple[float, float] = (0.1, 0.1)  # fraction of width, height
    shear: float = 0.01  # degrees, as Keras' shear_range
    scale: tuple[float, float] = (0.75, 1.25)  # Keras zoom_range 0.25
    hflip: float = 0.5  # probability
    patch_rotation: float = 5.0  # the paper's patch loader: rotation and flip only
    patch_hflip: float = 0.5
    enabled: bool = True

    def __post_init__(self):
        self.translate, self.scale = tuple(self.translate), tuple(self.scale)
        if self.rotation < 0 or self.shear < 0 or self.patch_rotation < 0:
            raise BonedistError("augmentation rotation/shear ranges must be >= 0")
        if not all(0 <= t < 1 for t in self.translate):
            raise BonedistError(f"translate must be fractions in [0, 1), got {self.translate}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise BonedistError(f"scale must be 0 < low <= high, got {self.scale}")
        if not (0 <= self.hflip <= 1 and 0 <= self.patch_hflip <= 1):
            raise BonedistError("flip probabilities must be in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(rotation=0, translate=(0, 0), shear=0, scale=(1, 1), hflip=0, patch_rotation=0, patch_hflip=0)
