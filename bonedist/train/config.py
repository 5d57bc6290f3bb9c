"""Typed, validated training configuration and the named presets it is built from.

A run's configuration is: the preset's values for the model, then explicit command-line overrides. The resolved
config is written to ``runs/EXPERIMENT/MODEL/config.json`` and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field

from bonedist import BonedistError

LOSSES = ("mse", "l1", "huber")  # on z (bonedist.models.task.pointwise_loss)


def option(default, help: str, choices: tuple | None = None, group: str = "", minimum: float | None = None,
           cli: bool = True, flag: str | None = None):
    """A ``TrainConfig`` field with its help text, allowed values, flag group and lower bound, from which
    ``bonedist train``'s flags and the validation are both made (the field is written once)."""
    meta = {"help": help, "choices": choices, "group": group, "minimum": minimum, "cli": cli, "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"


OPT, DATA, VAL, ENGINE, RUN = "optimisation", "data", "validation", "engine", "checkpoints and tracking"


@dataclass
class TrainConfig:
    """Everything a training run needs; bad values raise ``BonedistError`` naming the flag, before anything is
    written. Presets (below) give values per model; command-line flags override them."""

    model: str = option("", "a model of `bonedist models`", cli=False)
    shards: str = option("", "a folder written by `bonedist pack`", cli=False)
    preset: str = option("paper", "named starting values", cli=False)
    experiment: str = option("default", "runs/EXPERIMENT/MODEL; also the W&B group")
    runs_dir: str = option("runs", "where run folders go")
    model_cfg: dict = option({}, "options of the model's factory (pretrained, image_size, ...)", cli=False)
    # optimisation
    epochs: int = option(7, "epochs (a staged run: the sum of its stages, rescaled if given)", group=OPT, minimum=1)
    batch_size: int = option(8, "radiographs per process and step (patch models see batch x patches inputs)",
                             group=OPT, minimum=1)
    grad_accum: int = option(1, "micro-steps per optimizer step", group=OPT, minimum=1)
    optimizer: str = option("adam", "optimizer", ("adam", "adamw"), OPT)
    lr: float = option(1e-3, "learning rate (the head's, when the backbone has its own)", group=OPT, minimum=1e-12)
    backbone_lr: float | None = option(None, "an unfrozen backbone's learning rate (default: --lr)", group=OPT,
                                       minimum=0)
    weight_decay: float = option(0.0, "weight decay", group=OPT, minimum=0)
    scheduler: str = option("plateau", "learning-rate schedule", ("plateau", "cosine", "constant"), OPT)
    warmup_epochs: float = option(0.0, "linear warmup of the cosine, in epochs of each stage", group=OPT, minimum=0)
    plateau_factor: float = option(0.2, "plateau: factor on the learning rate", group=OPT, minimum=0)
    plateau_patience: int = option(1, "plateau: epochs without improvement before lowering", group=OPT, minimum=0)
    early_stopping: int = option(3, "epochs without improvement before stopping (0: off)", group=OPT, minimum=0)
    loss: str = option("mse", "loss on z-scored ages", LOSSES, OPT)
    huber_delta: float = option(1.0, "huber: delta in z units (one standard deviation of the ages)", group=OPT,
                                minimum=1e-9)
    stages: list = option([], "staged training, NAME:EPOCHS,... (e.g. global:15,local:10,fusion:5)", group=OPT,
                          cli=False)
    clip_grad: float = option(0.0, "max gradient norm (0: off)", group=OPT, minimum=0)
    ema: float = option(0.0, "EMA decay of the weights, validated and kept as best/ (0: off)", group=OPT, minimum=0)
    recalibrate: int = option(0, "training radiographs (a fixed random sample, seen as evaluation sees them) on "
                                 "which, before each validation, BatchNorm statistics are recomputed and the output "
                                 "offset refit (0: off; see bonedist.train.batchnorm)", group=OPT, minimum=0)
    # data
    data_mode: str = option("auto", "cache the split on the device, stream shards, or choose by free memory",
                            ("auto", "stream", "cache"), DATA)
    workers: int = option(2, "DataLoader workers per process (stream mode)", group=DATA, minimum=0)
    cache_share: float = option(0.5, "share of free device memory --data-mode auto may cache in", group=DATA,
                                minimum=1e-9)
    balanced: bool = option(True, "re-sample to uniform age bins x sex (the paper)", group=DATA, flag="--balance")
    augment: dict = option({}, "AugmentConfig fields; {'enabled': False} turns it off", group=DATA, cli=False)
    steps_per_epoch: int = option(0, "cap on batches per epoch (0: a full epoch)", group=DATA, minimum=0)
    time_budget_min: float = option(0.0, "wall-clock minutes for the run: training stops (and warmup and cosine "
                                         "follow the clock) on time; stages get their share (0: none)",
                                    group=DATA, minimum=0)
    # validation
    eval_batch_size: int = option(16, "radiographs per validation batch", group=VAL, minimum=1)
    tta_flip: bool = option(False, "average each image with its mirror (also evaluate's and predict's default)",
                            group=VAL)
    patch_aggregate: str = option("mean", "patch models: how the evaluation grid's predictions become one",
                                  ("mean", "median"), VAL)
    # engine
    precision: str = option("auto", "auto: accelerate launch's --mixed_precision if given, else bf16 on CUDA and "
                                    "fp32 on a CPU", ("auto", "bf16", "fp32"), ENGINE)
    channels_last: bool | None = option(None, "channels_last memory format (default: on with CUDA)", group=ENGINE)
    compile: bool = option(False, "torch.compile the model", group=ENGINE)
    sync_bn: bool = option(False, "SyncBatchNorm across GPUs", group=ENGINE)
    seed: int = option(0, "seed of sampling, augmentation and initialisation", group=ENGINE)
    sync_every: int = option(10, "optimizer steps between the ranks' agreement on a stop signal, the time budget "
                                 "and a non-finite loss (one all-reduce and host sync)", group=ENGINE, minimum=1)
    # checkpoints and tracking
    checkpoint_every: int = option(0, "optimizer steps between mid-epoch checkpoints (0: at epoch ends)", group=RUN,
                                   minimum=0)
    keep_last: int = option(2, "step checkpoints kept", group=RUN, minimum=1)
    save_dtype: str = option("fp32", "precision of best/'s weights (fp16 halves them)", ("fp32", "fp16"), RUN)
    resume: str = option("auto", "auto (the latest checkpoint), never, or a checkpoint folder", group=RUN)
    wandb: str = option("auto", "W&B: auto is offline without an API key or network",
                        ("auto", "online", "offline", "off"), RUN)
    wandb_project: str = option("bonedist", "W&B project", group=RUN)
    log_every: int = option(10, "optimizer steps between step-level log records", group=RUN, minimum=1)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            flag = flag_of(f)
            if meta.get("choices") and value not in meta["choices"]:
                raise BonedistError(f"{flag} must be one of {', '.join(meta['choices'])}, got {value!r}")
            if meta.get("minimum") is not None and value is not None and value < meta["minimum"]:
                low = meta["minimum"]
                bound = ">= 0" if low == 0 else "positive" if low < 1e-6 else f"at least {low:g}"
                raise BonedistError(f"{flag} must be {bound}, got {value}")
        if self.ema >= 1.0:
            raise BonedistError(f"--ema must be in [0, 1), got {self.ema}")
        if self.cache_share > 1.0:
            raise BonedistError(f"--cache-share must be in (0, 1], got {self.cache_share}")
        self._check_stages()
        self.augment_config()  # validates

    def _check_stages(self) -> None:
        if not self.stages:
            return
        from bonedist.models import list_models, model_info

        order = model_info(self.model).task.stages
        if not order:
            staged = [m for m in list_models() if model_info(m).task.stages]
            raise BonedistError(f"--stages is for models with branches trained one after another "
                                f"({', '.join(staged) or 'none registered'}), not {self.model}")
        try:
            stages = [(str(name), int(epochs)) for name, epochs in self.stages]
        except (TypeError, ValueError) as exc:
            raise BonedistError(f"--stages must be NAME:EPOCHS pairs, got {self.stages!r}") from exc
        names = [name for name, _ in stages]
        if any(n not in order for n in names) or names != sorted(names, key=order.index) or len(set(names)) != len(
                names) or any(e < 1 for _, e in stages):
            raise BonedistError(f"--stages: {self.model}'s stages are {', '.join(order)} in that order, each at "
                                f"least one epoch; got {self.stages!r}")
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

    def augment_config(self):
        from bonedist.data.augment import AugmentConfig

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


def _pretrained(model: str) -> bool:
    from bonedist.models import model_info

    return model_info(model).pretrained


# ---------------------------------------------------------------------------------------------------------------
# Presets: plain functions returning overrides for one model.


def _paper(model: str) -> dict:
    """The paper, as written: frozen ImageNet backbones, Adam 1e-3 + plateau + early stopping, 7 epochs, batch 8;
    AG-CNN from scratch, 16 epochs, constant Adam 1e-5, batch 8; 3 patches of 224 for ResNet50-patch."""
    if model == "agcnn":
        return dict(epochs=16, batch_size=8, optimizer="adam", lr=1e-5, scheduler="constant", early_stopping=0,
                    model_cfg={"image_size": 500, "fusion_grad": "isolated", "reduction": "sum",
                               "threshold": "otsu"})
    cfg = {"image_size": 500}
    if _pretrained(model):
        cfg.update(pretrained="default", freeze_backbone=True)
    if model == "resnet50_patch":
        cfg.update(patch_size=224, num_patches=3)
    return dict(epochs=7, batch_size=8, optimizer="adam", lr=1e-3, scheduler="plateau", early_stopping=3,
                model_cfg=cfg)


def _tiny(model: str) -> dict:
    """CPU tests and the demo: small images, random init, fine-tuned end to end, a few hundred steps."""
    cfg: dict = {"image_size": 64}
    if _pretrained(model):
        cfg.update(pretrained=None, freeze_backbone=False, feature_norm=True)
    if model == "inception_v3":
        cfg["image_size"] = 96  # Inception's stem needs at least 75 px
    if model == "resnet50_patch":
        cfg.update(patch_size=48, num_patches=3)
    if model == "agcnn":
        cfg.update(drop_rate=0.1, fusion_norm=True)
    return dict(epochs=3, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=1e-4, scheduler="cosine",
                warmup_epochs=0.2, early_stopping=0, eval_batch_size=32, workers=1, data_mode="cache",
                recalibrate=1024,
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
                  ema=0.999, loss="l1", clip_grad=1.0, tta_flip=True, eval_batch_size=32, recalibrate=1024)
    if model == "agcnn":
        return dict(common, epochs=30, batch_size=16, lr=3e-4, stages=[["global", 15], ["local", 10], ["fusion", 5]],
                    model_cfg={"image_size": 500, "hand_mask": True, "reduction": "max", "threshold": "otsu",
                               "fusion_grad": "isolated", "fusion_norm": True})
    cfg = {"image_size": 500, "hand_mask": True}
    if _pretrained(model):
        cfg.update(pretrained="default", freeze_backbone=False, feature_norm=True)
    values = dict(common, epochs=30, batch_size=16, lr=1e-3, backbone_lr=1e-4, model_cfg=cfg)
    if model == "resnet50_patch":
        cfg.update(patch_size=224, num_patches=49, eval_grid=7)
        values.update(batch_size=8, patch_aggregate="median")
    return values


def _scratch(model: str) -> dict:
    """No ImageNet weights (offline clusters, small images): every model from random initialisation."""
    cfg: dict = {"image_size": 256, "contrast": "stretch"}
    if _pretrained(model):
        cfg.update(pretrained=None, freeze_backbone=False, feature_norm=True)
    values = dict(epochs=12, batch_size=64, optimizer="adamw", lr=2e-3, weight_decay=1e-4, scheduler="cosine",
                  warmup_epochs=3.6, early_stopping=0, loss="l1", clip_grad=0.0, tta_flip=True, balanced=False,
                  recalibrate=1024, eval_batch_size=64, model_cfg=cfg,
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
