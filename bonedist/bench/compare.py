"""``bonedist bench compare``: controlled comparisons of training settings, several seeds each, on the validation
split only (never the test split: the recipe is chosen here, the test split judges it once, later).

    bonedist bench compare --data ../shared/data/rsna-train-100px --holdout validation:600,test:1200 \\
        --model resnet18 --preset scratch --size 100 --budget 5 --seeds 0,1 \\
        --vary lr=1e-3,4e-3 --vary batch_size=32,128 --vary ema=0.999 --vary augment=0.5,2 --vary loss=mse,huber

One factor at a time: the baseline (the preset's recipe at ``--size``, ``--budget`` minutes per run) and, for each
``--vary KEY=V1,V2``, the baseline with only KEY changed, each trained once per seed. KEY is a ``TrainConfig`` field
(``lr``, ``batch_size``, ``warmup_epochs``, ``ema``, ``loss``, ``balanced``, ...), ``input.FIELD`` or
``model.FIELD``, or ``augment`` (a factor on the preset's rotation, shift and zoom ranges; 0 turns augmentation
off). Every run of a setting has the same time budget, so a setting that costs more per step gets fewer steps, as
it would in use. Prints validation MAE and bias per setting as mean ± standard deviation over the seeds, each
beside the baseline; writes OUT/compare.json and compare.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonedist import BonedistError
from bonedist.files import read_json, write_atomic, write_json_atomic
from bonedist.options import parse_value

MERGED_PREFIX = {"input": "input", "model": "model_options"}


@dataclass
class Setting:
    name: str  # "baseline" or "KEY=VALUE"
    overrides: dict = field(default_factory=dict)


def parse_vary(items: list[str]) -> list[Setting]:
    """``["lr=1e-3,4e-3", "ema=0.999"]`` → one setting per value, each changing one key."""
    settings = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise BonedistError(f"--vary {item!r}: expected KEY=VALUE[,VALUE...], e.g. lr=1e-3,4e-3")
        for text in values.split(","):
            settings.append(Setting(f"{key.strip()}={text.strip()}", {key.strip(): parse_value(text.strip())}))
    return settings


def apply(base: dict, overrides: dict, preset_augment: dict) -> dict:
    """The baseline's overrides with one setting's changes (dotted keys go into their dict field)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in overrides.items():
        head, dot, rest = key.partition(".")
        if key == "augment":
            out["augment"] = scaled_augment(preset_augment, float(value))
        elif dot and head in MERGED_PREFIX:
            out.setdefault(MERGED_PREFIX[head], {})[rest] = value
        elif dot:
            raise BonedistError(f"--vary {key}: dotted keys are input.FIELD or model.FIELD")
        else:
            out[key.replace("-", "_")] = value
    return out


def scaled_augment(preset: dict, factor: float) -> dict:
    """The preset's augmentation with its rotation, shift and zoom ranges times ``factor`` (0: none at all)."""
    from bonedist.data.augment import AugmentConfig

    base = AugmentConfig(**preset)
    if factor <= 0:
        return {"enabled": False}
    low, high = base.scale
    return {**preset, "rotation": base.rotation * factor, "shear": base.shear * factor,
            "translate": tuple(min(0.45, t * factor) for t in base.translate),
            "scale": (max(0.05, 1 - (1 - low) * factor), 1 + (high - 1) * factor)}


def bench_compare(data: str | Path, model: str, preset: str = "scratch", size: int = 100, budget: float = 5.0,
                  seeds: list[int] | None = None, vary: list[str] | None = None, out: str | Path = "runs/compare",
                  holdout: dict | None = None, holdout_seed: int = 0, workers: int = 0,
                  overrides: dict | None = None) -> dict:
    from bonedist.bench.accuracy import pack_for_bench
    from bonedist.train.config import recipe_values, resolve_config
    from bonedist.train.engine import end_processes, train_in_process

    seeds = seeds or [0, 1]
    settings = [Setting("baseline")] + parse_vary(vary or [])
    out = Path(out)
    shards = pack_for_bench(data, out / "shards", size, workers, holdout, holdout_seed)
    preset_augment = recipe_values(model, preset).get("augment", {})
    base = {"input": {"image_size": size}, "time_budget_min": budget, "wandb": "off", **(overrides or {})}
    total = len(settings) * len(seeds) * budget
    print(f"comparing {len(settings)} settings x {len(seeds)} seeds of {model} ({preset}, {size} px, {budget:g} min "
          f"each): about {total:.0f} minutes of training; validation split only")
    rows: dict[str, list[dict]] = {s.name: [] for s in settings}
    try:
        for seed in seeds:
            for setting in settings:
                values = apply(base, setting.overrides, preset_augment)
                tag = setting.name.replace("/", "-").replace("=", "-")
                cfg = resolve_config(model, str(shards), preset, experiment=f"{tag}/seed{seed}",
                                     runs_dir=str(out / "runs"), seed=seed, **values)
                started = time.perf_counter()
                code, run_dir, main = train_in_process(cfg, f"--- {setting.name}, seed {seed}")
                if code != 0:
                    raise BonedistError(f"{setting.name}, seed {seed}: training stopped (exit {code}); run the same "
                                        f"command to resume")
                if main:
                    rows[setting.name].append({"seed": seed, "minutes": (time.perf_counter() - started) / 60,
                                               **_validation_result(run_dir)})
    finally:
        end_processes()
    summary = {"data": str(data), "model": model, "preset": preset, "size": size, "budget_min": budget,
               "seeds": seeds, "settings": {name: _aggregate(runs) for name, runs in rows.items()}, "runs": rows}
    write_json_atomic(out / "compare.json", summary)
    table = format_compare(summary)
    write_atomic(out / "compare.md", table + "\n")
    print(table)
    return summary


def _validation_result(run_dir: Path) -> dict:
    """The validation MAE and bias of best/ (the run's selected epoch), and the predict-the-mean baseline."""
    from bonedist.eval.runs import check_meta

    meta = check_meta(read_json(run_dir / "best" / "meta.json"), run_dir / "best" / "meta.json")
    metrics = meta.get("metrics") or {}
    return {"val_mae_months": metrics.get("val_mae_months"), "val_bias_months": metrics.get("val_bias_months"),
            "baseline_mae_months": metrics.get("val_baseline_mae_months"), "epochs": meta.get("epoch"),
            "steps": meta.get("global_step")}


def _aggregate(runs: list[dict]) -> dict:
    out = {"n": len(runs)}
    for key in ("val_mae_months", "val_bias_months", "steps"):
        values = np.array([r[key] for r in runs if r.get(key) is not None], dtype=float)
        if len(values):
            out[key] = float(values.mean())
            out[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def format_compare(summary: dict) -> str:
    settings = summary["settings"]
    base = settings["baseline"].get("val_mae_months")
    lines = [f"{summary['model']} ({summary['preset']}, {summary['size']} px, {summary['budget_min']:g} min per run), "
             f"validation MAE over seeds {','.join(map(str, summary['seeds']))} (mean ± sd)",
             "| setting | MAE (months) | vs baseline | bias (months) | optimizer steps |", "|---|---|---|---|---|"]
    for name, row in settings.items():
        if "val_mae_months" not in row:
            continue
        delta = f"{row['val_mae_months'] - base:+.2f}" if base is not None and name != "baseline" else "–"
        lines.append(f"| {name} | {row['val_mae_months']:.2f} ± {row['val_mae_months_sd']:.2f} | {delta} | "
                     f"{row['val_bias_months']:+.2f} ± {row['val_bias_months_sd']:.2f} | {row['steps']:.0f} |")
    return "\n".join(lines)
