"""The training engine in one process: run folder, W&B offline, resume, non-finite loss, every model learns."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from bonedist.data.manifest import load_manifest
from bonedist.data.sampling import SplitIndex
from bonedist.models import list_models, model_info
from tests.conftest import epoch_records, run_train
from tests.wandb_reader import read_artifacts, read_history, read_metric_definitions, read_summary

TINY = ["--preset", "tiny", "--steps-per-epoch", "6"]


@pytest.mark.slow
def test_run_folder_metrics_checkpoints_and_wandb_offline(train_shards, tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    result = run_train("--model", "xception", "--shards", str(train_shards), *TINY, "--epochs", "2",
                       "--wandb", "auto", "--experiment", "exp1", runs=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stdout + result.stderr  # a log without a terminal gets lines, not bars
    run = tmp_path / "exp1" / "xception"
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "xception" and config["preset"] == "tiny" and config["epochs"] == 2
    epochs = epoch_records(run)
    assert [r["epoch"] for r in epochs] == [1, 2]
    val_count = load_manifest(train_shards)["splits"]["validation"]["count"]
    for record in epochs:
        assert record["val_count"] == val_count  # every validation sample exactly once
        for key in ("train_loss", "val_loss", "val_mae_months", "images_per_s_per_device", "data_wait_share",
                    "peak_memory_gb", "lr"):
            assert isinstance(record[key], float), key
        assert record["ranks_in_sync"] is True
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step-00000006", "step-00000012"]
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["model"] == "xception" and meta["sigma"] > 0 and meta["pack"]["image_size"] == 64
    state = torch.load(run / "checkpoints" / "step-00000012" / "state.pt", weights_only=True)
    assert state["trainer"]["global_step"] == 12 and state["trainer"]["epoch"] == 2
    assert {"optimizer", "scheduler", "rng", "mu", "sigma", "config", "git"} <= set(state)
    # W&B wrote an offline run in the run folder, and its history holds the same numbers
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    history = [row for row in read_history(offline[0]) if "val_mae_months" in row]
    assert [round(row["val_mae_months"], 6) for row in history] == [round(r["val_mae_months"], 6) for r in epochs]
    # artifacts and lineage: the pack it trained on (used, by reference) and the model it left in best/
    artifacts = {a["type"]: a for a in read_artifacts(offline[0])}
    assert artifacts["dataset"]["used"] and "manifest.json" in artifacts["dataset"]["files"]
    assert artifacts["dataset"]["metadata"]["splits"]["train"]["count"] == 300
    assert any(ref.endswith("train-000000.tar") for ref in artifacts["dataset"]["refs"])
    model = artifacts["model"]
    assert model["name"] == "exp1-xception" and not model["used"] and "best" in model["aliases"]
    assert {"meta.json", "model.safetensors"} <= set(model["files"]) and model["metadata"]["sigma"] == meta["sigma"]
    definitions = read_metric_definitions(offline[0])
    assert definitions["val_mae_months"] == {"step_metric": "epoch", "summary": ["min"]}
    summary = read_summary(offline[0])  # the tiny preset trains with MSE: best/ is chosen by the validation MSE
    assert summary["best_epoch"] == meta["epoch"] and summary["best_val_loss"] == pytest.approx(
        min(r["val_loss"] for r in epochs))


@pytest.mark.slow
def test_resume_auto_continues_where_it_stopped(train_shards, tmp_path):
    args = ["--model", "resnet50_patch", "--shards", str(train_shards), *TINY]
    first = run_train(*args, "--epochs", "1", runs=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "default" / "resnet50_patch"
    # the next checkpoint cannot be written (files capped at 16 MB, as on a full disk): one clear line, exit 2,
    # the step-6 checkpoint intact and no half-written folder left behind
    full = run_train(*args, "--epochs", "2", runs=tmp_path, max_file_bytes=16 * 2**20)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "cannot write" in full.stderr and "GiB free" in full.stderr and "Traceback" not in full.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000006"]
    assert torch.load(run / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)["trainer"][
        "global_step"] == 6
    second = run_train(*args, "--epochs", "2", runs=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    epochs = epoch_records(run)
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 6), (2, 12)]


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_message_and_keeps_good_checkpoints(train_shards, tmp_path):
    result = run_train("--model", "xception", "--shards", str(train_shards), *TINY, "--lr", "1e30",
                       "--checkpoint-every", "1", "--scheduler", "constant", runs=tmp_path)
    assert result.returncode == 2
    assert "non-finite training loss" in result.stderr and "Traceback" not in result.stderr
    assert "last good checkpoint" in result.stderr
    for folder in (tmp_path / "default" / "xception" / "checkpoints").glob("step-*"):
        weights = load_file(str(folder / "model.safetensors"))
        assert all(torch.isfinite(t.float()).all() for t in weights.values()), folder


@pytest.mark.parametrize("args, message", [
    (["--model", "vgg", "--shards", "x"], "unknown model 'vgg'"),
    (["--model", "xception", "--shards", "/nonexistent"], "manifest.json not found"),
    (["--model", "xception", "--shards", "x", "--preset", "fast"], "unknown preset 'fast'"),
    (["--model", "agcnn", "--shards", "x", "--model-opt", "reduction"], "expected KEY=VALUE"),
    (["--model", "xception", "--shards", "x", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--model", "xception", "--shards", "x", "--low-res", "500"], "--low-res 500: a side below --image-size"),
    (["--model", "xception", "--shards", "x", "--low-res", "32", "--scheduler", "plateau"], "with --scheduler cosine"),
    (["--model", "xception", "--shards", "x", "--distill", "0.5"], "--distill and --teacher-column need --teacher"),
    (["--model", "xception", "--shards", "x", "--mixup-bandwidth", "0"], "--mixup-bandwidth must be positive"),
    (["--model", "xception", "--shards", "x", "--teacher", "t.csv", "--distill", "1.5"], "--distill must be at most"),
])
def test_bad_arguments_give_one_clear_line(tmp_path, args, message):
    result = run_train(*args, runs=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model", [m for m in list_models() if "tiny" in model_info(m).presets])
def test_every_model_learns_well_below_the_mean_baseline(train_shards, tmp_path, model):
    # three epochs take every model below the bound with room; the AG-CNN's branches start learning in its third
    epochs = "4" if model_info(model).task.stages else "3"
    result = run_train("--model", model, "--shards", str(train_shards), "--preset", "tiny", "--epochs", epochs,
                       runs=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = epoch_records(tmp_path / "default" / model)
    key = model_info(model).task.best_metric("mae_months")  # the model's prediction (a branched one's main branch)
    best = min(r[key] for r in records)
    baseline = records[-1]["val_baseline_mae_months"]
    assert best < 0.75 * baseline, f"{model}: best validation MAE {best:.1f} vs predict-the-mean {baseline:.1f}"


@pytest.mark.slow
def test_an_age_distribution_head_with_progressive_resizing_learns_and_records_both(train_shards, tmp_path):
    """--age-bins logs its soft-label term each epoch; --low-res trains the first half of the cosine at 32 px and
    says when it switches to the image size; validation is at the image size throughout; the model still learns."""
    result = run_train("--model", "cspnext_tiny", "--shards", str(train_shards), "--preset", "tiny", "--epochs", "3",
                       "--age-bins", "41", "--low-res", "32", runs=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    size = json.loads((tmp_path / "default" / "cspnext_tiny" / "config.json").read_text())["input"]["image_size"]
    assert f"progressive resizing: training at 32 px until 50% of the cosine cycle, then at {size} px" in result.stdout
    switch = re.search(rf"progressive resizing: training at {size} px from step (\d+)", result.stdout)
    assert switch and result.stdout.count("progressive resizing: training at") == 2
    run = tmp_path / "default" / "cspnext_tiny"
    assert json.loads((run / "config.json").read_text())["model_options"]["age_bins"] == 41
    records = epoch_records(run)
    assert abs(int(switch.group(1)) - records[-1]["step"] / 2) <= 1  # half of the cosine cycle's optimizer steps
    assert min(r["val_mae_months"] for r in records) < 0.75 * records[-1]["val_baseline_mae_months"]
    assert all(0 < r["train_loss_age_bins"] < r["train_loss"] for r in records)  # the soft-label term, logged
    assert records[-1]["train_loss_age_bins"] < records[0]["train_loss_age_bins"]
    # resuming it with another head (as when a preset's default changed since) is one line, not a load error
    again = run_train("--model", "cspnext_tiny", "--shards", str(train_shards), "--preset", "tiny", "--epochs", "4",
                      "--age-bins", "17", runs=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "its model was built with other options (age_bins 41 → 17)" in again.stderr


@pytest.mark.slow
def test_c_mixup_learns_says_so_and_is_refused_for_patch_models(train_shards, tmp_path):
    """--mixup blends same-sex radiographs of similar age (bonedist.train.mixup) and the model still learns; a patch
    model, whose inputs are patches rather than radiographs, is refused in one line before training."""
    result = run_train("--model", "cspnext_tiny", "--shards", str(train_shards), "--preset", "tiny", "--epochs", "3",
                       "--mixup", "0.4", runs=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "C-Mixup: each training radiograph blended with one of the same sex and similar age (Beta(0.4, 0.4) " \
           "weights, kernel width 0.2 SD)" in result.stdout
    records = epoch_records(tmp_path / "default" / "cspnext_tiny")
    assert min(r["val_mae_months"] for r in records) < 0.75 * records[-1]["val_baseline_mae_months"]
    patch = run_train("--model", "resnet50_patch", "--shards", str(train_shards), *TINY, "--mixup", "0.4",
                      runs=tmp_path)
    assert patch.returncode == 2 and "Traceback" not in patch.stderr
    assert "--mixup mixes whole radiographs; resnet50_patch trains on patches of them" in patch.stderr


@pytest.mark.slow
def test_train_all_script_trains_then_evaluates(train_shards, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PRESET": "tiny", "RUNS_DIR": str(tmp_path), "MODELS": "xception", "REPLICAS": "2",
           "BONEDIST_PYTHON": sys.executable, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(REPO / "launch" / "train_all.sh"), str(train_shards), "script", "--",
                             "--epochs", "1", "--steps-per-epoch", "3", "--wandb", "off"],
                            capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "script" / "report" / "metrics.json").read_text())
    assert metrics["models"] == ["xception", "xception-2"] and metrics["n"] == 60  # two seeds, two members
    seeds = [json.loads((tmp_path / "script" / r / "config.json").read_text())["seed"] for r in metrics["models"]]
    assert seeds == [0, 1000]


@pytest.mark.slow
def test_ema_weights_are_validated_kept_as_best_and_checkpointed(train_shards, tmp_path):
    result = run_train("--model", "xception", "--shards", str(train_shards), *TINY, "--epochs", "1", "--ema", "0.9",
                       runs=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "default" / "xception"
    state = torch.load(run / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)
    best = load_file(str(run / "best" / "model.safetensors"))
    raw = load_file(str(run / "checkpoints" / "step-00000006" / "model.safetensors"))
    key = "head.0.weight"
    assert torch.equal(best[key], state["ema"][key]) and not torch.equal(best[key], raw[key])


@pytest.mark.slow
def test_improved_preset_trains_with_hand_mask_flip_and_patch_grid(train_shards, tmp_path):
    """The improved preset end to end at CPU size: fine-tuned (no frozen backbone), hand mask, 7x7 median grid,
    flipped validation; the run's settings travel to evaluation."""
    result = run_train("--model", "resnet50_patch", "--shards", str(train_shards), "--preset", "improved",
                       "--pretrained", "none", "--image-size", "64", "--patch-size", "24", "--num-patches", "8",
                       "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "4", runs=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "default" / "resnet50_patch"
    config = json.loads((run / "config.json").read_text())
    assert config["tta_flip"] and config["patch_aggregate"] == "median" and config["loss"] == "l1"
    assert config["input"]["eval_grid"] == 7 and config["input"]["hand_mask"]
    assert config["optimizer"] == "adamw" and config["scheduler"] == "cosine" and config["ema"] > 0
    assert config["backbone_lr"] < config["lr"] and config["model_options"]["freeze_backbone"] is False
    from bonedist.eval.runs import load_trained

    trained = load_trained(run)
    assert trained.flip and trained.aggregate == "median"
    assert trained.pipe.spec.hand_mask and trained.pipe.grid == 7 and trained.pipe.eval_repeats == 49
    assert epoch_records(run)[0]["val_count"] == load_manifest(train_shards)["splits"]["validation"]["count"]


def test_stages_scale_validate_and_restart_the_cosine():
    from bonedist import BonedistError
    from bonedist.train.config import resolve_config, scale_stages
    from bonedist.train.schedule import build_scheduler

    assert scale_stages([["global", 15], ["local", 10], ["fusion", 5]], 6) == [["global", 3], ["local", 2],
                                                                                ["fusion", 1]]
    assert scale_stages([["global", 15], ["local", 10], ["fusion", 5]], 3) == [["global", 1], ["local", 1],
                                                                                ["fusion", 1]]
    cfg = resolve_config("agcnn", "x", "improved", epochs=6)
    assert cfg.stages == [["global", 3], ["local", 2], ["fusion", 1]]
    assert [cfg.stage_at(e) for e in range(6)] == ["global"] * 3 + ["local"] * 2 + ["fusion"]
    for bad in ([["local", 2], ["global", 1]], [["global", 0]], [["fusion", 1], ["fusion", 1]], [["branch", 2]]):
        with pytest.raises(BonedistError, match="stages"):
            resolve_config("agcnn", "x", "paper", stages=bad, epochs=sum(e for _, e in bad) or 1)
    with pytest.raises(BonedistError, match="agcnn"):
        resolve_config("xception", "x", "paper", stages=[["global", 1]], epochs=1)
    # one warmup + cosine cycle per stage: the learning rate is back up at each stage's start
    cfg = resolve_config("agcnn", "x", "improved", epochs=4, stages=[["global", 2], ["local", 1], ["fusion", 1]],
                         warmup_epochs=0.0)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler(cfg, opt, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and lrs[19] < 0.01 and lrs[20] == 1.0 and lrs[29] < 0.05 and lrs[30] == 1.0
    # under a time budget the cosine follows the clock when it runs ahead of the steps
    sched.follow_clock(1.0)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0


@pytest.mark.slow
def test_an_output_folder_that_cannot_be_written_is_one_line(train_shards, tmp_path, phantom_root):
    """/sys refuses new folders even to root (EPERM/EACCES/EROFS): every command names the path in one line."""
    (tmp_path / "file").write_text("x")
    for runs in ("/sys/bonedist-test-runs", str(tmp_path / "file" / "runs")):
        result = run_train("--model", "xception", "--shards", str(train_shards), *TINY, "--epochs", "1", runs=runs)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "cannot use" in result.stderr and runs.split("/runs")[0] in result.stderr
    from tests.conftest import run_cli

    packed = run_cli("pack", str(phantom_root), "--out", "/sys/bonedist-test-shards", "--quiet")
    assert packed.returncode == 2 and "/sys/bonedist-test-shards" in packed.stderr
    assert "Traceback" not in packed.stderr


@pytest.mark.slow
def test_a_kill_while_best_is_replaced_is_recovered_on_resume(train_shards, tmp_path):
    """A SIGKILL between best/'s two renames leaves .old-best (complete) and .tmp-best; a kill after a metrics line
    and before its checkpoint leaves a line the resumed run would repeat. Resuming repairs both."""
    args = ["--model", "xception", "--shards", str(train_shards), *TINY]
    first = run_train(*args, "--epochs", "1", runs=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "default" / "xception"
    (run / "best").rename(run / ".old-best")
    (run / ".tmp-best").mkdir()
    (run / ".tmp-best" / "model.safetensors").write_bytes(b"half-written")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "step", "epoch": 2, "step": 7, "train_loss_step": 1.0, "lr": 0.1}) + "\n")
    resumed = run_train(*args, "--epochs", "2", runs=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert not (run / ".old-best").exists() and not (run / ".tmp-best").exists()
    assert load_file(str(run / "best" / "model.safetensors"))  # complete and loadable
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 7 not in steps and steps == sorted(steps)  # the stray line dropped, nothing logged twice
    assert [r["epoch"] for r in epoch_records(run)] == [1, 2]


@pytest.mark.slow
def test_swa_keeps_the_mean_of_the_tail_weights_as_best(train_shards, tmp_path):
    """--swa 0.5: best/ holds the uniform mean of the weights after each optimizer step of the cosine's second
    half (every step checkpointed here, so the mean can be recomputed from the raw weights)."""
    result = run_train("--model", "xception", "--shards", str(train_shards), *TINY, "--epochs", "2", "--swa", "0.5",
                       "--scheduler", "cosine", "--ema", "0", "--checkpoint-every", "1", "--keep-last", "20",
                       "--recalibrate", "0", runs=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "default" / "xception"
    last = torch.load(run / "checkpoints" / "step-00000012" / "state.pt", weights_only=True)
    averaged = last["trainer"]["averaged"]
    assert 4 <= averaged <= 8, averaged  # about the second half of 12 steps
    raws = [load_file(str(run / "checkpoints" / f"step-{s:08d}" / "model.safetensors"))
            for s in range(13 - averaged, 13)]
    key = "head.0.weight"
    swa = last["ema"][key].float()  # the averaged model, checkpointed with the run (resume continues its mean)
    mean = torch.stack([r[key].float() for r in raws]).mean(dim=0)
    assert torch.allclose(swa, mean, atol=1e-6), (swa - mean).abs().max()
    assert not torch.allclose(swa, raws[-1][key].float(), atol=1e-6)  # not the last weights
    best = json.loads((run / "best" / "meta.json").read_text())
    if best["epoch"] == 2:  # best/ is the averaged model when the last validation was the best
        assert torch.equal(load_file(str(run / "best" / "model.safetensors"))[key].float(), swa)
    bad = run_train("--model", "xception", "--shards", str(train_shards), *TINY, "--swa", "0.5", "--ema", "0.9",
                    runs=tmp_path / "bad")
    assert bad.returncode == 2 and "--swa 0.5" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_test_time_views_recalibrate_best_at_the_end_and_evaluation_uses_them(train_shards, tmp_path):
    """--tta-rotate/--tta-scale: validation during training sees the radiograph and its mirror; at the end best/'s
    calibration is refit with the views (written into its meta.json), which evaluate then uses by default."""
    from tests.conftest import run_cli

    result = run_train("--model", "xception", "--shards", str(train_shards), *TINY, "--epochs", "1", "--tta-flip",
                       "--tta-rotate", "6", "--tta-scale", "0.05", "--experiment", "views", runs=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test-time views +0 deg x1, -6 deg x1, +6 deg x1, +0 deg x0.95, +0 deg x1.05 (each mirrored)" \
        in result.stdout
    meta = json.loads((tmp_path / "views" / "xception" / "best" / "meta.json").read_text())
    assert meta["views"] == [[0.0, 1.0], [-6.0, 1.0], [6.0, 1.0], [0.0, 0.95], [0.0, 1.05]]
    assert meta["views_metrics"]["val_mae_months"] > 0 and len(meta["calibration_z"]["pred"]) == 2
    first = meta["calibration_z"]["pred"]
    again = run_train("--model", "xception", "--shards", str(train_shards), *TINY, "--epochs", "1", "--tta-flip",
                      "--tta-rotate", "6", "--tta-scale", "0.05", "--experiment", "views", runs=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]  # a finished run again: the same refit, nothing else
    assert json.loads((tmp_path / "views" / "xception" / "best" / "meta.json").read_text())["calibration_z"][
        "pred"] == first
    # in the precision training validated in (bf16 autocast on a CPU with bf16 units; evaluate's auto: fp32)
    precision = json.loads((tmp_path / "views" / "xception" / "best" / "meta.json").read_text())["precision"]
    evaluated = run_cli("evaluate", "--runs", str(tmp_path / "views"), "--split", "validation", "--wandb", "off",
                        "--precision", "bf16" if "bf16" in precision else "fp32")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = (tmp_path / "views" / "report" / "report.md").read_text()
    assert "views -6 deg x1, +6 deg x1, +0 deg x0.95, +0 deg x1.05" in report and "bias may shift" not in report
    metrics = json.loads((tmp_path / "views" / "report" / "metrics.json").read_text())["metrics"]["xception"]
    assert metrics["mae_months"] == pytest.approx(meta["views_metrics"]["val_mae_months"], abs=0.05)


def _teacher_table(path, train_shards, shift: float = 0.0, **columns):
    """A teacher table for the pack's training radiographs, laid out like evaluate's predictions.csv: the truth plus
    ``shift``."""
    import pandas as pd

    index = SplitIndex.from_manifest(load_manifest(train_shards), "train")
    table = pd.DataFrame({"id": index.keys, "sex": ["M" if m else "F" for m in index.male], "truth": index.age,
                          "xception": index.age + shift, "ensemble_paper": index.age + shift, **columns})
    table.to_csv(path, index=False)
    return index


@pytest.mark.slow
def test_distillation_learns_each_radiographs_teacher_target_and_resumes_only_on_its_table(train_shards, tmp_path):
    """--teacher: with the labels as the teacher at --distill 1 the run is bit-identical to one without a teacher
    (each radiograph met its own row); another table changes the weights, is named in best/meta.json, and a resume
    on a changed table is refused in one line."""
    from bonedist.files import sha256_file

    args = ["--model", "xception", "--shards", str(train_shards), *TINY, "--epochs", "1", "--recalibrate", "0"]
    truth, shifted = tmp_path / "truth.csv", tmp_path / "shifted.csv"
    _teacher_table(truth, train_shards)
    _teacher_table(shifted, train_shards, shift=30.0)
    runs = {}
    for name, extra in {"plain": [], "truth": ["--teacher", str(truth), "--distill", "1"],
                        "shifted": ["--teacher", str(shifted)]}.items():
        runs[name] = run_train(*args, "--experiment", name, *extra, runs=tmp_path)
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]

    def last_weights(name):
        step = sorted((tmp_path / name / "xception" / "checkpoints").iterdir())[-1]
        return load_file(str(step / "model.safetensors"))

    plain, taught, other = last_weights("plain"), last_weights("truth"), last_weights("shifted")
    assert all(torch.equal(plain[k], taught[k]) for k in plain)
    assert not all(torch.equal(plain[k], other[k]) for k in plain)
    assert "distilling: " in runs["shifted"].stdout and "weight 0.5 beside the labels" in runs["shifted"].stdout
    shifted_epoch = epoch_records(tmp_path / "shifted" / "xception")[-1]  # both terms logged, mixed 1:1
    assert shifted_epoch["train_loss_teacher"] > 0 and shifted_epoch["train_loss_label"] > 0
    assert shifted_epoch["train_loss_teacher"] != shifted_epoch["train_loss_label"]
    assert shifted_epoch["train_loss"] == pytest.approx(
        0.5 * (shifted_epoch["train_loss_label"] + shifted_epoch["train_loss_teacher"]), rel=1e-6)
    meta = json.loads((tmp_path / "shifted" / "xception" / "best" / "meta.json").read_text())
    assert meta["teacher"] == {"path": str(shifted), "column": "xception", "sha256": sha256_file(shifted),
                               "rows": 300, "weight": 0.5}
    _teacher_table(shifted, train_shards, shift=12.0)  # the table changed under the run
    again = run_train(*args[:-4], "--epochs", "2", "--recalibrate", "0", "--experiment", "shifted", "--teacher",
                      str(shifted), runs=tmp_path)
    assert again.returncode == 2 and "the teacher table" in again.stderr and "Traceback" not in again.stderr


def _break_teacher(path, index):
    import pandas as pd

    table = pd.read_csv(path, dtype={"id": str})
    return {"missing": table.iloc[1:], "nan": table.assign(xception=[float("nan")] + [1.0] * (len(table) - 1)),
            "negative": table.assign(xception=-5.0), "duplicate": pd.concat([table, table.iloc[:1]]),
            "nokey": table.drop(columns=["id"]), "twomodels": table.assign(other=1.0),
            "text": table.assign(xception="old")}


@pytest.mark.parametrize("damage, message", [
    ("missing", "1 of the 300 training radiographs have no prediction (first: "),
    ("nan", "row 2 (key "), ("negative", "is not an age in months"), ("text", "'old' is not an age in months"),
    ("duplicate", "appears more than once"), ("nokey", "no 'id' (or 'key') column"),
    ("twomodels", "name the teacher's column with --teacher-column (it has xception, ensemble_paper, other)"),
    ("absent", "no such file"), ("binary", "not a readable CSV"), ("column", "--teacher-column 'truth': not a "),
])
def test_a_bad_teacher_table_is_one_line_before_anything_is_written(train_shards, tmp_path, damage, message):
    good = tmp_path / "good.csv"
    index = _teacher_table(good, train_shards)
    bad = tmp_path / "bad.csv"
    extra = []
    if damage == "binary":
        bad.write_bytes(bytes(range(256)) * 8)
    elif damage == "column":
        bad, extra = good, ["--teacher-column", "truth"]
    elif damage != "absent":
        _break_teacher(good, index)[damage].to_csv(bad, index=False)
    result = run_train("--model", "xception", "--shards", str(train_shards), *TINY, "--teacher", str(bad), *extra,
                       runs=tmp_path / "runs")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()
