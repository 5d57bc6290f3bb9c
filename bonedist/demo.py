"""``bonedist demo``: the whole pipeline on synthetic phantoms, end to end, in minutes on a laptop CPU.

    bonedist demo --out runs/demo

synthesise train/validation/test phantoms → pack → train every model with one `accelerate launch` (2 CPU processes,
or the machine's GPUs) on the ``tiny`` preset, each within its share of a time budget → evaluate the ensemble →
report, in minutes on a 2-core laptop (``docs/results.md``); ``--keep`` keeps the phantoms, full-precision weights
and resumable checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bonedist import BonedistError

REPO_LAUNCH = Path(__file__).resolve().parents[1] / "launch" / "accelerate"
DEMO_BUDGET_MIN = 2.0  # training minutes for all models together, so that the demo ends in a few minutes


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


def run_demo(out: str | Path = "runs/demo", n: int = 400, budget: float = DEMO_BUDGET_MIN,
             models: list[str] | None = None, seed: int = 0, keep: bool = False) -> dict:
    from bonedist.data.pack import PackOptions, pack_dataset
    from bonedist.data.synth import synth_dataset
    models = list(models or demo_models())
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
    if not keep:
        shutil.rmtree(out / "phantoms")  # the shards hold everything the rest needs
    launch = launch_args()
    print(f"3/4 training {', '.join(models)} on the tiny preset, {budget / len(models):.1f} min each (accelerate "
          f"launch {' '.join(launch)}) ...", flush=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", "0", "-m",
           "bonedist.demo", "--shards", str(out / "shards"), "--runs-dir", str(out / "runs"), "--budget",
           str(budget), "--seed", str(seed), *(["--keep"] if keep else []), *models]
    _run(cmd, log)
    print("4/4 evaluating the models and ensembles on the test phantoms ...", flush=True)
    _run([sys.executable, "-m", "bonedist", "evaluate", "--runs", str(out / "runs" / "demo"), "--wandb", "off"], log)
    report = out / "runs" / "demo" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    _print_headline(metrics, report, time.perf_counter() - start, _size_mb(out))
    return metrics


def demo_models() -> list[str]:
    """The paper's models (those with its numbers to compare with); ``--models`` takes any others."""
    from bonedist.models import list_models, model_info

    return [m for m in list_models("tiny") if model_info(m).paper]


def train_models(shards: str, runs_dir: str, budget: float, models: list[str], seed: int = 0,
                 keep: bool = False) -> int:
    """Under ``accelerate launch``: every model in turn in one set of processes, each with an equal share of the
    budget; unless ``keep``, best/ is saved in half precision and the resumable checkpoints are removed after."""
    from bonedist.train.engine import end_processes

    try:
        return _train_each(shards, runs_dir, budget, models, seed, keep)
    finally:
        end_processes()


def _train_each(shards: str, runs_dir: str, budget: float, models: list[str], seed: int, keep: bool) -> int:
    from bonedist.train.config import resolve_config
    from bonedist.train.engine import train_in_process

    started = time.perf_counter()
    for i, model in enumerate(models):
        left = budget * 60.0 - (time.perf_counter() - started)
        cfg = resolve_config(model, shards, "tiny", experiment="demo", runs_dir=runs_dir, epochs=6,
                             time_budget_min=max(left / (len(models) - i), 1.0) / 60.0, wandb="off", resume="never",
                             seed=seed, keep_last=1, save_dtype="fp32" if keep else "fp16")
        code, run_dir, main = train_in_process(cfg, announce=f"--- {model} ({i + 1}/{len(models)})")
        if code:
            return code
        if main and not keep:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return 0


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def _print_headline(metrics: dict, report: Path, seconds: float, size_mb: float) -> None:
    rows = metrics["metrics"]
    baseline = rows["predict_the_mean"]["mae_months"]
    print(f"\ndone in {seconds / 60:.1f} min, {size_mb:.0f} MB on disk. Test MAE in months ({metrics['n']} "
          f"phantoms):")
    print(f"  {'predict the mean (baseline)':<30}{baseline:7.1f}")
    for name, m in rows.items():
        if name != "predict_the_mean":
            print(f"  {name:<30}{m['mae_months']:7.1f}   ({m['mae_months'] / baseline:.0%} of the baseline)")
    print(f"report: {report / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    """``accelerate launch -m bonedist.demo --shards S --runs-dir R --budget MIN MODEL...`` (run by ``run_demo``)."""
    import argparse

    from bonedist import run_command

    parser = argparse.ArgumentParser(prog="python -m bonedist.demo", description=main.__doc__)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--shards", required=True)
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--budget", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    return run_command("demo", lambda: train_models(args.shards, args.runs_dir, args.budget, args.models, args.seed,
                                                     args.keep))


if __name__ == "__main__":
    raise SystemExit(main())
