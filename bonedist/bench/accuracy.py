"""``bonedist bench accuracy``: from a folder in an official layout to MAE per model and ensemble, within a budget.

    bonedist bench accuracy --data /data/rsna --preset improved --budget 240
    bonedist bench accuracy --data /data/rsna --preset paper,improved --image-size 384 --budget 120 \
        --pretrained weights/

Packs ``--data`` (resumable) into OUT/shards, trains each preset's default model list (``bonedist models --preset
P``; ``--models`` names others) in OUT/runs/PRESET/RUN, each run its share of the time budget (the preset's
shares for its default list, ``--shares`` or equal; what one run leaves unused goes to the next; a model the list
trains twice, or ``--replicas 2``, runs again as MODEL-2 with another seed, a separate ensemble member), evaluates
each preset on the test split (the validation split when the test split has no ages) with `bonedist evaluate`, and
prints the MAE of every run and ensemble beside the predict-the-mean baseline measured on the same images (and the
presets side by side). Runs in one process, on one GPU or on the CPU.

Where a preset's list has several runs, the benchmark also trains the list's first model alone with the whole budget
(OUT/runs/PRESET-whole/MODEL; ``--single MODEL`` names another, ``--single off`` skips it; the benchmark then takes
twice the budget) and reports it as the row ``MODEL (whole budget)``: an ensemble earns its compute only where it
beats that row, the same minutes spent on one model.

``--student MODEL`` distils inside the same budget: the preset's runs (the teachers) train in ``1 - --student-share``
of it, predict the training split (`bonedist evaluate --split train`, into OUT/runs/PRESET-teacher), and MODEL learns
from their ensemble's predictions beside the labels (``bonedist train --teacher``, OUT/runs/PRESET-student/MODEL) in
what is left; it is reported as the row ``MODEL (student)`` beside its teachers and the whole-budget model.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bonedist import BonedistError
from bonedist.files import write_atomic, write_json_atomic


def pack_for_bench(data: str | Path, shards: Path, size: int, workers: int = 0, holdout: dict | None = None,
                   holdout_seed: int = 0) -> Path:
    """``data`` packed at ``size`` into ``shards`` (resumable), with a train and a validation split."""
    from bonedist.data.manifest import load_manifest
    from bonedist.data.pack import PackOptions, pack_dataset

    print(f"packing {data} at {size} px into {shards} (resumes if interrupted)")
    options = PackOptions(size=size, workers=workers, holdout=holdout or {}, holdout_seed=holdout_seed)
    _, code = pack_dataset(data, shards, options)
    if code != 0:
        raise BonedistError(f"packing {data} failed; see the messages above")
    splits = load_manifest(shards)["splits"]
    for needed in ("train", "validation"):
        if needed not in splits:
            raise BonedistError(f"--data {data}: no {needed} split found; the benchmark needs train and validation "
                                f"(and ideally a labelled test split) in an official RSNA/Kaggle layout, or "
                                f"--holdout validation:N,test:M to carve them from the training table")
    return Path(shards)


def bench_accuracy(data: str | Path, presets: list[str], size: int | None = None, budget: float = 60.0,
                   models: list[str] | None = None, out: str | Path = "runs/bench-accuracy",
                   pretrained: str | None = None, wandb: str = "off", workers: int = 0,
                   overrides: dict | None = None, holdout: dict | None = None, holdout_seed: int = 0,
                   seeds: list[int] | None = None, shares: dict | None = None, replicas: int | None = None,
                   single: str = "auto", student: str | None = None, student_share: float = 0.5) -> dict:
    """See the module docstring. ``models``: the same models in every preset (default: each preset's default model
    list, ``bonedist models --preset P``, with its budget shares); ``seeds``: the whole benchmark (training and
    evaluation, ``budget`` minutes each time) once per seed, every row as mean ± standard deviation; ``shares``: each
    model's relative share of the budget (default: the preset's shares for its default list, else equal);
    ``replicas``: runs per model, each another seed and a separate ensemble member (default: the preset's for its
    default list, else one); ``single``: the model trained alone with the whole budget beside a list of several
    runs (auto: the list's first; off: none); ``student``: a model distilled from the runs inside the budget, in
    ``student_share`` of it (one preset)."""
    from bonedist.data.manifest import load_manifest
    from bonedist.train.presets import preset_values

    if budget <= 0:
        raise BonedistError(f"--budget must be positive minutes, got {budget}")
    jobs = plan_jobs(presets, models, shares, replicas)
    pupils = plan_student(presets, student, student_share)
    alone = plan_single(jobs, single, distilled=bool(pupils))
    models = list(dict.fromkeys(j.model for j in jobs))
    shares = {f"{j.preset}/{j.run}": j.share for j in jobs}
    size = size or max(preset_values(p).get("input", {}).get("image_size", 500) for p in presets)
    seeds = list(seeds or [None])
    out = Path(out)
    start = time.perf_counter()
    print(f"[1/3] {len(seeds)} seed(s) x {budget:g} training minutes each"
          + (f" ({1 - student_share:.0%} for the runs, then {student_share:.0%} for {student} distilled from them)"
             if pupils else "")
          + (f", then {budget:g} more for one model alone ({', '.join(f'{j.preset}/{j.model}' for j in alone)}; "
             f"--single off skips it)" if alone else ""))
    shards = pack_for_bench(data, out / "shards", size, workers, holdout, holdout_seed)
    splits = load_manifest(shards)["splits"]
    split = "test" if splits.get("test", {}).get("labeled") else "validation"
    pack_seconds = time.perf_counter() - start
    per_seed, trained, train_seconds, alone_seconds = [], [], 0.0, 0.0
    for seed in seeds:
        runs = out / "runs" if seed is None else out / "runs" / f"seed{seed}"
        t0 = time.perf_counter()
        trained += _train_jobs(shards, runs, jobs, budget * (1.0 - student_share) if pupils else budget, size,
                               pretrained, wandb, overrides, seed)
        for job in pupils:  # the teachers predict the training split; the student learns in what is left
            table = _teacher_predictions(runs, job.preset, wandb, workers, jobs)
            left = budget - (time.perf_counter() - t0) / 60.0
            trained += _train_jobs(shards, runs, [job], max(left, 0.05), size, pretrained, wandb,
                                   {**(overrides or {}), "teacher": str(table)}, seed)
        train_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        for job in alone:  # each alone with the whole budget
            trained += _train_jobs(shards, runs, [job], budget, size, pretrained, wandb, overrides, seed)
        alone_seconds += time.perf_counter() - t0
        per_seed.append(_evaluate_presets(runs, presets, split, splits, wandb, workers, jobs + alone + pupils))
    summary = {"data": str(data), "size": size, "split": split, "n": splits[split]["count"], "presets": presets,
               "models": models, "shares": shares, "budget_min": budget, "seeds": seeds,
               "single": {j.preset: j.model for j in alone}, "single_min": alone_seconds / 60.0 / len(seeds),
               "student": {j.preset: j.model for j in pupils}, "student_share": student_share if pupils else 0.0,
               "pack_min": pack_seconds / 60.0, "train_min": train_seconds / 60.0 / len(seeds), "runs": trained,
               **_combine(per_seed)}
    write_json_atomic(out / "accuracy.json", summary)
    table = format_table(summary)
    write_atomic(out / "accuracy.md", table + "\n")
    print(table)
    return summary


WHOLE = "-whole"  # the folder suffix of a preset's model trained alone with the whole budget
WHOLE_ROW = "{model} (whole budget)"
STUDENT = "-student"  # ... of the model distilled from the preset's runs
STUDENT_ROW = "{model} (student)"
TEACHER = "-teacher"  # ... of the runs' predictions on the training split, the student's teacher table


class Job(NamedTuple):
    """One training run of a benchmark: ``run`` is its folder and row (the model's name, or ``MODEL-2`` ... for
    another seed of it, ``models.replica_run``), ``share`` its relative share of the budget; ``whole``: the model
    alone with the whole budget, in PRESET-whole; ``student``: distilled from the preset's runs, in PRESET-student."""

    preset: str
    model: str
    share: float
    replica: int = 0
    whole: bool = False
    student: bool = False

    @property
    def experiment(self) -> str:
        return self.preset + (WHOLE if self.whole else STUDENT if self.student else "")

    @property
    def row(self) -> str:
        """Its row in the tables: a whole-budget model's and a student's are named so."""
        return (WHOLE_ROW if self.whole else STUDENT_ROW if self.student else "{model}").format(model=self.run)

    @property
    def run(self) -> str:
        from bonedist.models import replica_run

        return replica_run(self.model, self.replica)[0]


def plan_jobs(presets: list[str], models: list[str] | None = None, shares: dict | None = None,
              replicas: int | None = None) -> list[Job]:
    """Every run: ``models`` in every preset at equal shares, or each preset's default model list with its shares
    and seed replicas (``models.default_roster``); ``shares`` overrides by model (the share of each of its runs),
    ``replicas`` the number of runs of every model (each another seed, a separate ensemble member)."""
    from bonedist.models import default_roster, is_model, list_models
    from bonedist.train.presets import list_presets

    for preset in presets:
        if preset not in list_presets():
            raise BonedistError(f"--preset {preset!r}: presets are {', '.join(list_presets())}")
    unknown = [m for m in models or [] if not is_model(m)]
    if unknown:
        raise BonedistError(f"--models: unknown {sorted(unknown)}; choose from {', '.join(list_models())}")
    if replicas is not None and replicas < 1:
        raise BonedistError(f"--replicas {replicas}: at least one run per model")
    given = shares or {}
    rosters = {p: ({m: (1.0, 1) for m in models} if models else default_roster(p)) for p in presets}
    jobs = [Job(p, m, float(given.get(m, share)), k) for p in presets
            for m, (share, n) in rosters[p].items() for k in range(replicas or n)]
    names = list(dict.fromkeys(j.model for j in jobs))
    if any(j.share <= 0 for j in jobs) or set(given) - set(names):
        raise BonedistError(f"--shares: positive weights for models of the run ({', '.join(names)}), got {given}")
    return jobs


def plan_student(presets: list[str], student: str | None, share: float) -> list[Job]:
    """The distilled student's run (one preset), with ``share`` of the budget."""
    from bonedist.models import is_model, list_models

    if not student:
        return []
    if not is_model(student):
        raise BonedistError(f"--student {student!r}: a model ({', '.join(list_models())})")
    if len(presets) != 1:
        raise BonedistError(f"--student: one preset at a time (got {', '.join(presets)})")
    if not 0.0 < share < 1.0:
        raise BonedistError(f"--student-share {share:g}: the student's share of the budget, between 0 and 1")
    return [Job(presets[0], student, share, student=True)]


def plan_single(jobs: list[Job], single: str = "auto", distilled: bool = False) -> list[Job]:
    """The whole-budget single-model run beside each preset whose list has several runs (or shares the budget
    with a distilled student): ``auto`` its list's first model, a model name that model, ``off`` none."""
    from bonedist.models import is_model, list_models

    if single not in ("auto", "off") and not is_model(single):
        raise BonedistError(f"--single {single!r}: auto, off or a model ({', '.join(list_models())})")
    if single == "off":
        return []
    out = []
    for preset in dict.fromkeys(j.preset for j in jobs):
        listed = [j for j in jobs if j.preset == preset]
        if len(listed) > 1 or distilled or (single != "auto" and listed[0].model != single):
            out.append(Job(preset, listed[0].model if single == "auto" else single, 1.0, whole=True))
    return out


def _train_jobs(shards: Path, runs: Path, jobs: list[Job], budget, size, pretrained, wandb, overrides,
                seed) -> list[dict]:
    """Every job within ``budget`` minutes, each its share of what is left when it starts (what a run leaves
    unused, ending at its last epoch early, goes to the runs after it)."""
    from bonedist.models import model_info, replica_run
    from bonedist.train.config import resolve_config
    from bonedist.train.engine import train_in_process

    total = sum(j.share for j in jobs)
    print(f"[2/3] training {len(jobs)} run(s) in {budget:g} minutes{'' if seed is None else f', seed {seed}'}, "
          f"the budget split by share: " + ", ".join(f"{j.preset}/{j.run} (share {j.share:g}: "
                                                       f"{j.share / total * budget:.1f} min)" for j in jobs))
    began, trained = time.perf_counter(), []
    for i, job in enumerate(jobs):
        left = max(budget * 60.0 - (time.perf_counter() - began), 0.0)
        share = left * job.share / sum(j.share for j in jobs[i:]) / 60.0
        options = {"pretrained": pretrained} if pretrained is not None and model_info(job.model).pretrained else {}
        extra = {**(overrides or {}), **({} if seed is None else {"seed": seed})}
        # patches keep their share of the side (InputConfig.patch_share); Inception keeps its minimum
        cfg = resolve_config(job.model, str(shards), job.preset, experiment=job.experiment, runs_dir=str(runs),
                             input={"image_size": size}, model_options=options, time_budget_min=max(share, 0.05),
                             wandb=wandb, **extra)
        run, run_seed = replica_run(job.model, job.replica, cfg.seed)  # replica k: seed + 1000 k, MODEL-(k+1)
        cfg = dataclasses.replace(cfg, seed=run_seed, run_name=run)
        print(f"  {job.experiment}/{run}: up to {cfg.epochs} epochs in {share:.1f} min, seed {run_seed}"
              + (" (alone, the whole budget)" if job.whole else ""))
        t0 = time.perf_counter()
        code, _, _ = train_in_process(cfg)
        if code != 0:
            raise BonedistError(f"training {job.experiment}/{run} stopped (exit {code}); run the same command to "
                                f"resume")
        trained.append({"preset": job.preset, "model": job.model, "run": run, "seed": run_seed, "whole": job.whole,
                        "student": job.student, "minutes": (time.perf_counter() - t0) / 60})
    return trained


def _teacher_predictions(runs: Path, preset: str, wandb, workers, jobs: list[Job]) -> Path:
    """The preset's runs' predictions on the training split (their ensemble's, with several): the teacher table."""
    from bonedist.eval.evaluate import EvalOptions, evaluate

    out = runs / (preset + TEACHER)
    teachers = [j for j in jobs if j.preset == preset]
    planned = ",".join(dict.fromkeys(j.model for j in teachers))
    table, bests = out / "predictions.csv", [runs / preset / j.run / "best" / "meta.json" for j in teachers]
    if table.is_file() and all(b.is_file() and b.stat().st_mtime <= table.stat().st_mtime for b in bests):
        print(f"  {preset}: the teachers' predictions on the training split, {table}, are newer than their "
              f"best/: kept (a resumed student continues on the same table)")
        return table
    print(f"  {preset}: the teachers ({planned}) predict the training split into {out}")
    evaluate(EvalOptions(runs=str(runs / preset), split="train", wandb=wandb, workers=workers or 2, expect=planned,
                         out=str(out)))
    return table


def _evaluate_presets(runs: Path, presets, split, splits, wandb, workers, jobs: list[Job]) -> dict:
    from bonedist.eval.evaluate import EvalOptions, evaluate

    print(f"[3/3] evaluating on the {split} split ({splits[split]['count']} radiographs)")
    results, bias, intervals, weights, checks = {}, {}, {}, {}, {}
    for preset in presets:
        planned = ",".join(dict.fromkeys(j.model for j in jobs if j.preset == preset and not (j.whole or j.student)))
        result = evaluate(EvalOptions(runs=str(runs / preset), split=split, wandb=wandb, workers=workers or 2,
                                      expect=planned))  # warns only of what failed
        results[preset] = {name: m["mae_months"] for name, m in result["metrics"].items()}
        bias[preset] = {name: m["bias_months"] for name, m in result["metrics"].items()}
        intervals[preset] = {name: _interval_summary(r) for name, r in result.get("intervals", {}).items()}
        for job in (j for j in jobs if j.preset == preset and (j.whole or j.student)):
            alone = evaluate(EvalOptions(runs=str(runs / job.experiment), split=split, wandb=wandb,
                                         workers=workers or 2, expect=job.model))
            row, metrics = job.row, alone["metrics"][job.run]
            results[preset][row], bias[preset][row] = metrics["mae_months"], metrics["bias_months"]
            if job.run in alone.get("intervals", {}):
                intervals[preset][row] = _interval_summary(alone["intervals"][job.run])
        if "fitted" in result["ensembles"]:
            weights[preset] = {"weights": result["ensembles"]["fitted"], **result.get("ensemble_fit", {})}
        checks[preset] = {name: {kind: c[kind]["mae_months"] for kind in c} | {
            "slope": c["validation_linear"]["slope"]} for name, c in result.get("calibration_check", {}).items()}
    return {"mae_months": results, "bias_months": bias, "intervals": intervals, "ensemble_fit": weights,
            "calibration_check": checks}


def _interval_summary(report: dict) -> dict:
    """Coverage and width of a row's intervals, with its worst sex and its worst age band of 50 or more."""
    groups = {"male": report["male"], "female": report["female"],
              **{band: g for band, g in report["age_bands"].items() if g["n"] >= 50}}
    groups = {k: g for k, g in groups.items() if g["coverage"] is not None}
    worst = min(groups, key=lambda k: groups[k]["coverage"]) if groups else None
    return {"method": report["method"], "nominal": report["nominal"], "coverage": report["coverage"],
            "mean_width_months": report["mean_width_months"], "worst_group": worst,
            "worst_group_coverage": groups[worst]["coverage"] if worst else None}


def _combine(per_seed: list[dict]) -> dict:
    """Each row's mean over the seeds (and its standard deviation with several)."""
    if len(per_seed) == 1:
        return per_seed[0]
    out = {}
    for key in ("mae_months", "bias_months"):
        out[key], out[f"{key}_sd"] = {}, {}
        for preset in per_seed[0][key]:
            rows = {row for s in per_seed for row in s[key][preset]}
            values = {row: [s[key][preset][row] for s in per_seed if row in s[key][preset]] for row in rows}
            out[key][preset] = {row: float(sum(v) / len(v)) for row, v in values.items()}
            out[f"{key}_sd"][preset] = {row: float(statistics.stdev(v)) if len(v) > 1 else 0.0
                                        for row, v in values.items()}
    out["intervals"] = per_seed[-1].get("intervals", {})  # the last seed's (every seed's under per_seed)
    out["ensemble_fit"] = per_seed[-1].get("ensemble_fit", {})
    out["calibration_check"] = {  # each MAE's mean over the seeds
        preset: {row: {k: float(np.mean([s["calibration_check"][preset][row][k] for s in per_seed]))
                       for k in c} for row, c in rows.items()
                 if all(row in s.get("calibration_check", {}).get(preset, {}) for s in per_seed)}
        for preset, rows in per_seed[-1].get("calibration_check", {}).items()}
    out["per_seed"] = per_seed
    return out


def format_table(summary: dict) -> str:
    """MAE and bias per model and ensemble, each MAE also as a share of the predict-the-mean baseline's; with
    several seeds each MAE is a mean ± standard deviation over them."""
    presets, results, bias = summary["presets"], summary["mae_months"], summary.get("bias_months", {})
    spread = summary.get("mae_months_sd", {})
    seeds = [s for s in summary.get("seeds", [None]) if s is not None]
    rows = []
    for preset in presets:
        rows += [r for r in results[preset] if r not in rows]
    rows.sort(key=lambda r: (r != "predict_the_mean", r.startswith("ensemble"), r))
    width = 16 if not spread else 22
    lines = [f"accuracy on {summary['n']} {summary['split']} radiographs at {summary['size']} px; packing "
             f"{summary['pack_min']:.1f} min, training {summary['train_min']:.1f} of {summary['budget_min']:g} min"
             + (f" (and {summary['single_min']:.1f} for the model alone)" if summary.get("single") else "")
             + (f" per seed, seeds {','.join(map(str, seeds))} (mean ± sd)" if len(seeds) > 1 else ""),
             f"{'(months)':<26}" + "".join(f"{p + ' MAE':>{width}}{'bias':>8}{'/mean':>7}" for p in presets)]
    for row in rows:
        line = f"{row:<26}"
        for preset in presets:
            value, base = results[preset].get(row), results[preset].get("predict_the_mean")
            if value is None:
                line += f"{'-':>{width}}{'-':>8}{'-':>7}"
                continue
            sd = spread.get(preset, {}).get(row)
            text = f"{value:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")
            shift = bias.get(preset, {}).get(row)
            line += f"{text:>{width}}" + (f"{shift:>+8.2f}" if shift is not None else f"{'-':>8}")
            line += f"{value / base:>7.2f}" if base else f"{'-':>7}"
        lines.append(line)
    for preset in presets:
        base = results[preset].get("predict_the_mean")
        members = {k: v for k, v in results[preset].items() if k != "predict_the_mean" and v is not None
                   and not k.startswith("ensemble")}
        best = min((v, k) for k, v in results[preset].items() if k != "predict_the_mean" and v is not None)
        if base:
            lines.append(f"{preset}: best {best[1]} {best[0]:.2f} months = {best[0] / base:.2f}x the "
                         f"predict-the-mean baseline ({base:.2f}: the training split's mean age for everyone)")
        alone = {k: v for k, v in members.items() if k.endswith(WHOLE_ROW.format(model=""))}
        students = {k: v for k, v in members.items() if k.endswith(STUDENT_ROW.format(model=""))}
        members = {k: v for k, v in members.items() if k not in alone and k not in students}
        teacher = min(((v, k) for k, v in results[preset].items()
                       if v is not None and (k in members or k.startswith("ensemble"))), default=None)
        if members and teacher[1].startswith("ensemble"):
            member = min((v, k) for k, v in members.items())
            lines.append(f"{preset}: {teacher[1]} = {teacher[0] / member[0]:.2f}x its best member ({member[1]} "
                         f"{member[0]:.2f})")
        for row, value in students.items():  # the runs' ensemble (or run) taught it
            against = [f"{value / teacher[0]:.2f}x its teacher {teacher[1]} {teacher[0]:.2f}"] if teacher else []
            against += [f"{value / v:.2f}x {k} {v:.2f}" for k, v in alone.items()]
            lines.append(f"{preset}: the student {row} {value:.2f} = " + ", ".join(against))
        shared = min([teacher] * bool(teacher) + [(v, k) for k, v in students.items()], default=None)
        for row, value in alone.items() if shared else ():
            verdict = "beats it" if shared[0] < value else "does not beat it"
            lines.append(f"{preset}: the best of the runs sharing the budget, {shared[1]} {shared[0]:.2f}, = "
                         f"{shared[0] / value:.2f}x {row} {value:.2f}: sharing the budget {verdict}")
    for preset, fit in summary.get("ensemble_fit", {}).items():
        if "cross_validated_mae_months" not in fit:
            continue
        lines.append(f"{preset}: ensemble_fitted weights (validation" + (", last seed" if len(seeds) > 1 else "")
                     + "): " + ", ".join(f"{m} {w:.2f}" for m, w in fit["weights"].items())
                     + f"; {fit['folds']}-fold cross-validated MAE on validation "
                     f"{fit['cross_validated_mae_months']:.2f} (equal {fit['equal_mae_months']:.2f}, best member "
                     f"{fit['best_member']} {fit['best_member_mae_months']:.2f})")
        if fit.get("error_correlation"):
            lines.append(f"{preset}: correlation of the members' errors on validation: "
                         + ", ".join(f"{pair} {r:.2f}" for pair, r in fit["error_correlation"].items()))
    for preset, rows in summary.get("calibration_check", {}).items():
        if rows:
            lines.append(f"{preset}: MAE with a correction fitted on validation (as trained / offset / line, slope)"
                         + (", mean over the seeds" if len(seeds) > 1 else "") + ": "
                         + "; ".join(f"{row} {c['as_trained']:.2f} / {c['validation_offset']:.2f} / "
                                     f"{c['validation_linear']:.2f}, {c['slope']:.3f}" for row, c in rows.items()))
    for preset in presets:
        rows = summary.get("intervals", {}).get(preset, {})
        if not rows:
            continue
        nominal = next(iter(rows.values()))["nominal"]
        lines.append(f"{preset}: {nominal:.0%} prediction intervals (conformal, calibrated on the validation split)"
                     + (", last seed" if len(seeds) > 1 else "")
                     + f"\n{'':<26}{'method':>11}{'coverage':>10}{'width':>8}  worst sex or age band (n>=50)")
        for row, r in sorted(rows.items(), key=lambda kv: (kv[0].startswith("ensemble"), kv[0])):
            worst = f"{r['worst_group']} {r['worst_group_coverage']:.1%}" if r["worst_group"] else "-"
            lines.append(f"{row:<26}{r['method']:>11}{r['coverage']:>10.1%}{r['mean_width_months']:>8.1f}  {worst}")
    return "\n".join(lines)
