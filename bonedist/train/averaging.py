"""Weight averaging over the schedule's tail (SWA, Izmailov et al. 2018) beside timm's EMA: the average is the
evaluated model (validation, ``best/``, evaluation), in the EMA's place.

Until the cosine cycle is ``start`` of the way through (by steps, or by the clock under a time budget, as the
learning rate follows it) the averaged copy equals the training weights; from then on it is the uniform mean of the
weights after every optimizer step. BatchNorm statistics are copied from the training model; ``--recalibrate``
recomputes them for the averaged weights before each validation (``bonedist.train.batchnorm``), as SWA needs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch


class TailAverage:
    """The uniform average of the weights over the last ``1 - start`` of the schedule; ``module`` is the averaged
    copy, ``count`` the steps averaged so far (kept in the run's state so that resuming continues the same mean)."""

    def __init__(self, model: torch.nn.Module, start: float, progress: Callable[[], float]):
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.start, self.progress, self.count = start, progress, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        averaging = self.progress() >= self.start
        self.count = self.count + 1 if averaging else 0
        weight = 1.0 / self.count if averaging else 1.0
        for mine, theirs in zip(self.module.parameters(), model.parameters(), strict=True):
            mine.lerp_(theirs.detach().to(mine.dtype), weight)  # the running mean; 1.0: a copy
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
