"""``bonedist bench accuracy``: from a folder in an official layout to MAE per model and ensemble, within a budget.

    bonedist bench accuracy --data /data/rsna --preset improved --budget 240
    bonedist bench accuracy --data /data/rsna --preset paper,improved --size 384 --budget 120 --pretrained weights/

Packs ``--data`` (resumable) into OUT/shards, trains every model of every preset (runs in OUT/runs/PRESET/MODEL)
with an equal share of the time budget (what one model leaves unused goes to the next), evaluates each preset on
the test split (the validation split when the test split has no ages) with `bonedist evaluate`, and prints the MAE
of every model and ensemble beside the predict-the-mean baseline measured on the same images (and the presets side
by side). Runs in one process, on one GPU or on the CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bonedist import BonedistError


def bench_accuracy(data: str | Path, presets: list[str], size: int | None = None, budget: float = 60.0,
                   models: list[str] | None = None, out: str | Path = "runs/bench-accuracy",
                   pretrained: str | None = None, wandb: str = "off", workers: int = 0,
                   overrides: dict | None = None, holdout: dict | None = None, holdout_seed: int = 0) -> dict:
    from bonedist.data.manifest import load_manifest
    from bonedist.data.pack import PackOptions, pack_dataset
    from bonedist.eval.evaluate import EvalOptions, evaluate
    from bonedist.models import is_model, list_models, model_info
    from bonedist.train.config import resolve_config
    from bonedist.train.engine import train_in_process
    from bonedist.train.presets import list_presets, preset_values

    models = list(models or list_models())
    for preset in presets:
        if preset not in list_presets():
            raise BonedistError(f"--preset {preset!r}: presets are {', '.join(list_presets())}")
    unknown = [m for m in models if not is_model(m)]
    if unknown:
        raise BonedistError(f"--models: unknown {sorted(unknown)}; choose from {', '.join(list_models())}")
    if budget <= 0:
        raise BonedistError(f"--budget must be positive minutes, got {budget}")
    size = size or max(preset_values(p).get("input", {}).get("image_size", 500) for p in presets)
    out = Path(out)
    start = time.perf_counter()

    print(f"[1/3] packing {data} at {size} px into {out / 'shards'} (resumes if interrupted)")
    options = PackOptions(size=size, workers=workers, holdout=holdout or {}, holdout_seed=holdout_seed)
    manifest, code = pack_dataset(data, out / "shards", options)
    if code != 0:
        raise BonedistError(f"packing {data} failed; see the messages above")
    manifest = load_manifest(out / "shards")
    splits = manifest["splits"]
    for needed in ("train", "validation"):
        if needed not in splits:
            raise BonedistError(f"--data {data}: no {needed} split found; bench accuracy needs train and validation "
                                f"(and ideally a labelled test split) in an official RSNA/Kaggle layout, or "
                                f"--holdout validation:N,test:M to carve them from the training table")
    split = "test" if splits.get("test", {}).get("labeled") else "validation"
    pack_seconds = time.perf_counter() - start

    jobs = [(p, m) for p in presets for m in models]
    print(f"[2/3] training {len(jobs)} run(s) in {budget:g} minutes: {', '.join(f'{p}/{m}' for p, m in jobs)}")
    train_start, trained = time.perf_counter(), []
    for i, (preset, model) in enumerate(jobs):
        left = budget * 60.0 - (time.perf_counter() - train_start)
        share = max(left, 0.0) / (len(jobs) - i) / 60.0
        options = {"pretrained": pretrained} if pretrained is not None and model_info(model).pretrained else {}
        # patches keep their share of the side (InputConfig.patch_share); Inception keeps its minimum
        cfg = resolve_config(model, str(out / "shards"), preset, experiment=preset, runs_dir=str(out / "runs"),
                             input={"image_size": size}, model_options=options, time_budget_min=max(share, 0.05),
                             wandb=wandb, **(overrides or {}))
        print(f"  {preset}/{model}: up to {cfg.epochs} epochs in {share:.1f} min")
        t0 = time.perf_counter()
        code, _, _ = train_in_process(cfg)
        if code != 0:
            raise BonedistError(f"training {preset}/{model} stopped (exit {code}); run the same command to resume")
        trained.append({"preset": preset, "model": model, "minutes": (time.perf_counter() - t0) / 60.0})
    train_seconds = time.perf_counter() - train_start

    print(f"[3/3] evaluating on the {split} split ({splits[split]['count']} radiographs)")
    results, bias = {}, {}
    for preset in presets:
        result = evaluate(EvalOptions(runs=str(out / "runs" / preset), split=split, wandb=wandb, workers=workers or 2))
        results[preset] = {name: m["mae_months"] for name, m in result["metrics"].items()}
        bias[preset] = {name: m["bias_months"] for name, m in result["metrics"].items()}
    summary = {"data": str(data), "size": size, "split": split, "n": splits[split]["count"], "presets": presets,
               "models": models, "budget_min": budget, "pack_min": pack_seconds / 60.0,
               "train_min": train_seconds / 60.0, "runs": trained, "mae_months": results, "bias_months": bias}
    (out / "accuracy.json").write_text(json.dumps(summary, indent=1))
    table = format_table(summary)
    (out / "accuracy.md").write_text(table + "\n")
    print(table)
    return summary


def format_table(summary: dict) -> str:
    """MAE and bias per model and ensemble, each MAE also as a share of the predict-the-mean baseline's."""
    presets, results, bias = summary["presets"], summary["mae_months"], summary.get("bias_months", {})
    rows = []
    for preset in presets:
        rows += [r for r in results[preset] if r not in rows]
    rows.sort(key=lambda r: (r != "predict_the_mean", r.startswith("ensemble"), r))
    lines = [f"accuracy on {summary['n']} {summary['split']} radiographs at {summary['size']} px; packing "
             f"{summary['pack_min']:.1f} min, training {summary['train_min']:.1f} of {summary['budget_min']:g} min",
             f"{'(months)':<26}" + "".join(f"{p + ' MAE':>16}{'bias':>8}{'/mean':>7}" for p in presets)]
    for row in rows:
        line = f"{row:<26}"
        for preset in presets:
            value, base = results[preset].get(row), results[preset].get("predict_the_mean")
            if value is None:
                line += f"{'-':>16}{'-':>8}{'-':>7}"
                continue
            shift = bias.get(preset, {}).get(row)
            line += f"{value:>16.2f}" + (f"{shift:>+8.2f}" if shift is not None else f"{'-':>8}")
            line += f"{value / base:>7.2f}" if base else f"{'-':>7}"
        lines.append(line)
    for preset in presets:
        base = results[preset].get("predict_the_mean")
        best = min((v, k) for k, v in results[preset].items() if k != "predict_the_mean" and v is not None)
        if base:
            lines.append(f"{preset}: best {best[1]} {best[0]:.2f} months = {best[0] / base:.2f}x the "
                         f"predict-the-mean baseline ({base:.2f}: the training split's mean age for everyone)")
    return "\n".join(lines)
