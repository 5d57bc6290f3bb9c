"""`bonedist study patches` and `bonedist bench accuracy` end to end, CI-sized, on phantoms (real processes)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_cli
from tests.wandb_reader import read_history

pytestmark = pytest.mark.slow  # each test trains through the CLI


def test_patch_study_trains_each_setting_and_writes_figure_table_and_wandb(train_shards, tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    result = run_cli("study", "patches", "--shards", str(train_shards), "--settings", "1x64,4x32,16x16",
                     "--preset", "tiny", "--steps-per-epoch", "4", "--clip-grad", "1.0", "--precision", "fp32",
                     "--runs-dir", str(tmp_path), "--wandb", "auto", env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "patch-study" / "study-patches"
    results = json.loads((out / "results.json").read_text())
    assert [(r["patches"], r["size"]) for r in results["settings"]] == [(1, 64), (4, 32), (16, 16)]
    for row in results["settings"]:
        assert len(row["curve"]) == 4  # one point per optimizer step: the figure's curve
        assert math.isfinite(row["val_loss"]) and row["val_mae_months"] > 0
        assert abs(row["patches_per_s"] - row["images_per_s"] * row["patches"]) < 1e-6
        config = json.loads((tmp_path / "patch-study" / f"patches-{row['patches']}x{row['size']}" /
                             "resnet50_patch" / "config.json").read_text())
        assert config["input"]["num_patches"] == row["patches"] and config["epochs"] == 1
    assert (out / "loss_curves.png").stat().st_size > 10_000
    table = (out / "table.md").read_text()
    assert "| 16 | 16x16 |" in table and "| 1 | 64x64 |" in table
    assert "| 4 | 32x32 |" in result.stdout
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    keys = set().union(*read_history(runs[0]))  # media and tables are logged as nested keys
    for prefix in ("patch_study", "loss_curves"):
        assert any(k == prefix or k.startswith(prefix + "/") for k in keys), (prefix, sorted(keys)[:20])


def test_a_diverged_setting_is_a_row_of_the_table_and_the_study_goes_on(train_shards, tmp_path):
    result = run_cli("study", "patches", "--shards", str(train_shards), "--settings", "1x32,4x16", "--preset",
                     "tiny", "--steps-per-epoch", "3", "--lr", "1e30", "--runs-dir", str(tmp_path), "--wandb", "off",
                     timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "2 of 2 settings diverged (1x32, 4x16" in result.stderr and "--clip-grad 1.0" in result.stderr
    out = tmp_path / "patch-study" / "study-patches"
    rows = json.loads((out / "results.json").read_text())["settings"]
    assert [(r["patches"], r["diverged"], r["val_mae_months"]) for r in rows] == [(1, True, None), (4, True, None)]
    assert (out / "table.md").read_text().count("diverged (non-finite loss)") == 2


def test_patch_study_rejects_bad_settings(train_shards, tmp_path):
    result = run_cli("study", "patches", "--shards", str(train_shards), "--settings", "3by224", "--runs-dir",
                     str(tmp_path))
    assert result.returncode == 2 and "--settings" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("study", "patches", "--shards", str(train_shards), "--settings", "2x128", "--preset", "tiny",
                     "--runs-dir", str(tmp_path), "--wandb", "off")
    assert result.returncode == 2 and "larger than the 64-px image" in result.stderr


def test_bench_accuracy_packs_trains_within_budget_and_reports_mae(tmp_path):
    from bonedist.data.synth import synth_dataset

    synth_dataset(tmp_path / "raw", n=80, n_val=20, n_test=20, seed=4, size=128, workers=2, progress=False)
    budget = 0.6
    result = run_cli("bench", "accuracy", "--data", str(tmp_path / "raw"), "--preset", "tiny", "--image-size", "64",
                     "--budget", str(budget), "--models", "xception,resnet50_patch", "--out", str(tmp_path / "out"),
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert summary["split"] == "test" and summary["n"] == 20  # the labelled test split, every radiograph
    mae = summary["mae_months"]["tiny"]
    assert {"predict_the_mean", "xception", "resnet50_patch", "ensemble_equal", "ensemble_fitted"} <= set(mae)
    assert all(math.isfinite(v) and v > 0 for v in mae.values())
    # each run stops on its share of the budget (plus at most one validation pass over)
    assert summary["train_min"] < budget + 0.5, summary
    assert "predict-the-mean baseline" in result.stdout and "ensemble_fitted" in result.stdout
    assert (tmp_path / "out" / "runs" / "tiny" / "report" / "metrics.json").is_file()
    intervals = summary["intervals"]["tiny"]["ensemble_fitted"]  # coverage and width printed beside the MAE
    assert 0 <= intervals["coverage"] <= 1 and intervals["mean_width_months"] > 0
    assert "90% prediction intervals" in result.stdout
    fit = summary["ensemble_fit"]["tiny"]  # the fitted weights, and whether they generalise out of fold
    assert set(fit["weights"]) == {"xception", "resnet50_patch"} and fit["cross_validated_mae_months"] > 0
    assert "cross-validated MAE on validation" in result.stdout
    check = summary["calibration_check"]["tiny"]["xception"]  # offset and line fitted on validation, scored on test
    assert {"as_trained", "validation_offset", "validation_linear", "slope"} <= set(check)
    assert "a correction fitted on validation" in result.stdout
    assert summary["shares"] == {"tiny/xception": 1.0, "tiny/resnet50_patch": 1.0}
    # the list's first model alone with the whole budget, its own row: what sharing the budget must beat
    assert summary["single"] == {"tiny": "xception"} and summary["single_min"] < budget + 0.5
    assert math.isfinite(mae["xception (whole budget)"])  # (equal to xception's when both finish their epochs)
    assert [r["whole"] for r in summary["runs"]] == [False, False, True]
    assert (tmp_path / "out" / "runs" / "tiny-whole" / "xception" / "best" / "meta.json").is_file()
    assert not (tmp_path / "out" / "runs" / "tiny-whole" / "resnet50_patch").exists()
    assert "x xception (whole budget)" in result.stdout and "sharing the budget" in result.stdout
    assert "xception (whole budget)" in summary["intervals"]["tiny"]


def test_bench_accuracy_distils_a_student_inside_the_budget(tmp_path):
    """--student: the list trains in half the budget, predicts the training split (the teacher table), and the
    student learns from it in the rest; its row is reported beside its teacher and the whole-budget model."""
    from bonedist.data.synth import synth_dataset

    synth_dataset(tmp_path / "raw", n=80, n_val=20, n_test=20, seed=4, size=128, workers=2, progress=False)
    result = run_cli("bench", "accuracy", "--data", str(tmp_path / "raw"), "--preset", "tiny", "--image-size", "64",
                     "--budget", "0.6", "--models", "xception", "--student", "resnet18", "--out",
                     str(tmp_path / "out"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert summary["student"] == {"tiny": "resnet18"} and summary["student_share"] == 0.5
    assert summary["single"] == {"tiny": "xception"}  # the teacher shares the budget with its student
    assert [(r["model"], r["whole"], r["student"]) for r in summary["runs"]] == [
        ("xception", False, False), ("resnet18", False, True), ("xception", True, False)]
    runs = tmp_path / "out" / "runs"
    table = runs / "tiny-teacher" / "predictions.csv"
    meta = json.loads((runs / "tiny-student" / "resnet18" / "best" / "meta.json").read_text())
    assert meta["teacher"]["path"] == str(table) and meta["teacher"]["column"] == "xception"
    assert meta["teacher"]["rows"] == 80 and meta["teacher"]["weight"] == 0.5
    mae = summary["mae_months"]["tiny"]
    assert math.isfinite(mae["resnet18 (student)"]) and math.isfinite(mae["xception (whole budget)"])
    assert "the student resnet18 (student)" in result.stdout and "x its teacher ensemble_paper" in result.stdout
    digest = meta["teacher"]["sha256"]
    again = run_cli("bench", "accuracy", "--data", str(tmp_path / "raw"), "--preset", "tiny", "--image-size", "64",
                    "--budget", "0.6", "--models", "xception", "--student", "resnet18", "--out",
                    str(tmp_path / "out"), timeout=600)  # the same command again: every run resumes, finished
    assert again.returncode == 0, again.stderr[-3000:]
    assert "are newer than their best/: kept" in again.stdout  # the student's teacher table is not rewritten
    assert json.loads((runs / "tiny-student" / "resnet18" / "best" / "meta.json").read_text())["teacher"][
        "sha256"] == digest
    bad = run_cli("bench", "accuracy", "--data", str(tmp_path / "raw"), "--preset", "tiny,scratch", "--budget",
                  "0.1", "--student", "resnet18", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--student: one preset at a time" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_accuracy_needs_a_validation_split(tmp_path):
    from bonedist.data.synth import synth_dataset

    synth_dataset(tmp_path / "raw", n=12, n_val=4, n_test=4, seed=4, size=96, workers=1, progress=False)
    for name in ("Validation Dataset.csv", "boneage-validation-dataset-1.zip", "boneage-validation-dataset-2.zip"):
        (tmp_path / "raw" / name).unlink()
    result = run_cli("bench", "accuracy", "--data", str(tmp_path / "raw"), "--preset", "tiny", "--image-size", "64",
                     "--budget", "0.2", "--models", "xception", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "no validation split" in result.stderr and "Traceback" not in result.stderr
    bad = run_cli("bench", "accuracy", "--data", str(tmp_path / "raw"), "--preset", "nope", "--out",
                  str(tmp_path / "o2"))
    assert bad.returncode == 2 and "presets are" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_compare_is_a_grid_sweep_of_every_setting_and_seed(tmp_path):
    import yaml

    from bonedist.data.synth import synth_dataset

    synth_dataset(tmp_path / "raw", n=60, n_val=16, n_test=8, seed=5, size=96, workers=2, progress=False)
    args = ("bench", "compare", "--data", str(tmp_path / "raw"), "--model", "resnet18", "--preset", "tiny",
            "--image-size", "64", "--budget", "0.08", "--seeds", "0,1", "--vary", "lr=3e-3", "--out",
            str(tmp_path / "out"), "--set", "tta_rotate=4")  # every run: best/ also scored with test-time views
    result = run_cli(*args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert {name: row["n"] for name, row in summary["settings"].items()} == {"baseline": 2, "lr=3e-3": 2}
    assert sorted(r["seed"] for r in summary["runs"]["lr=3e-3"]) == [0, 1] and not summary["failed"]
    assert all(math.isfinite(r["val_mae_months"]) for runs in summary["runs"].values() for r in runs)
    lr = {json.loads((tmp_path / "out" / "runs" / "compare" / r["run"].rsplit("/", 1)[1] / "config.json")
                     .read_text())["lr"] for r in summary["runs"]["lr=3e-3"]}
    assert lr == {3e-3}
    space = yaml.safe_load((tmp_path / "out" / "space.yaml").read_text())  # what a Slurm array would run
    assert space["sampler"] == "grid" and space["variants"]["lr=3e-3"] == {"lr": 3e-3}
    assert space["base"]["tta_rotate"] == 4
    assert all(math.isfinite(r["views_mae_months"]) for runs in summary["runs"].values() for r in runs)
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| lr=3e-3 |" in table and "with test-time views |" in table
    bad = run_cli("bench", "compare", "--data", str(tmp_path / "raw"), "--model", "resnet18", "--set", "lr=1,2",
                  "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--set 'lr=1,2'" in bad.stderr and "Traceback" not in bad.stderr
    again = run_cli(*args, timeout=600)  # the grid is done: nothing trains again, the table is the same
    assert again.returncode == 0 and "sweep compare: trial" not in again.stdout
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["settings"] == summary["settings"]
