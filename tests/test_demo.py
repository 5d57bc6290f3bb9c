"""`bonedist demo` at its smallest size: every step runs through the real launcher and a report comes out."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_demo_smallest_size_writes_the_report(tmp_path):
    result = run_cli("demo", "--out", str(tmp_path / "demo"), "--n", "40", "--epochs", "1", "--steps-per-epoch",
                     "2", timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = tmp_path / "demo" / "runs" / "demo" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n"] == 8 and set(metrics["models"]) == {"inception_v3", "xception", "resnet50_patch", "agcnn"}
    assert "predict the mean (baseline)" in result.stdout and str(report / "report.md") in result.stdout
    assert (report / "report.md").read_text().count("| agcnn_") == 6  # branches in both tables
    assert (tmp_path / "demo" / "shards" / "manifest.json").exists()
