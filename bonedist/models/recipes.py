"""What describes the regressors without building them: their options, the CPU precision they train with, and
their recipes under each preset. Light on purpose (no torch, no timm): the CLI, ``--print-config`` and the registry
read these; ``regressor.py`` and ``timm_regressor.py`` build the models.
"""

from __future__ import annotations

from dataclasses import dataclass

from bonedist.models.task import LABEL_SIGMA_Z
from bonedist.options import option

MODEL = "model"
# ``ModelInfo.cpu_precision`` of the paper's CNNs: bf16 autocast with channels_last on CPUs with bf16 matrix units
# (chosen with `bonedist bench train-step`; docs/results.md, "Speed")
BF16_CL = ("bf16", True)


@dataclass
class BackboneOptions:
    """Options of a regressor on a timm backbone that can start from ImageNet weights."""

    pretrained: str | None = option(None, "backbone weights: none, default (the ImageNet tag), a timm tag, a "
                                          "weights file or a `bonedist weights fetch` folder", group=MODEL)
    freeze_backbone: bool = option(True, "freeze the backbone (the paper); --no-freeze fine-tunes it", group=MODEL,
                                   flag="--freeze")
    feature_norm: bool = option(False, "layer-normalise the pooled features before the head (keeps a small ReLU "
                                       "head alive when the backbone trains)", group=MODEL)


@dataclass
class TimmOptions(BackboneOptions):
    """A modern regressor: trained end to end (nothing frozen) unless asked."""

    freeze_backbone: bool = option(False, "freeze the backbone", group=MODEL, flag="--freeze")
    head_width: int = option(256, "units of the head's hidden Dense layer", group=MODEL, minimum=1)
    drop_path: float = option(0.0, "stochastic depth of the backbone's blocks (timm's drop_path_rate)",
                              group=MODEL, minimum=0, maximum=1)
    age_bins: int = option(0, "0: the head predicts one age; N: a distribution over N age bins whose mean is the "
                              "prediction, trained with a soft-label term too (bonedist.models.age_bins)",
                           group=MODEL, minimum=0)
    age_sigma: float = option(LABEL_SIGMA_Z, "with --age-bins: the standard deviation (z units: the training ages' "
                                             "standard deviations) of the Gaussian soft label around each target",
                              group=MODEL, minimum=0.01)


# -- recipes of an ImageNet-backbone regressor: what it adds to each preset's shared values ---------------------------

IMAGENET = {"pretrained": "default"}
SCRATCH = {"pretrained": None, "freeze_backbone": False, "feature_norm": True}


def merged(base: dict, extra: dict | None):
    """A recipe: ``base`` with a model's own differences ``extra`` (nested dicts merged one level), made anew on
    every call so that nobody edits a shared dict."""

    def make() -> dict:
        out = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
        for key, value in (extra or {}).items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
        return out

    return make


def imagenet_recipes(paper: dict | None = None, improved: dict | None = None, scratch: dict | None = None,
                     tiny: dict | None = None) -> dict:
    """The four presets of a regressor whose backbone can start from ImageNet: ``paper`` freezes it, ``improved``
    fine-tunes it (a tenth of the head's learning rate), ``scratch`` and ``tiny`` train it from random weights;
    each argument adds the model's own differences (``input``, ``model`` and other fields)."""
    return {"paper": merged({"model": {**IMAGENET, "freeze_backbone": True}}, paper),
            "improved": merged({"model": {**IMAGENET, "freeze_backbone": False, "feature_norm": True},
                                "backbone_lr": 1e-4}, improved),
            "scratch": merged({"model": SCRATCH}, scratch),
            "tiny": merged({"model": SCRATCH}, tiny)}


def modern_recipes(scratch: dict | None = None, improved: dict | None = None, tiny: dict | None = None,
                   cpu_fast: dict | None = None) -> dict:
    """The presets of a regressor that is not in the paper (no ``paper`` recipe): ``scratch`` from random weights on
    1-channel radiographs, ``improved`` fine-tuned from ImageNet, ``tiny`` for CPU tests."""
    scratch_base = {"model": {"pretrained": None}, "input": {"channels": 1}}
    return {"improved": merged({"model": {"pretrained": "default"}, "backbone_lr": 1e-4}, improved),
            "scratch": merged(scratch_base, scratch),
            "tiny": merged(scratch_base, tiny)}
