"""Training losses on z-scored ages as small registered components (torchtitan's ``components/loss.py`` idea).

A loss is a callable ``loss(pred, target) -> scalar`` plus the validation metric that selects ``best/`` for it, so
that a run (and each branch of a branched model) is chosen by what it trains for: L1 by the validation MAE, MSE by
the validation MSE (the paper's ``val_loss``), Huber by the validation Huber loss. A new loss is one registered
class here; ``--loss NAME`` picks it; its parameters are ``TrainConfig`` fields named ``<loss>_<parameter>``
(``--huber-delta``), read by ``build_loss`` only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bonedist import BonedistError
from bonedist.choices import LOSSES as LOSS_NAMES


@dataclass(frozen=True)
class Loss:
    """A pointwise loss on z. ``metric``: the validation metric (``val_<metric>[_<branch>]``) that selects best/."""

    name: ClassVar[str] = ""
    metric: ClassVar[str] = ""

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def validation_value(self, pred_z: np.ndarray, true_z: np.ndarray, sigma: float) -> float:
        """The selection metric on validation predictions (z in, the metric's own units out)."""
        return float(self(torch.from_numpy(np.asarray(pred_z, np.float64)),
                          torch.from_numpy(np.asarray(true_z, np.float64))))


LOSSES: dict[str, type[Loss]] = {}


def register_loss(cls: type[Loss]) -> type[Loss]:
    """A loss under its ``name``, which ``bonedist.choices.LOSSES`` lists too (the CLI offers it without torch)."""
    if cls.name not in LOSS_NAMES:
        raise ValueError(f"loss {cls.name!r}: add it to bonedist.choices.LOSSES")
    LOSSES[cls.name] = cls
    return cls


@register_loss
@dataclass(frozen=True)
class MSE(Loss):
    name: ClassVar[str] = "mse"
    metric: ClassVar[str] = "loss"  # val_loss: the paper's (Keras') validation loss, MSE on z

    def __call__(self, pred, target):
        return F.mse_loss(pred, target)


@register_loss
@dataclass(frozen=True)
class L1(Loss):
    name: ClassVar[str] = "l1"
    metric: ClassVar[str] = "mae_months"  # the MAE the challenge scores: in months, the same order as L1 on z

    def __call__(self, pred, target):
        return F.l1_loss(pred, target)

    def validation_value(self, pred_z, true_z, sigma):
        return float(np.mean(np.abs(np.asarray(pred_z) - np.asarray(true_z))) * sigma)


@register_loss
@dataclass(frozen=True)
class Huber(Loss):
    delta: float = 1.0  # z units: one standard deviation of the ages
    name: ClassVar[str] = "huber"
    metric: ClassVar[str] = "huber"

    def __call__(self, pred, target):
        return F.huber_loss(pred, target, delta=self.delta)


def build_loss(cfg) -> Loss:
    """The loss ``cfg.loss`` names, its parameters read from ``cfg.<loss>_<parameter>``."""
    if cfg.loss not in LOSSES:
        raise BonedistError(f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    cls = LOSSES[cfg.loss]
    params = {f.name: getattr(cfg, f"{cls.name}_{f.name}") for f in dataclasses.fields(cls)}
    return cls(**params)
