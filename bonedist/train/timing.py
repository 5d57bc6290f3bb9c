"""Where a training step's time goes, phase by phase (``bonedist bench train-loop``).

On CUDA each phase is bracketed by CUDA events, so a phase is the device time between its start and end as the GPU
executes them (host work that launches no kernels shows up as the gap it leaves in the queue); on a CPU it is wall
clock. The engine holds a ``NullTimer`` unless a benchmark asks, so a normal run pays nothing.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch

PHASES = ("data", "input", "forward", "backward", "optimizer", "ema", "sync", "logging")


class NullTimer:
    enabled = False

    def phase(self, name: str):
        return nullcontext()


class PhaseTimer:
    """Seconds per phase, summed over the steps after the first ``skip_steps`` (warm-up: autotuning, compilation)."""

    enabled = True

    def __init__(self, device: torch.device, skip_steps: int = 0):
        self.cuda = device.type == "cuda"
        self.skip_steps, self.step = skip_steps, 0
        self.records: list[tuple[str, object, object]] = []

    def next_step(self) -> None:
        self.step += 1

    @contextmanager
    def phase(self, name: str):
        if self.step < self.skip_steps:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.records.append((name, start, end))

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = defaultdict(float)
        for name, start, end in self.records:
            out[name] += start.elapsed_time(end) / 1000.0 if self.cuda else end - start
        return dict(out)
