"""Where a run stands (saved in every checkpoint) and what one training epoch measured."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class TrainState:
    """Where a run stands: saved in every step checkpoint, restored by ``--resume``."""

    epoch: int = 0  # epochs completed (the one in progress, 0-based)
    batch_in_epoch: int = 0  # micro-steps done in the epoch in progress: a resumed epoch continues there
    global_step: int = 0  # optimizer steps
    micro_step: int = 0  # micro-steps since the start (each one seeds its augmentation)
    best: float = math.inf  # the best value of the checkpoint-selection metric (in the current stage)
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the last improvement (early stopping)
    elapsed: float = 0.0  # seconds of training so far (time budget)
    stage_began: float = 0.0  # ``elapsed`` when the current stage began
    averaged: int = 0  # optimizer steps in the SWA mean so far (--swa)


@dataclass
class EpochSums:
    """Training sums of one epoch, kept on the device (no host sync per step) and reduced over ranks at its end."""

    loss: torch.Tensor  # sum of loss x inputs
    abs_err_months: torch.Tensor  # sum of |pred - target| in months
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of each named part of the loss x inputs

    @classmethod
    def zeros(cls, terms: tuple[str, ...], device: torch.device) -> EpochSums:
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        return cls(zero(), zero(), {name: zero() for name in terms})

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], abs_err_months: torch.Tensor, n: int) -> None:
        self.loss += loss.detach().double() * n
        self.abs_err_months += abs_err_months
        for name, total in self.terms.items():  # a branch outside the training stage counts the stage's loss
            total += parts.get(f"loss_{name}", loss).detach().double() * n

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.loss, self.abs_err_months, *self.terms.values()])


@dataclass
class EpochStats:
    """One epoch of training on this rank (sums over all ranks where named so), for its metrics line."""

    sums: list[float]  # EpochSums.stacked(), summed over ranks: loss, abs error, each term of the loss
    inputs: float  # model inputs over all ranks (radiographs x patches)
    batches: int  # micro-steps run in this call (a resumed epoch: from its saved batch)
    data_wait: float  # seconds waiting for batches
    seconds: float  # wall clock of the epoch's steps
    steady: tuple[float, int] | None  # (seconds, inputs) after the first steps (autotuning, lazy init)

    def metrics(self, batch_size: int, repeats: int, terms: tuple[str, ...]) -> dict:
        n = max(self.inputs, 1.0)
        radiographs = self.batches * batch_size
        out = {"train_loss": self.sums[0] / n, "train_mae_months": self.sums[1] / n,
               # radiographs/s per device after the epoch's first steps; _with_warmup over the whole epoch
               "images_per_s_per_device": (self.steady[1] / repeats / max(self.steady[0], 1e-9)
                                           if self.steady and self.steady[1] else
                                           radiographs / max(self.seconds, 1e-9)),
               "images_per_s_per_device_with_warmup": radiographs / max(self.seconds, 1e-9),
               "data_wait_share": self.data_wait / max(self.seconds, 1e-9)}
        out.update({f"train_loss_{name}": self.sums[2 + i] / n for i, name in enumerate(terms)})
        return out
