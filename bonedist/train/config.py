"""Typed, validated training configuration, resolved from a preset, the model's recipe for it and flags.

A run's configuration is: the preset's shared values (``bonedist.train.presets``), then the model's recipe for that
preset (in the model's own file), then explicit overrides (flags). The resolved config is written to
``runs/EXPERIMENT/RUN/config.json`` (RUN: ``--run-name``, by default the model's name) and into every
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from bonedist import BonedistError
from bonedist.choices import (
    CALIBRATIONS,
    DATA_MODES,
    LOSSES,
    OPTIMIZERS,
    PATCH_AGGREGATES,
    PRECISIONS,
    SCHEDULES,
    WANDB_MODES,
)
from bonedist.options import build, check_fields, option
from bonedist.spec import InputConfig
from bonedist.train.presets import list_presets, preset_values

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
OPT, DATA, VAL, ENGINE, RUN = "optimisation", "data", "validation", "engine", "checkpoints and tracking"


@dataclass
class TrainConfig:
    """Everything a training run needs; bad values raise ``BonedistError`` naming the flag, before anything is
    written. Presets (below) give values per model; command-line flags override them."""

    model: str = option("", "a model of `bonedist models`", cli=False)
    shards: str = option("", "a folder written by `bonedist pack`", cli=False)
    preset: str = option("paper", "named starting values", cli=False)
    experiment: str = option("default", "runs/EXPERIMENT/RUN (RUN: --run-name, default the model); also the W&B "
                                        "group")
    runs_dir: str = option("runs", "where run folders go")
    run_name: str | None = option(None, "the run's folder under runs/EXPERIMENT and its row in evaluate's tables "
                                        "and ensembles (default: the model's name); another seed of the same model "
                                        "beside it, e.g. resnet18-2 with --seed 1000, is a separate ensemble member")
    model_options: dict = option({}, "the model's own options (its dataclass; flags in the model group)", cli=False)
    input: InputConfig = option(None, "input settings (InputConfig; flags in the input group)", cli=False)
    # optimisation
    epochs: int = option(7, "epochs (a staged run: the sum of its stages, rescaled if given)", group=OPT, minimum=1)
    batch_size: int = option(8, "radiographs per process and step (patch models see batch x patches inputs)",
                             group=OPT, minimum=1)
    grad_accum: int = option(1, "micro-steps per optimizer step", group=OPT, minimum=1)
    optimizer: str = option("adam", "optimizer", OPTIMIZERS, OPT)
    lr: float = option(1e-3, "learning rate (the head's, when the backbone has its own)", group=OPT, minimum=1e-12)
    backbone_lr: float | None = option(None, "an unfrozen backbone's learning rate (default: --lr)", group=OPT,
                                       minimum=0)
    weight_decay: float = option(0.0, "weight decay", group=OPT, minimum=0)
    scheduler: str = option("plateau", "learning-rate schedule", SCHEDULES, OPT)
    warmup_epochs: float = option(0.0, "linear warmup of the cosine, in epochs of each stage", group=OPT, minimum=0)
    plateau_factor: float = option(0.2, "plateau: factor on the learning rate", group=OPT, minimum=0)
    plateau_patience: int = option(1, "plateau: epochs without improvement before lowering", group=OPT, minimum=0)
    early_stopping: int = option(3, "epochs without improvement before stopping (0: off)", group=OPT, minimum=0)
    loss: str = option("mse", "loss on z-scored ages (bonedist.train.losses)", LOSSES, OPT)
    huber_delta: float = option(1.0, "huber: delta in z units (one standard deviation of the ages)", group=OPT,
                                minimum=1e-9)
    stages: list = option([], "staged training, NAME:EPOCHS,... (e.g. global:15,local:10,fusion:5)", group=OPT,
                          cli=False)
    clip_grad: float = option(0.0, "max gradient norm (0: off)", group=OPT, minimum=0)
    ema: float = option(0.0, "EMA decay of the weights, validated and kept as best/ (0: off)", group=OPT, minimum=0)
    swa: float = option(0.0, "SWA: the uniform mean of the weights over the cosine's tail from this share of it on "
                              "(e.g. 0.75), validated and kept as best/ in the EMA's place (0: off)", group=OPT,
                        minimum=0)
    low_res: int = option(0, "progressive resizing: train on radiographs downsampled to this side until "
                             "--low-res-until of the cosine cycle, then at the image size (validation always at the "
                             "image size; 0: off)", group=OPT, minimum=0)
    low_res_until: float = option(0.5, "the share of the cosine cycle trained at --low-res", group=OPT, minimum=0.0,
                                  maximum=1.0)
    mixup: float = option(0.0, "C-Mixup: blend each training radiograph and its z target with a partner of the "
                               "same sex and similar age, by Beta(this, this) weights (e.g. 0.4; 0: off; "
                               "bonedist.train.mixup)", group=OPT, minimum=0.0)
    mixup_bandwidth: float = option(0.2, "C-Mixup: the partner kernel's width, in standard deviations of the ages",
                                    group=OPT, minimum=1e-9)
    teacher: str | None = option(None, "distill: a table of a teacher's predictions for the training radiographs "
                                       "(`bonedist evaluate --runs TEACHER --split train`'s report/predictions.csv,"
                                       " or a CSV with key and months), learnt beside the labels", group=OPT)
    teacher_column: str | None = option(None, "the teacher table's column (default: ensemble_fitted, "
                                              "ensemble_equal, or its only model)", group=OPT)
    distill: float | None = option(None, "the teacher's share of the loss, the labels' the rest (default with "
                                         "--teacher: 0.5)", group=OPT, minimum=0.0, maximum=1.0)
    recalibrate: int = option(0, "training radiographs (a fixed random sample, seen as evaluation sees them) on "
                                 "which, before each validation, BatchNorm statistics are recomputed and the output "
                                 "calibration refit (0: off; see bonedist.train.batchnorm)", group=OPT, minimum=0)
    calibration: str = option("offset", "what is refit on those radiographs: the output's offset, or a line "
                                        "(slope and offset, Deeplasia's)", CALIBRATIONS, OPT)
    # data
    data_mode: str = option("auto", "cache the split on the device, stream shards, or choose by free memory",
                            DATA_MODES, DATA)
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
    tta_rotate: float = option(0.0, "also average views rotated by -/+ this many degrees (each mirrored with "
                                     "--tta-flip; evaluate's and predict's default too; 0: none)", group=VAL,
                               minimum=0.0, maximum=45.0)
    tta_scale: float = option(0.0, "also average views zoomed by 1 -/+ this (0: none)", group=VAL, minimum=0.0,
                              maximum=0.5)
    patch_aggregate: str = option("mean", "patch models: how the evaluation grid's predictions become one",
                                  PATCH_AGGREGATES, VAL)
    # engine
    precision: str = option("auto", "auto: accelerate launch's --mixed_precision if given, else bf16 on CUDA and on "
                                    "CPUs with bf16 matrix units where the model is faster so, fp32 elsewhere "
                                    "(bonedist.train.precision)", PRECISIONS, ENGINE)
    channels_last: bool | None = option(None, "channels_last memory format (default: chosen with --precision auto)",
                                        group=ENGINE)
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
    allow_changed_data: bool = option(False, "resume although the pack (its images, size or counts) or the preset "
                                             "changed since the checkpoint was written (recorded in metrics.jsonl)",
                                      group=RUN)
    wandb: str = option("auto", "W&B: auto is offline without an API key or network",
                        WANDB_MODES, RUN)
    wandb_project: str = option("bonedist", "W&B project", group=RUN)
    wandb_tags: list = option([], "W&B tags besides the model and preset (a sweep adds sweep:STUDY)", group=RUN,
                              cli=False)
    log_every: int = option(10, "optimizer steps between step-level log records", group=RUN, minimum=1)

    def __post_init__(self):
        if self.input is None or isinstance(self.input, dict):
            self.input = build(InputConfig, dict(self.input or {}), "the input")
        check_fields(self)
        if self.ema >= 1.0:
            raise BonedistError(f"--ema must be in [0, 1), got {self.ema}")
        if (self.distill is not None or self.teacher_column) and not self.teacher:
            raise BonedistError("--distill and --teacher-column need --teacher (the teacher's predictions)")
        if self.swa >= 1.0 or (self.swa and (self.ema or self.scheduler != "cosine")):
            raise BonedistError(f"--swa {self.swa}: a share of the cosine schedule in [0, 1), with --scheduler cosine "
                                f"and without --ema (both average the weights)")
        if self.low_res and (self.scheduler != "cosine" or self.low_res >= self.input.image_size):
            raise BonedistError(f"--low-res {self.low_res}: a side below --image-size {self.input.image_size}, with "
                                f"--scheduler cosine (whose progress decides when training switches to the image "
                                f"size)")
        if self.cache_share > 1.0:
            raise BonedistError(f"--cache-share must be in (0, 1], got {self.cache_share}")
        if self.model:
            self.options()  # validates
            self._check_run_name()
        self._check_stages()
        self.augment_config()  # validates

    def info(self):
        from bonedist.models import model_info

        return model_info(self.model)

    def options(self):
        """The model's typed options."""
        return self.info().build_options(self.model_options)

    @property
    def run(self) -> str:
        """The run's name: its folder under runs/EXPERIMENT and its row in evaluate's tables."""
        return self.run_name or self.model

    def _check_run_name(self) -> None:
        from bonedist.models import is_model

        name = self.run_name
        if name is None or name == self.model:
            return
        if not RUN_NAME.fullmatch(name):
            raise BonedistError(f"--run-name {name!r}: letters, digits, '.', '_' and '-' only (one folder name, "
                                f"starting with a letter or digit)")
        if is_model(name):
            raise BonedistError(f"--run-name {name!r} is another model's name; a {self.model} run needs its own "
                                f"(e.g. {self.model.replace('/', '-')}-2)")

    def _check_stages(self) -> None:
        if not self.stages:
            return
        from bonedist.models import list_models, model_info

        order = self.info().task.stages
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
        """The stage (of a staged model) that trains in ``epoch`` (0-based), or None without staging."""
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
        from bonedist.spec import AugmentConfig

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
        data = migrate_legacy(dict(data))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise BonedistError(f"unknown training options {sorted(unknown)}")
        return cls(**data)


LEGACY_INPUT = {"image_size": "image_size", "hand_mask": "hand_mask", "contrast": "contrast",
                "patch_size": "patch_size", "num_patches": "num_patches", "eval_grid": "eval_grid",
                "in_chans": "channels"}


def migrate_legacy(data: dict) -> dict:
    """A config of bonedist before 0.2 (one ``model_cfg`` dict for model and input settings) in today's terms."""
    if "model_cfg" not in data:
        return data
    from bonedist.models import model_info

    old = dict(data.pop("model_cfg") or {})
    info = model_info(data.get("model", ""))
    data["input"] = {new: old.pop(key) for key, new in LEGACY_INPUT.items() if key in old}
    if "patch_size" in data["input"] and "num_patches" not in data["input"]:
        data["input"]["num_patches"] = 3  # the factory's old default
    if data["input"].get("eval_grid") is None:
        data["input"].pop("eval_grid", None)
    data["model_options"] = {k: v for k, v in old.items() if k in info.option_names}
    return data


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


MERGED = ("model_options", "input", "augment")  # dict fields: overrides are merged key by key


def recipe_values(model: str, preset: str) -> dict:
    """The preset's shared values with the model's recipe for it on top (``model`` → ``model_options``)."""
    from bonedist.models import model_info

    values = preset_values(preset)
    recipe = model_info(model).recipe(preset)
    recipe["model_options"] = recipe.pop("model", {})
    for key, value in recipe.items():
        values[key] = {**values.get(key, {}), **value} if key in MERGED else value
    return values


CONFIG_KEYS = ("model", "shards", "preset")


def read_config_file(path: str) -> dict:
    """A run written down (YAML or JSON, the fields ``--print-config`` prints; a run's ``config.json`` too): its
    values, checked (``config_values``); nothing in it is evaluated."""

    from bonedist.files import read_json, read_yaml

    file = Path(path)
    if file.suffix.lower() == ".json":
        data = read_json(file, "a run configuration")
    else:
        data = read_yaml(file, "--config")
    return config_values(data, f"--config {path}")


def config_values(data, where: str) -> dict:
    """A configuration's values as a file or a sweep's base gives them: flag names at the top level moved to
    ``input`` and ``model_options``; an unknown key is one line naming it and the nearest valid one."""
    import difflib

    if not isinstance(data, dict):
        raise BonedistError(f"{where}: expected a mapping of option names to values")
    data = migrate_legacy({str(k).replace("-", "_"): v for k, v in data.items() if k != "resolved"})
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    inputs = [f.name for f in dataclasses.fields(InputConfig)]
    model_keys = _model_option_names()
    for key in list(data):  # flag names at the top level: --image-size is input's, --pretrained the model's
        if key in inputs and key not in names:
            data.setdefault("input", {})[key] = data.pop(key)
        elif key in model_keys and key not in names:
            data.setdefault("model_options", {})[key] = data.pop(key)
    for key in data:
        if key not in names:
            near = SPELLINGS.get(key) or next(iter(difflib.get_close_matches(key, names + inputs, n=1, cutoff=0.6)),
                                              None)
            raise BonedistError(f"{where}: unknown option {key!r}"
                                + (f"; did you mean {near!r}?" if near else f"; options: {', '.join(names)}"))
    if isinstance(data.get("wandb"), bool):  # YAML 1.1 reads an unquoted off/on as a boolean
        data["wandb"] = "online" if data["wandb"] else "off"
    for key in ("model_options", "input", "augment"):
        if not isinstance(data.get(key, {}), dict):
            raise BonedistError(f"{where}: {key!r} must be a mapping")
    return data


SPELLINGS = {"learning_rate": "lr", "batch": "batch_size", "size": "image_size", "max_epochs": "epochs",
             "lr_backbone": "backbone_lr", "grad_clip": "clip_grad", "gradient_accumulation_steps": "grad_accum"}


def _model_option_names() -> set[str]:
    from bonedist.models import list_models, model_info

    return {name for model in list_models() for name in model_info(model).option_names}


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as YAML, in field order: what ``--config`` reads back to the same configuration."""
    import yaml

    plain = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as config.json holds them
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=None, width=100)


def resolve_config(model: str, shards: str, preset: str = "paper", file: dict | None = None,
                   **overrides) -> TrainConfig:
    """Preset values, the model's recipe, a config ``file``'s values (None included: a written-down run is
    reproduced as it was), then ``overrides`` (``model_options``, ``input`` and ``augment`` are merged key by key;
    None values of the other fields are ignored: flags not given)."""
    from bonedist.models import model_info

    model_info(model)  # an unknown name is one line listing the known ones
    if preset not in list_presets():
        raise BonedistError(f"unknown preset {preset!r}; presets: {', '.join(list_presets())}")
    values = recipe_values(model, preset)
    for key, value in (file or {}).items():
        values[key] = {**values.get(key, {}), **value} if key in MERGED else value
    if values.get("stages") and overrides.get("epochs") and not overrides.get("stages"):
        values["stages"] = scale_stages(values["stages"], overrides["epochs"])
    for key in MERGED:
        values[key] = {**values.get(key, {}), **(overrides.pop(key, None) or {})}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict({"model": model, "shards": shards, "preset": preset, **values})
