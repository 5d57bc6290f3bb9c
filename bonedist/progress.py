"""Progress that fits where it runs: a tqdm bar on a terminal, plain lines in a batch-job log.

In a Slurm ``.out`` file (or any output that is not a terminal) a tqdm bar writes every refresh as another
carriage-return line; a five-minute run becomes megabytes of bars around the lines that matter. There,
``progress`` prints one plain line at most every ``interval`` seconds (and at the end), like Lightning's and timm's
logging in non-interactive jobs. ``BONEDIST_PROGRESS=bar|lines|off`` overrides the choice.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

LINE_INTERVAL_S = 30.0


def progress(total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
             leave: bool = True, file=None, interval: float | None = None):
    """A progress counter with tqdm's ``update``/``set_postfix``/``close`` (and context manager) interface."""
    file = file or sys.stderr
    mode = os.environ.get("BONEDIST_PROGRESS", "").lower() or ("bar" if _is_terminal(file) else "lines")
    if not enabled or mode == "off":
        return tqdm(total=total, disable=True)
    if mode == "bar":
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=file)
    return LineProgress(total, desc, unit, initial, file, LINE_INTERVAL_S if interval is None else interval)


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """``desc: n/total (pct%) rate unit/s, eta, postfix`` every ``interval`` seconds and once at the end."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int, file, interval: float):
        self.total, self.desc, self.unit, self.file, self.interval = total, desc, unit, file, interval
        self.n = self.start_n = initial
        self.start = self.last = time.perf_counter()
        self.postfix = ""
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.start_n:
                self._print(time.perf_counter())

    def _print(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        parts = [f"{self.desc}: {self.n}"]
        if self.total:
            parts[0] += f"/{self.total} ({100.0 * self.n / self.total:.0f}%)"
            if rate > 0 and self.n < self.total:
                parts.append(f"eta {_clock((self.total - self.n) / rate)}")
        parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=self.file, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):  # not used as an iterable wrapper
        raise TypeError("LineProgress wraps no iterable; call update()")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
