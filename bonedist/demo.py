"""``bonedist demo``: the whole pipeline on synthetic phantoms, end to end, in minutes on a laptop CPU.

    bonedist demo --out runs/demo

synthesise train/validation/test phantoms → pack → train the four models with `accelerate launch` (2 CPU processes,
or the machine's GPUs) on the ``tiny`` preset → evaluate the ensemble → report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bonedist import BonedistError

MODELS = ("inception_v3", "xception", "resnet50_patch", "agcnn")
# Epochs per model on the tiny preset: enough for each to beat predict-the-mean by a wide margin on phantoms.
DEMO_EPOCHS = {"inception_v3": 3, "xception": 4, "resnet50_patch": 4, "agcnn": 4}
REPO_LAUNCH = Path(__file__).resolve().parents[1] / "launch" / "accelerate"


def launch_args() -> list[str]:
    """The repository's accelerate config for this machine, or the same settings as flags (installed package)."""
    gpus = torch.cuda.device_count()
    if gpus == 1:
        config = REPO_LAUNCH / "single_gpu.yaml"
        flags = ["--num_processes", "1", "--mixed_precision", "bf16"]
    elif gpus > 1:
        config = REPO_LAUNCH / "single_node.yaml"
        flags = ["--multi_gpu", "--mixed_precision", "bf16"]
        return (["--config_file", str(config)] if config.is_file() else flags) + ["--num_processes", str(gpus)]
    else:
        config = REPO_LAUNCH / "cpu_2proc.yaml"
        flags = ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"]
    return ["--config_file", str(config)] if config.is_file() else flags + ["--num_machines", "1",
                                                                              "--dynamo_backend", "no"]


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1" if not torch.cuda.is_available() else env.get("OMP_NUM_THREADS", "4"))
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise BonedistError(f"step failed (exit {result.returncode}): {' '.join(cmd[:6])} ...; last lines of "
                            f"{log}:\n{tail}")


def run_demo(out: str | Path = "runs/demo", n: int = 400, epochs: int | None = None, steps_per_epoch: int = 0,
             models: tuple[str, ...] = MODELS, seed: int = 0) -> dict:
    from bonedist.data.pack import PackOptions, pack_dataset
    from bonedist.data.synth import synth_dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    start = time.perf_counter()
    print(f"1/4 synthesising {n} + {n // 5} + {n // 5} hand phantoms ...", flush=True)
    synth_dataset(out / "phantoms", n=n, n_val=n // 5, n_test=n // 5, seed=seed, size=192, progress=False)
    print("2/4 packing them into WebDataset shards ...", flush=True)
    _, code = pack_dataset(out / "phantoms", out / "shards", PackOptions(size=64, samples_per_shard=50,
                                                                          progress=False))
    if code:
        raise BonedistError("packing the phantoms failed")
    launch = launch_args()
    for i, model in enumerate(models, 1):
        n_epochs = epochs or DEMO_EPOCHS[model]
        print(f"3/4 training {model} ({i}/{len(models)}, {n_epochs} epochs, accelerate launch "
              f"{' '.join(launch)}) ...", flush=True)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", "0", "-m",
               "bonedist.train", "--model", model, "--shards", str(out / "shards"), "--preset", "tiny",
               "--experiment", "demo", "--runs-dir", str(out / "runs"), "--epochs", str(n_epochs), "--wandb", "off",
               "--resume", "never", "--seed", str(seed)]
        if steps_per_epoch:
            cmd += ["--steps-per-epoch", str(steps_per_epoch)]
        _run(cmd, log)
    print("4/4 evaluating the models and ensembles on the test phantoms ...", flush=True)
    _run([sys.executable, "-m", "bonedist", "evaluate", "--runs", str(out / "runs" / "demo"), "--wandb", "off"], log)
    report = out / "runs" / "demo" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    _print_headline(metrics, report, time.perf_counter() - start)
    return metrics


def _print_headline(metrics: dict, report: Path, seconds: float) -> None:
    rows = metrics["metrics"]
    baseline = rows["predict_the_mean"]["mae_months"]
    print(f"\ndone in {seconds / 60:.1f} min. Test MAE in months ({metrics['n']} phantoms):")
    print(f"  {'predict the mean (baseline)':<30}{baseline:7.1f}")
    for name, m in rows.items():
        if name != "predict_the_mean":
            print(f"  {name:<30}{m['mae_months']:7.1f}   ({m['mae_months'] / baseline:.0%} of the baseline)")
    print(f"report: {report / 'report.md'}")
