"""The presets' shared values and each preset's default model list. A model adds its own differences in its file
(its recipe for each preset it supports, ``register_model(recipes=...)``); flags override both.

A preset is a function returning ``TrainConfig`` fields (``input`` holds ``InputConfig`` fields, ``model`` the
model's options, ``augment`` ``AugmentConfig`` fields), registered with a one-line summary for ``--help``:

    @register_preset("my-preset", "what it is for")
    def my_preset() -> dict:
        return {**scratch(), "epochs": 30}
"""

from __future__ import annotations

from collections.abc import Callable

from bonedist import BonedistError

PRESETS: dict[str, tuple[Callable[[], dict], str]] = {}
# a preset's default model list (what `bench accuracy`, the demo and the launch scripts train when no model is named):
# model → its relative share of a benchmark's time budget per run, or (share, n) for n runs of different seeds
DEFAULT_MODELS: dict[str, dict[str, float | tuple[float, int]]] = {}


def register_preset(name: str, summary: str, models: dict[str, float | tuple[float, int]] | None = None):
    """Register a preset; ``models`` is its default model list (without one: every model with a recipe for it, at
    equal shares)."""

    def register(fn: Callable[[], dict]) -> Callable[[], dict]:
        PRESETS[name] = (fn, summary)
        if models:
            DEFAULT_MODELS[name] = dict(models)
        return fn

    return register


def list_presets() -> list[str]:
    return list(PRESETS)


def preset_values(name: str) -> dict:
    if name not in PRESETS:
        raise BonedistError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}")
    return PRESETS[name][0]()


def preset_help() -> str:
    return "; ".join(f"{name} ({summary})" for name, (_, summary) in PRESETS.items())


@register_preset("paper", "the study as written")
def paper() -> dict:
    """The paper: Adam 1e-3 + plateau + early stopping, 7 epochs, batch 8, 500 px, MSE on z."""
    return {"epochs": 7, "batch_size": 8, "optimizer": "adam", "lr": 1e-3, "scheduler": "plateau",
            "early_stopping": 3, "input": {"image_size": 500}}


@register_preset("improved", "ImageNet backbones fine-tuned, hand-masked, longer")
def improved() -> dict:
    """Aiming at the accuracy of the RSNA 2017 challenge's winners, beyond the paper: hand-masked
    radiographs, AdamW + cosine with one warmup epoch, EMA of the weights, L1 (the MAE the challenge scored),
    gradient clipping, 30 epochs, batch 16 at 500 px, BatchNorm recalibration, mirror averaging at evaluation."""
    return {"optimizer": "adamw", "weight_decay": 0.01, "scheduler": "cosine", "warmup_epochs": 1.0,
            "early_stopping": 0, "ema": 0.999, "loss": "l1", "clip_grad": 1.0, "tta_flip": True,
            "eval_batch_size": 32, "recalibrate": 1024, "epochs": 30, "batch_size": 16, "lr": 1e-3,
            "input": {"image_size": 500, "hand_mask": True}}


# one model with the whole budget: cspnext_tiny (on hand-masked radiographs) learned the most per CPU-minute at
# 100 px of the architectures screened, and alone with the hour it beat the three-model ensemble that shared it
# (cspnext_tiny, cspnext_s, cs3darknet_s: docs/results.md, "Accuracy"); `bench accuracy --models` with several
# still trains this one alone beside them (--single)
@register_preset("scratch", "no ImageNet weights, any image size", models={"cspnext_tiny": 1.0})
def scratch() -> dict:
    """No ImageNet weights (offline clusters, small images): every model from random initialisation, one cycle
    (30% warmup, cosine to zero), natural age distribution, each radiograph's contrast stretched. Learning rate,
    batch size, warmup share, EMA (off), augmentation, loss and sampling were each checked against one alternative
    or two by ``bench compare`` (two seeds, ``docs/results.md``); 30 epochs, so that on a CPU a time budget decides
    the length (the cosine follows the clock) rather than an epoch count a short budget never reaches."""
    return {"epochs": 30, "batch_size": 64, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-4,
            "scheduler": "cosine", "warmup_epochs": 9.0, "early_stopping": 0, "loss": "l1", "clip_grad": 0.0,
            "tta_flip": True, "balanced": False, "recalibrate": 1024, "eval_batch_size": 64,
            "input": {"image_size": 256, "contrast": "stretch"},
            "augment": {"rotation": 10.0, "translate": (0.06, 0.06), "scale": (0.9, 1.1), "shear": 0.0,
                        "hflip": 0.5}}


@register_preset("tiny", "CPU tests and the demo")
def tiny() -> dict:
    """CPU tests and the demo: small images, random init, fine-tuned end to end, a few hundred steps."""
    return {"epochs": 3, "batch_size": 8, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4,
            "scheduler": "cosine", "warmup_epochs": 0.2, "early_stopping": 0, "eval_batch_size": 32, "workers": 1,
            "data_mode": "cache", "recalibrate": 256, "log_every": 5, "input": {"image_size": 64},
            "augment": {"rotation": 5.0, "translate": (0.05, 0.05), "scale": (1.0, 1.0), "shear": 0.0,
                        "hflip": 0.0}}
