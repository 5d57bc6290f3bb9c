"""Typed, validated training configuration and the named presets it is built from.

A run's configuration is: the preset's values for the model, then explicit command-line overrides. The resolved
config is written to ``runs/EXPERIMENT/MODEL/config.json`` and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field

from bonedist import BonedistError
from bonedist.data.augment import AugmentConfig

MODELS_PRETRAINED = ("inception_v3", "xception", "resnet50_patch")


@dataclass
class TrainConfig:
    """Everything a training run needs; bad values raise ``BonedistError`` naming the flag."""

    model: str
    shards: str
    preset: str = "paper"
    experiment: str = "default"
    runs_dir: str = "runs"
    model_cfg: dict = field(default_factory=dict)  # passed to create_model (pretrained, freeze_backbone, sizes...)
    # optimisation
    epochs: int = 7
    batch_size: int = 8  # radiographs per process and step (patch models see batch_size * num_patches inputs)
    grad_accum: int = 1
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-3
    backbone_lr: float | None = None  # unfrozen backbones (None: same as lr)
    weight_decay: float = 0.0
    scheduler: str = "plateau"  # plateau | cosine | constant
    warmup_epochs: float = 0.0
    plateau_factor: float = 0.2
    plateau_patience: int = 1
    early_stopping: int = 3  # epochs without improvement before stopping (0: off)
    loss: str = "mse"  # mse | l1 | huber (on z)
    clip_grad: float = 0.0  # max gradient norm (0: off)
    ema: float = 0.0  # EMA decay of the weights (0: off)
    # data
    data_mode: str = "auto"  # auto | stream | cache
    workers: int = 2
    cache_share: float = 0.5
    balanced: bool = True
    augment: dict = field(default_factory=dict)  # AugmentConfig fields; {"enabled": False} turns it off
    eval_batch_size: int = 16
    steps_per_epoch: int = 0  # cap on batches per epoch (0: a full epoch); for tiny budgets
    # engine
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    # checkpoints and tracking
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: epoch ends only)
    keep_last: int = 2
    resume: str = "auto"  # auto | never | PATH of a checkpoint folder
    wandb: str = "auto"  # auto (offline without an API key or network) | online | offline | off
    wandb_project: str = "bonedist"
    log_every: int = 10

    def __post_init__(self):
        choices = {"optimizer": ("adam", "adamw"), "scheduler": ("plateau", "cosine", "constant"),
                   "loss": ("mse", "l1", "huber"), "data_mode": ("auto", "stream", "cache"),
                   "precision": ("auto", "bf16", "fp32"), "wandb": ("auto", "online", "offline", "off")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BonedistError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                    f"got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise BonedistError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "clip_grad", "warmup_epochs", "steps_per_epoch", "checkpoint_every",
                     "early_stopping", "workers"):
            if getattr(self, name) < 0:
                raise BonedistError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise BonedistError(f"--ema must be in [0, 1), got {self.ema}")
        if self.lr == 0:
            raise BonedistError("--lr must be positive")
        self.augment_config()  # validates

    def augment_config(self) -> AugmentConfig:
        try:
            return AugmentConfig(**self.augment)
        except TypeError as exc:
            raise BonedistError(f"unknown augmentation option: {exc}") from exc

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise BonedistError(f"unknown training options {sorted(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------------
# Presets: plain functions returning overrides for one model.


def _paper(model: str) -> dict:
    """The paper, as written: frozen ImageNet backbones, Adam 1e-3 + plateau + early stopping, 7 epochs, batch 8;
    AG-CNN from scratch, 16 epochs, constant Adam 1e-5, batch 8; 3 patches of 224 for ResNet50-patch."""
    if model == "agcnn":
        return dict(epochs=16, batch_size=8, optimizer="adam", lr=1e-5, scheduler="constant", early_stopping=0,
                    model_cfg={"image_size": 500, "fusion_grad": "isolated", "reduction": "sum",
                               "threshold": "otsu"})
    cfg = {"pretrained": "default", "freeze_backbone": True, "image_size": 500}
    if model == "resnet50_patch":
        cfg.update(patch_size=224, num_patches=3)
    return dict(epochs=7, batch_size=8, optimizer="adam", lr=1e-3, scheduler="plateau", early_stopping=3,
                model_cfg=cfg)


def _tiny(model: str) -> dict:
    """CPU tests and the demo: small images, random init, fine-tuned end to end, a few hundred steps."""
    cfg: dict = {"image_size": 64}
    if model in MODELS_PRETRAINED:
        cfg.update(pretrained=None, freeze_backbone=False)
    if model == "inception_v3":
        cfg["image_size"] = 96  # Inception's stem needs at least 75 px
    if model == "resnet50_patch":
        cfg.update(patch_size=48, num_patches=3)
    if model == "agcnn":
        cfg.update(drop_rate=0.1, fusion_norm=True)
    return dict(epochs=3, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=1e-4, scheduler="cosine",
                warmup_epochs=0.2, early_stopping=0, eval_batch_size=32, workers=1, data_mode="cache",
                augment={"rotation": 5.0, "translate": (0.05, 0.05), "scale": (1.0, 1.0), "shear": 0.0, "hflip": 0.0},
                model_cfg=cfg, log_every=5)


PRESETS = {"paper": _paper, "tiny": _tiny}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def resolve_config(model: str, shards: str, preset: str = "paper", **overrides) -> TrainConfig:
    """Preset values for ``model``, then ``overrides`` (``model_cfg`` and ``augment`` are merged key by key)."""
    from bonedist.models import list_models

    if model not in list_models():
        raise BonedistError(f"unknown model {model!r}; known models: {', '.join(list_models())}")
    if preset not in PRESETS:
        raise BonedistError(f"unknown preset {preset!r}; presets: {', '.join(list_presets())}")
    values = PRESETS[preset](model)
    for key in ("model_cfg", "augment"):
        values[key] = {**values.get(key, {}), **(overrides.pop(key, None) or {})}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict({"model": model, "shards": shards, "preset": preset, **values})
