"""Learning-rate schedules: ReduceLROnPlateau (per epoch, on the validation metric), cosine with linear warmup
(per optimizer step), or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class Schedule:
    """A scheduler with a uniform face: ``per_step``/``per_epoch`` say when the engine calls ``step``;
    ``follow_clock`` tells a clock-aware schedule how much of the time budget is used."""

    def __init__(self, kind: str, inner=None, clock: dict | None = None,
                 progress: Callable[[int], float] | None = None):
        self.kind, self.inner = kind, inner
        self._clock = clock if clock is not None else {"fraction": 0.0}
        self._progress = progress  # a cosine's position in its cycle (0 to 1) at an optimizer step
        self.per_step = kind == "cosine"
        self.per_epoch = kind == "plateau"

    def progress(self, step: int) -> float:
        """How far into its current cosine cycle (0 to 1) the schedule is at optimizer ``step``: by steps, or by the
        clock when it is further, as the learning rate follows it (0 for other schedules)."""
        return self._progress(step) if self._progress is not None else 0.0

    def follow_clock(self, fraction: float) -> None:
        """The share of the current stage's time budget used so far (0 without a budget)."""
        self._clock["fraction"] = fraction

    def step(self, metric: float | None = None) -> None:
        if self.kind == "plateau":
            self.inner.step(metric)
        elif self.inner is not None:
            self.inner.step()

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.inner is not None and state:
            self.inner.load_state_dict(state)


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Schedule:
    if cfg.scheduler == "plateau":
        return Schedule("plateau", torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience))
    if cfg.scheduler == "cosine":  # one warmup + cosine cycle per training stage (the whole run without stages)
        cycles = [(start * steps_per_epoch, max(1, epochs * steps_per_epoch)) for _, start, epochs in
                  cfg.stage_spans()]
        warmup = int(cfg.warmup_epochs * steps_per_epoch)
        clock = {"fraction": 0.0}  # under a time budget the cosine also follows the clock, whichever is further

        def position(step: int) -> tuple[float, int]:
            begin, total = next(((b, t) for b, t in reversed(cycles) if step >= b), cycles[0])
            # how far into the cycle, in steps: by the step count, or by the clock when it is further (a time
            # budget that ends the stage before its epochs do), so warmup and cosine both follow the clock
            return max(step - begin, clock["fraction"] * total), total

        def factor(step: int) -> float:
            done, total = position(step)
            ramp = min(warmup, total // 2)
            if done < ramp:
                return min(1.0, (done + 1) / ramp)
            progress = (done - ramp) / max(1, total - ramp)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        def progress(step: int) -> float:
            done, total = position(step)
            return min(1.0, done / total)

        return Schedule("cosine", torch.optim.lr_scheduler.LambdaLR(optimizer, factor), clock, progress)
    return Schedule("constant")
