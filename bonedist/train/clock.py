"""A run's clock (seconds of training across resumptions, the share of a stage's time budget used) and the scalar
reductions that let every rank take the same decision."""

from __future__ import annotations

import time

import torch


class RunClock:
    """``elapsed()``: training seconds so far, resumed runs included; ``budget_fraction(state)``: share of the
    current stage's time budget used (0 without a budget). A staged run gives each stage the budget's share of its
    epochs, counted from the stage's first step."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.start(0.0)

    def start(self, elapsed_before: float) -> None:
        self.began, self.before = time.perf_counter(), elapsed_before

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.began

    def budget_fraction(self, state) -> float:
        cfg = self.cfg
        if not cfg.time_budget_min:
            return 0.0
        _, _, epochs = cfg.span_at(state.epoch)
        share = cfg.time_budget_min * 60.0 * epochs / cfg.epochs
        return (self.elapsed() - state.stage_began) / share


def sum_over_ranks(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return float(value)
    total = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total[0])


def max_over_ranks(value: float, world: int, device: torch.device) -> float:
    """The maximum over all ranks, so that every rank takes the same decision."""
    values = torch.tensor([value], device=device)
    if world > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return float(values[0])
