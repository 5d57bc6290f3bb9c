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
    huber_delta: float = 1.0  # in z units (one standard deviation of the training ages)
    stages: list = field(default_factory=list)  # AG-CNN staged training: [["global", E1], ["local", E2], ...]
    clip_grad: float = 0.0  # max gradient norm (0: off)
    ema: float = 0.0  # EMA decay of the weights (0: off)
    recalibrate_bn: int = 0  # training radiographs over which BatchNorm statistics are recomputed before each
    #   validation, as evaluation sees them (0: off; see bonedist.train.batchnorm)
    # data
    data_mode: str = "auto"  # auto | stream | cache
    workers: int = 2
    cache_share: float = 0.5
    balanced: bool = True
    augment: dict = field(default_factory=dict)  # AugmentConfig fields; {"enabled": False} turns it off
    eval_batch_size: int = 16
    tta_flip: bool = False  # validation (and, by default, evaluation/prediction) averages with the mirrored image
    patch_aggregate: str = "mean"  # patch models: mean | median over the evaluation grid
    steps_per_epoch: int = 0  # cap on batches per epoch (0: a full epoch); for tiny budgets
    time_budget_min: float = 0.0  # wall-clock minutes for the whole run (0: none); staged runs split it by epochs
    # engine
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    sync_every: int = 10  # optimizer steps between the ranks' agreement on a stop signal, the time budget and a
    #   non-finite loss (one small all-reduce and host sync; never per step, which would drain the GPU's queue)
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
                   "patch_aggregate": ("mean", "median"),
                   "precision": ("auto", "bf16", "fp32"), "wandb": ("auto", "online", "offline", "off")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BonedistError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                    f"got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "keep_last", "log_every", "sync_every"):
            if getattr(self, name) < 1:
                raise BonedistError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "clip_grad", "warmup_epochs", "steps_per_epoch", "checkpoint_every",
                     "early_stopping", "workers", "time_budget_min", "recalibrate_bn"):
            if getattr(self, name) < 0:
                raise BonedistError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise BonedistError(f"--ema must be in [0, 1), got {self.ema}")
        if self.lr == 0:
            raise BonedistError("--lr must be positive")
        if self.huber_delta <= 0:
            raise BonedistError(f"--huber-delta must be positive, got {self.huber_delta}")
        self._check_stages()
        self.augment_config()  # validates

    def _check_stages(self) -> None:
        if not self.stages:
            return
        if self.model != "agcnn":
            raise BonedistError(f"--stages is for agcnn (global, local, fusion branches), not {self.model}")
        try:
            stages = [(str(name), int(epochs)) for name, epochs in self.stages]
        except (TypeError, ValueError) as exc:
            raise BonedistError(f"--stages must be NAME:EPOCHS pairs, got {self.stages!r}") from exc
        order = ("global", "local", "fusion")
        names = [name for name, _ in stages]
        if any(n not in order for n in names) or names != sorted(names, key=order.index) or len(set(names)) != len(
                names) or any(e < 1 for _, e in stages):
            raise BonedistError(f"--stages: stages are global, local, fusion in that order, each at least one epoch; "
                                f"got {self.stages!r}")
        self.stages = [list(item) for item in stages]
        total = sum(e for _, e in stages)
        if self.epochs != total:
            raise BonedistError(f"--epochs {self.epochs} does not match the stages' {total} epochs ({self.stages})")

    def stage_at(self, epoch: int) -> str | None:
        """The AG-CNN stage that trains in ``epoch`` (0-based), or None without staging."""
        return self.span_at(epoch)[0]

    def span_at(self, epoch: int) -> tuple[str | None, int, int]:
        """The span of ``stage_spans`` holding ``epoch`` (the last one past the end)."""
        spans = self.stage_spans()
        return next((s for s in spans if s[1] <= epoch < s[1] + s[2]), spans[-1])

    def stage_spans(self) -> list[tuple[str | None, int, int]]:
        """(stage, first epoch, epochs) for each stage; one span over all epochs without staging."""
        spans, start = [], 0
        for name, epochs in self.stages or [[None, self.epochs]]:
            spans.append((name, start, epochs))
            start += epochs
        return spans

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
        cfg.update(pretrained=None, freeze_backbone=False, feature_norm=True)
    if model == "inception_v3":
        cfg["image_size"] = 96  # Inception's stem needs at least 75 px
    if model == "resnet50_patch":
        cfg.update(patch_size=48, num_patches=3)
    if model == "agcnn":
        cfg.update(drop_rate=0.1, fusion_norm=True)
    return dict(epochs=3, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=1e-4, scheduler="cosine",
                warmup_epochs=0.2, early_stopping=0, eval_batch_size=32, workers=1, data_mode="cache",
                recalibrate_bn=1024,
                augment={"rotation": 5.0, "translate": (0.05, 0.05), "scale": (1.0, 1.0), "shear": 0.0, "hflip": 0.0},
                model_cfg=cfg, log_every=5)


def _improved(model: str) -> dict:
    """Aiming at challenge-level accuracy (RSNA 2017 winners: 4.2-4.5 months MAE), beyond the paper:

    - every model sees hand-masked radiographs (markers and letters zeroed, ``bonedist.data.handmask``);
    - InceptionV3 / Xception / ResNet50-patch: ImageNet backbones fine-tuned end to end, backbone at a tenth of the
      head's learning rate, AdamW + cosine with one warmup epoch, EMA of the weights, L1 loss (the MAE the challenge
      scored), gradient clipping, 30 epochs, batch 16 at 500 px;
    - ResNet50-patch at the second-place team's setting: 49 patches of 224 px per radiograph in training and the
      7 x 7 overlapping grid in evaluation, aggregated by the median;
    - AG-CNN with the hand mask, ``max`` channel reduction and staged training after Guan et al.: global branch
      (15 epochs), then the local branch on the fixed global branch's crops (10), then the Fusion head (5);
    - validation, evaluation and prediction average each image with its mirror; `bonedist evaluate` fits the
      ensemble weights on the validation split.
    """
    common = dict(optimizer="adamw", weight_decay=0.01, scheduler="cosine", warmup_epochs=1.0, early_stopping=0,
                  ema=0.999, loss="l1", clip_grad=1.0, tta_flip=True, eval_batch_size=32, recalibrate_bn=1024)
    if model == "agcnn":
        return dict(common, epochs=30, batch_size=16, lr=3e-4, stages=[["global", 15], ["local", 10], ["fusion", 5]],
                    model_cfg={"image_size": 500, "hand_mask": True, "reduction": "max", "threshold": "otsu",
                               "fusion_grad": "isolated", "fusion_norm": True})
    cfg = {"pretrained": "default", "freeze_backbone": False, "image_size": 500, "hand_mask": True,
           "feature_norm": True}
    values = dict(common, epochs=30, batch_size=16, lr=1e-3, backbone_lr=1e-4, model_cfg=cfg)
    if model == "resnet50_patch":
        cfg.update(patch_size=224, num_patches=49, eval_grid=7)
        values.update(batch_size=8, patch_aggregate="median")
    return values


def _scratch(model: str) -> dict:
    """No ImageNet weights (offline clusters, small images): every model from random initialisation."""
    cfg: dict = {"image_size": 256, "contrast": "stretch"}
    if model in MODELS_PRETRAINED:
        cfg.update(pretrained=None, freeze_backbone=False, feature_norm=True)
    values = dict(epochs=12, batch_size=64, optimizer="adamw", lr=2e-3, weight_decay=1e-4, scheduler="cosine",
                  warmup_epochs=3.6, early_stopping=0, loss="l1", clip_grad=0.0, tta_flip=True, balanced=False,
                  recalibrate_bn=1024, eval_batch_size=64, model_cfg=cfg,
                  augment={"rotation": 10.0, "translate": (0.06, 0.06), "scale": (0.9, 1.1), "shear": 0.0,
                           "hflip": 0.5})
    if model == "resnet50_patch":
        cfg.update(patch_size=128, num_patches=4, eval_grid=3)
    if model == "agcnn":
        cfg.update(reduction="max", fusion_norm=True, drop_rate=0.1)
        values.update(stages=[["global", 6], ["local", 4], ["fusion", 2]])
    return values


PRESETS = {"paper": _paper, "improved": _improved, "scratch": _scratch, "tiny": _tiny}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def scale_stages(stages: list, epochs: int) -> list:
    """The same stages stretched or shrunk to ``epochs`` in total (each keeps at least one epoch)."""
    if epochs < len(stages):
        raise BonedistError(f"--epochs {epochs}: staged training needs at least one epoch per stage "
                            f"({', '.join(name for name, _ in stages)})")
    total = sum(e for _, e in stages)
    scaled = [[name, max(1, round(e * epochs / total))] for name, e in stages]
    scaled[0][1] += epochs - sum(e for _, e in scaled)  # rounding goes to the first stage
    while scaled[0][1] < 1:  # a tiny budget: take from the longest later stage
        longest = max(range(1, len(scaled)), key=lambda i: scaled[i][1])
        scaled[longest][1] -= 1
        scaled[0][1] += 1
    return scaled


def scale_patch(patch_size: int, image_size: int, new_image_size: int) -> int:
    """A preset's patch side at another image size: the same share of the radiograph (at least 8 px)."""
    return min(new_image_size, max(8, round(patch_size * new_image_size / image_size)))


def resolve_config(model: str, shards: str, preset: str = "paper", **overrides) -> TrainConfig:
    """Preset values for ``model``, then ``overrides`` (``model_cfg`` and ``augment`` are merged key by key)."""
    from bonedist.models import list_models

    if model not in list_models():
        raise BonedistError(f"unknown model {model!r}; known models: {', '.join(list_models())}")
    if preset not in PRESETS:
        raise BonedistError(f"unknown preset {preset!r}; presets: {', '.join(list_presets())}")
    values = PRESETS[preset](model)
    if values.get("stages") and overrides.get("epochs") and not overrides.get("stages"):
        values["stages"] = scale_stages(values["stages"], overrides["epochs"])
    preset_model = values.get("model_cfg", {})
    for key in ("model_cfg", "augment"):
        values[key] = {**values.get(key, {}), **(overrides.pop(key, None) or {})}
    model_cfg = values["model_cfg"]
    if model_cfg.get("patch_size") and model_cfg.get("image_size") != preset_model.get("image_size") and \
            model_cfg["patch_size"] == preset_model.get("patch_size"):
        model_cfg["patch_size"] = scale_patch(model_cfg["patch_size"], preset_model["image_size"],
                                              model_cfg["image_size"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict({"model": model, "shards": shards, "preset": preset, **values})
