"""`bonedist demo` at a small size: every step runs through the real launcher, a report comes out, the disk stays
light."""

from __future__ import annotations

import json

import pytest

from bonedist.demo import demo_models
from bonedist.models import list_models, model_info
from tests.conftest import run_cli


@pytest.mark.slow
def test_demo_writes_the_report_and_stays_light(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", str(out), "--n", "40", "--budget", "0.8", timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = out / "runs" / "demo" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    # the paper's models, whose numbers the report prints beside ours
    assert metrics["n"] == 8 and metrics["models"] == demo_models() == [m for m in list_models() if model_info(m).paper]
    assert "predict the mean (baseline)" in result.stdout and str(report / "report.md") in result.stdout
    text = (report / "report.md").read_text()
    tables, _, intervals = text.partition("prediction intervals (conformal")
    assert tables.count("| agcnn_") == 9 and intervals.count("| agcnn_") == 3  # metrics, bands, calibration check
    assert (out / "shards" / "manifest.json").exists() and not (out / "phantoms").exists()
    assert not list(out.glob("runs/demo/*/checkpoints"))  # only best/ is kept, in half precision
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size < 0.3e9, size  # the four models' best/ in fp16 are about 240 MB
    assert "\r" not in result.stdout  # no progress bars in a log
