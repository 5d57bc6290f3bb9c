"""``bonedist bench compare``: controlled comparisons of training settings, several seeds each, on the validation
split only (never the test split: the recipe is chosen here, the test split judges it once, later).

    bonedist bench compare --data ../shared/data/rsna-train-100px --holdout validation:600,test:1200 \\
        --model resnet18 --preset scratch --image-size 100 --budget 5 --seeds 0,1 \\
        --vary lr=1e-3,4e-3 --vary batch_size=32,128 --vary ema=0.999 --vary augment=0.5,2 --vary loss=mse,huber

One factor at a time: the baseline (the preset's recipe at ``--image-size``, ``--budget`` minutes per run) and, for each
``--vary KEY=V1,V2``, the baseline with only KEY changed, each trained once per seed. KEY is a ``TrainConfig`` field
(``lr``, ``batch_size``, ``warmup_epochs``, ``ema``, ``loss``, ``balanced``, ...), ``input.FIELD`` or
``model.FIELD``, or ``augment`` (a factor on the preset's rotation, shift and zoom ranges; 0 turns augmentation
off). Every run of a setting has the same time budget, so a setting that costs more per step gets fewer steps, as
it would in use. Prints validation MAE and bias per setting as mean ± standard deviation over the seeds, each
beside the baseline; writes OUT/compare.json and compare.md.

The comparison is a grid sweep (``bonedist.sweep``, sampler ``grid``: every setting with every seed, no pruning),
written to OUT/space.yaml and run through the sweep's code: an interrupted comparison resumes where it stopped, and
the same grid runs on a Slurm array (``SPACE=OUT/space.yaml sbatch --array=0-3 launch/slurm/sweep.sbatch``) before
``bench compare`` with the same arguments tabulates it.
"""

from __future__ import annotations

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


def parse_shared(items: list[str]) -> dict:
    """``--set KEY=VALUE`` (repeatable) → the overrides every run of a comparison shares (one value each)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip() or "," in text:
            raise BonedistError(f"--set {item!r}: expected KEY=VALUE (one value), e.g. tta_rotate=5")
        out[key.strip()] = parse_value(text.strip())
    return out


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


STUDY = "compare"


def compare_space(model: str, shards: str, preset: str, size: int, budget: float, seeds: list[int],
                  settings: list[Setting], overrides: dict | None = None) -> dict:
    """The comparison as a sweep's search space: a grid of every setting (``variant``) with every seed, each point
    one training of ``budget`` minutes, no pruning."""
    base = {"model": model, "shards": shards, "preset": preset, "input": {"image_size": size},
            "time_budget_min": budget, "wandb": "off"}
    if overrides:  # --set: shared by every setting (augment=F scales the recipe's ranges, as --vary does)
        from bonedist.train.config import recipe_values

        base = apply(base, overrides, recipe_values(model, preset).get("augment", {}))
    return {"study": STUDY, "base": base, "sampler": "grid", "pruner": "none",
            "params": {"seed": {"choices": list(seeds)}, "variant": {"choices": [s.name for s in settings]}},
            "variants": {s.name: s.overrides for s in settings}}


def bench_compare(data: str | Path, model: str, preset: str = "scratch", size: int = 100, budget: float = 5.0,
                  seeds: list[int] | None = None, vary: list[str] | None = None, out: str | Path = "runs/compare",
                  holdout: dict | None = None, holdout_seed: int = 0, workers: int = 0,
                  overrides: dict | None = None, prepare_only: bool = False) -> dict:
    """Pack ``data``, write the comparison as a grid sweep (OUT/space.yaml), run its trials in this process through
    ``bonedist sweep``'s code (resumable; a Slurm array can run the same space), and summarise them per setting."""
    import yaml

    from bonedist.bench.accuracy import pack_for_bench
    from bonedist.sweep import SweepOptions, load_space, open_study, run_sweep

    seeds = seeds or [0, 1]
    settings = [Setting("baseline")] + parse_vary(vary or [])
    names = [s.name for s in settings]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BonedistError(f"--vary: a setting is named twice ({', '.join(twice)})")
    out = Path(out)
    shards = pack_for_bench(data, out / "shards", size, workers, holdout, holdout_seed)
    space_file = out / "space.yaml"
    write_atomic(space_file, yaml.safe_dump(compare_space(model, str(shards.resolve()), preset, size, budget, seeds,
                                                          settings, overrides), sort_keys=False))
    points = len(settings) * len(seeds)
    total = points * budget
    array = (f"SPACE={space_file} EXTRA_ARGS='--runs-dir {out / 'runs'}' sbatch --array=0-{min(7, points - 1)} "
             f"launch/slurm/sweep.sbatch")
    if prepare_only:
        print(f"wrote {space_file}: {len(settings)} settings x {len(seeds)} seeds. Run the grid, e.g. {array}; then "
              f"this command again (without --prepare-only) tabulates it")
        return {}
    print(f"comparing {len(settings)} settings x {len(seeds)} seeds of {model} ({preset}, {size} px, {budget:g} min "
          f"each): about {total:.0f} minutes of training; validation split only (the same grid on a Slurm array: "
          f"--prepare-only, then {array})")
    code = run_sweep(SweepOptions(space=str(space_file), runs_dir=str(out / "runs"), wandb="off"))
    if code != 0:
        raise BonedistError(f"the comparison stopped (exit {code}); run the same command to resume it")
    space = load_space(space_file)
    study = open_study(space, out / "runs" / STUDY / "sweep")
    rows: dict[str, list[dict]] = {name: [] for name in names}
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    failed = []
    for trial in trials:
        if "variant" not in trial.params:
            continue
        if trial.state.name != "COMPLETE":
            if trial.state.name == "FAIL" and trial.number not in retried:
                failed.append(f"{trial.params['variant']} (seed {trial.params['seed']})")
            continue
        run_dir = out / "runs" / STUDY / trial.user_attrs["run"]
        rows[trial.params["variant"]].append({"seed": trial.params["seed"], "run": str(run_dir),
                                              **_validation_result(run_dir)})
    summary = {"data": str(data), "model": model, "preset": preset, "size": size, "budget_min": budget,
               "seeds": seeds, "settings": {name: _aggregate(runs) for name, runs in rows.items()}, "runs": rows,
               "failed": failed, "space": str(space_file)}
    write_json_atomic(out / "compare.json", summary)
    table = format_compare(summary)
    write_atomic(out / "compare.md", table + "\n")
    print(table)
    if failed:
        print(f"warning: {len(failed)} run(s) failed and are left out of the table: {', '.join(failed)}")
    return summary


def _validation_result(run_dir: Path) -> dict:
    """The validation MAE and bias of best/ (the run's selected epoch), and the predict-the-mean baseline."""
    from bonedist.eval.runs import check_meta

    meta = check_meta(read_json(run_dir / "best" / "meta.json"), run_dir / "best" / "meta.json")
    metrics = meta.get("metrics") or {}
    views = meta.get("views_metrics") or {}  # with --set tta_rotate=... (best/ recalibrated with its views)
    return {"val_mae_months": metrics.get("val_mae_months"), "val_bias_months": metrics.get("val_bias_months"),
            "baseline_mae_months": metrics.get("val_baseline_mae_months"), "epochs": meta.get("epoch"),
            "steps": meta.get("global_step"), "views_mae_months": views.get("val_mae_months")}


def _aggregate(runs: list[dict]) -> dict:
    out = {"n": len(runs)}
    for key in ("val_mae_months", "val_bias_months", "steps", "views_mae_months"):
        values = np.array([r[key] for r in runs if r.get(key) is not None], dtype=float)
        if len(values):
            out[key] = float(values.mean())
            out[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def format_compare(summary: dict) -> str:
    settings = summary["settings"]
    base = settings["baseline"].get("val_mae_months")
    views = any("views_mae_months" in row for row in settings.values())
    lines = [f"{summary['model']} ({summary['preset']}, {summary['size']} px, {summary['budget_min']:g} min per run), "
             f"validation MAE over seeds {','.join(map(str, summary['seeds']))} (mean ± sd)",
             "| setting | MAE (months) | vs baseline | bias (months) | optimizer steps |"
             + (" with test-time views |" if views else ""), "|---|---|---|---|---|" + ("---|" if views else "")]
    for name, row in settings.items():
        if "val_mae_months" not in row:
            continue
        delta = f"{row['val_mae_months'] - base:+.2f}" if base is not None and name != "baseline" else "–"
        lines.append(f"| {name} | {row['val_mae_months']:.2f} ± {row['val_mae_months_sd']:.2f} | {delta} | "
                     f"{row['val_bias_months']:+.2f} ± {row['val_bias_months_sd']:.2f} | {row['steps']:.0f} |"
                     + (f" {row['views_mae_months']:.2f} ± {row['views_mae_months_sd']:.2f} |"
                        if "views_mae_months" in row else (" – |" if views else "")))
    return "\n".join(lines)
