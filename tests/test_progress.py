"""Progress output where no terminal reads it: plain lines, a bounded number of them, and nothing when switched off."""

import io

import pytest

from bonedist import progress as progress_module
from bonedist.progress import LineProgress, progress


@pytest.fixture
def clock(monkeypatch):
    """perf_counter advancing one second per call: 3,000 updates take 'about 50 minutes'."""
    now = [0.0]

    def tick():
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(progress_module.time, "perf_counter", tick)
    return now


def test_a_log_gets_a_few_plain_lines_not_bars(clock, monkeypatch):
    monkeypatch.delenv("BONEDIST_PROGRESS", raising=False)
    out = io.StringIO()  # not a terminal
    bar = progress(3000, "epoch 1/1", unit="step", file=out)
    assert isinstance(bar, LineProgress)
    for _ in range(3000):
        bar.update()
        bar.set_postfix(loss="0.5")
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert 50 <= len(lines) <= 110  # one line per 30 s of a 3,000-s run, and the last
    assert lines[-1].startswith("epoch 1/1: 3000/3000 (100%)") and "loss=0.5" in lines[-1]


def test_progress_can_be_switched_off_or_forced(clock, monkeypatch):
    out = io.StringIO()
    monkeypatch.setenv("BONEDIST_PROGRESS", "off")
    with progress(10, "cache", file=out) as bar:
        bar.update(10)
    assert out.getvalue() == ""
    monkeypatch.setenv("BONEDIST_PROGRESS", "lines")
    with progress(10, "cache", file=out, interval=1e9) as bar:
        bar.update(10)
    assert out.getvalue().count("\n") == 1  # only the closing line
    with progress(10, "cache", file=out, enabled=False) as bar:  # other ranks
        bar.update(10)
    assert out.getvalue().count("\n") == 1
