"""What a model expects as input; the data side builds its transforms from this, never from hard-coded sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

CONTRAST_MODES = ("none", "stretch")


@dataclass(frozen=True)
class InputSpec:
    """Input of one model.

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
