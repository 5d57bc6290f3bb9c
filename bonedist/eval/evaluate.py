"""``bonedist evaluate``: every trained model and their ensembles on one split, exactly once per sample.

    bonedist evaluate --runs runs/rsna --split test
    accelerate launch --config_file launch/accelerate/single_node.yaml -m bonedist evaluate --runs runs/rsna

Writes ``runs/EXPERIMENT/report/``: metrics.json, predictions.csv, ensemble.json, report.md and figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator

from bonedist import BonedistError
from bonedist.data.manifest import load_manifest
from bonedist.data.source import DataConfig, open_split, verify_pack
from bonedist.eval.intervals import IntervalCalibration, choose_method, coverage_report
from bonedist.eval.metrics import fit_ensemble_weights, regression_metrics
from bonedist.eval.options import EvalOptions
from bonedist.eval.runs import find_runs, load_trained, paper_weights
from bonedist.files import write_json_atomic
from bonedist.inference import gather_predictions, predict_batches

THUMBNAIL = 96  # px of the W&B predictions table's images


def evaluate(opts: EvalOptions) -> dict:
    cuda = torch.cuda.is_available()
    acc = Accelerator(cpu=not cuda)
    expected = [m.strip() for m in opts.expect.split(",") if m.strip()] if opts.expect else None
    found, missing = find_runs(opts.runs, expected)
    for name in missing:
        acc.print(f"warning: no trained {name} under {opts.runs}; it is left out of the report and the ensembles")
    out = Path(opts.out) if opts.out else Path(opts.runs) / "report"
    if acc.is_main_process:  # a folder that cannot be written fails now, not after every prediction
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    trained = {}
    for name, path in found.items():  # a broken best/ leaves its model out, with a line, not the evaluation
        try:
            trained[name] = load_trained(path, acc.device, name)
        except BonedistError as exc:
            acc.print(f"warning: {name} left out of the report and the ensembles: {exc}")
            missing.append(name)
    if not trained:
        raise BonedistError(f"no trained model under {opts.runs} could be loaded (see the warnings above)")
    shards = opts.shards or same_training_pack(trained)
    manifest = load_manifest(shards)
    if opts.shards:
        _note_other_packs(acc, trained, manifest, shards)
    if opts.split not in manifest["splits"]:
        raise BonedistError(f"--split {opts.split}: {shards} has {', '.join(manifest['splits'])}")
    splits = [opts.split]
    if opts.split != "validation" and "validation" in manifest["splits"]:
        splits.append("validation")  # ensemble weights are fitted there, never on the reported split
    verify_pack(shards, manifest, splits, acc.process_index, acc.num_processes)
    months, seen = {}, {}
    for split in splits:
        months[split], kept = _predict_split(acc, trained, shards, manifest, split, opts,
                                             thumbnails=split == opts.split and opts.wandb != "off")
        if split == opts.split:
            seen = kept
    if not acc.is_main_process:
        return {}
    result = _score(months, opts.split, trained, missing, out, opts.coverage)
    for name, tm in trained.items():
        if tm.views(opts.tta_rotate, opts.tta_scale) != tm.own_views:
            result["notes"].append(f"{name}: test-time views other than those its calibration was refit with at the "
                                   f"end of training, so its bias may shift (train with --tta-rotate/--tta-scale)")
    from bonedist.eval.report import write_report

    write_report(out, result, months[opts.split], trained, seen.get("sample"), opts)
    _log_wandb(opts, out, result, months[opts.split], trained, shards, seen.get("thumbs", {}))
    acc.print(f"report written to {out}")
    return result


def same_training_pack(trained: dict) -> str:
    """The pack every run trained on (``--shards`` unset): runs of one experiment trained on different packs are
    refused with one line naming two of them, since each would be scored on other radiographs than it was split on
    and an ensemble needs its members scored on the same ones."""
    first_name, first = next(iter(trained.items()))
    for name, tm in trained.items():
        a, b = _pack_of(first), _pack_of(tm)
        if a != b:
            raise BonedistError(
                f"{first_name} and {name} were trained on different packs ({first.meta['config'].get('shards')}: "
                f"{a[1]} px, {a[2]}; {tm.meta['config'].get('shards')}: {b[1]} px, {b[2]}): evaluate them in "
                f"separate --runs folders, or name one pack for all with --shards")
    return first.meta["config"]["shards"]


def _pack_of(tm) -> tuple:
    """What identifies a run's pack: its digest over the shards' checksums where saved, else its resolved folder."""
    identity = tm.meta.get("pack_identity") or {}
    where = identity.get("digest") or str(Path(tm.meta["config"].get("shards", "")).resolve())
    return where, tm.meta["pack"]["image_size"], tm.meta["pack"]["resize_mode"]


def _note_other_packs(acc, trained: dict, manifest: dict, shards: str) -> None:
    for name, tm in trained.items():
        pack = tm.meta["pack"]
        if (pack["image_size"], pack["resize_mode"]) != (manifest["image_size"], manifest["resize_mode"]):
            acc.print(f"note: {name} was trained on a {pack['image_size']} px {pack['resize_mode']} pack; --shards "
                      f"{shards} is {manifest['image_size']} px {manifest['resize_mode']}")


def _predict_split(acc, trained, shards, manifest, split, opts,
                   thumbnails: bool) -> tuple[pd.DataFrame, dict]:
    """One row per radiograph in manifest order: truth and every model's (and branch's) prediction in months. The
    split is read once for all models; what was seen on the way: the first batch (``sample``, for the report's
    attention examples) and, with ``thumbnails``, a small image of every radiograph (``thumbs``, for W&B)."""
    cfg = DataConfig(shards=shards, batch_size=opts.batch_size, eval_batch_size=opts.batch_size,
                     mode=opts.data_mode, workers=opts.workers)
    data = open_split(cfg, split, acc.device, acc.process_index, acc.num_processes, manifest,
                      progress=acc.is_local_main_process)
    predictors = {name: tm.predictor(opts.flip, opts.aggregate, opts.precision, opts.tta_rotate, opts.tta_scale)
                  for name, tm in trained.items()}
    seen: dict = {"thumbs": {}}
    local = predict_batches(predictors, data.evaluation(), observe=_keeper(seen, thumbnails))
    preds = gather_predictions(local, len(data.index))
    if thumbnails and acc.num_processes > 1:  # every rank's share (rank 0 logs them)
        from accelerate.utils import gather_object

        seen["thumbs"] = {k: v for part in gather_object([seen["thumbs"]]) for k, v in part.items()}
    columns: dict[str, np.ndarray] = {"key": preds["key"], "male": preds["male"].astype(bool),
                                      "truth": preds["age"]}
    for name, tm in trained.items():
        for column, key in tm.model.task.columns(name).items():  # the model, and each of its branches
            columns[column] = tm.months(preds[f"{name}/{key}"], key)
    return pd.DataFrame(columns), seen


def _keeper(seen: dict, thumbnails: bool):
    import cv2

    def observe(batch: dict) -> None:
        seen.setdefault("sample", {k: v[:8] for k, v in batch.items()})
        if thumbnails:
            for key, image in zip(batch["key"], batch["image"][:, 0].cpu().numpy()):
                seen["thumbs"][key] = cv2.resize(image, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA)

    return observe


def _score(months: dict[str, pd.DataFrame], split: str, trained, missing, out: Path, coverage: float = 0.9) -> dict:
    table = months[split]
    models = list(trained)
    mu = float(np.mean([tm.mu for tm in trained.values()]))
    sigma = float(np.mean([tm.sigma for tm in trained.values()]))
    ensembles, notes, fit = _ensembles(months, split, trained)
    for frame in months.values():  # the reported split, and validation (intervals are calibrated there)
        for name, weights in ensembles.items():
            frame[f"ensemble_{name}"] = sum(w * frame[m] for m, w in weights.items())
    labeled = table["truth"].notna().all()
    result = {"split": split, "n": len(table), "models": models, "missing": missing, "mu": mu, "sigma": sigma,
              "ensembles": ensembles, "ensemble_fit": fit, "notes": notes, "labeled": bool(labeled), "metrics": {}}
    if not labeled:
        result["notes"].append(f"split {split!r} has no bone ages (Kaggle's test CSV): predictions only")
    else:
        baseline = np.full(len(table), trained[models[0]].train_mean)
        result["metrics"]["predict_the_mean"] = regression_metrics(baseline, table["truth"], table["male"], mu,
                                                                   sigma)
        for column in reported_columns(trained) + [f"ensemble_{name}" for name in ensembles]:
            result["metrics"][column] = regression_metrics(table[column], table["truth"], table["male"], mu, sigma)
        result["calibration_check"] = calibration_check(months, split, reported_columns(trained))
    columns = reported_columns(trained) + [f"ensemble_{name}" for name in ensembles]
    calibrations = _interval_calibrations(months, split, columns, result["notes"], coverage)
    if calibrations and labeled:
        result["intervals"] = {c: coverage_report(cal["calibration"], table[c], table["truth"], table["male"],
                                                  coverage) for c, cal in calibrations.items()}
    # replaced atomically: a predict or a dashboard reading them meanwhile sees the old or the new file, never torn
    write_json_atomic(out / "metrics.json", result, default=_json_default)
    write_json_atomic(out / "ensemble.json", {"weights": ensembles, "split_fitted_on": "validation"})
    write_json_atomic(out / "intervals.json", {"coverage": coverage, "split_fitted_on": "validation",
                                               "columns": {c: {"method": cal["calibration"].method,
                                                               "cross_fitted": cal["scores"],
                                                               **cal["calibration"].to_dict()}
                                                           for c, cal in calibrations.items()}},
                      indent=None, default=_json_default)
    return result


def calibration_check(months: dict[str, pd.DataFrame], split: str, columns: list[str]) -> dict:
    """Would a correction fitted on the validation split help on the reported one? Per model (or branch): its MAE and
    bias as trained (with the calibration its run fitted on training radiographs, ``--calibration``), after an
    offset fitted on validation, and after a line fitted there (Deeplasia's slope and offset). A measurement for
    choosing the recipe; nothing reported elsewhere uses these corrections."""
    from bonedist.train.validation import fit_calibration

    val = months.get("validation")
    if split == "validation" or val is None or val["truth"].isna().any():
        return {}
    table, out = months[split], {}
    for column in columns:
        row = {"as_trained": _mae_bias(table[column], table["truth"])}
        for kind in ("offset", "linear"):
            slope, intercept = fit_calibration(val[column].to_numpy(), val["truth"].to_numpy(), kind)
            row[f"validation_{kind}"] = {**_mae_bias(slope * table[column] + intercept, table["truth"]),
                                         "slope": slope, "intercept_months": intercept}
        out[column] = row
    return out


def _mae_bias(pred, truth) -> dict:
    error = np.asarray(pred, float) - np.asarray(truth, float)
    return {"mae_months": float(np.abs(error).mean()), "bias_months": float(error.mean())}


def _interval_calibrations(months: dict[str, pd.DataFrame], split: str, columns: list[str], notes: list,
                           coverage: float) -> dict:
    """Per model and ensemble: the conformal method chosen by cross-fitting on the validation split and its
    calibration there (``bonedist.eval.intervals``); none when validation is the reported split or has no ages."""
    val = months.get("validation")
    if split == "validation" or val is None or val["truth"].isna().any():
        notes.append("no prediction intervals: they are calibrated on a labelled validation split, never on the "
                     "reported one")
        return {}
    need = int(np.ceil(1.0 / (1.0 - coverage))) - 1
    if len(val) < 2 * need:
        notes.append(f"{coverage:.0%} prediction intervals from {len(val)} validation radiographs are wide: a "
                     f"conformal interval needs {need} or more per group it calibrates (use a larger validation "
                     "split)")
    out = {}
    for column in columns:
        method, scores = choose_method(val[column], val["truth"], val["male"], coverage)
        out[column] = {"calibration": IntervalCalibration(method, val[column].tolist(), val["truth"].tolist(),
                                                          val["male"].astype(bool).tolist()), "scores": scores}
    return out


def reported_columns(trained: dict) -> list[str]:
    """The metrics rows of the models: each model, or its branches (a branch that is the prediction once)."""
    return [row for name, tm in trained.items() for row in tm.model.task.reported(name)]


def _ensembles(months: dict[str, pd.DataFrame], split: str, trained: dict) -> tuple[dict, list[str], dict]:
    ensembles, notes, fit, models = {}, [], {}, list(trained)
    paper = paper_weights(trained)
    if paper:
        ensembles["paper"] = paper
    if len(models) > 1:
        ensembles["equal"] = {m: 1.0 / len(models) for m in models}
        val = months.get("validation")
        if split == "validation" or val is None:
            notes.append("no validation-fitted ensemble: it is never fitted on the split being reported")
        elif val["truth"].isna().any():
            notes.append("no validation-fitted ensemble: the validation split has no ages")
        else:
            weights = fit_ensemble_weights(val[models].to_numpy(), val["truth"].to_numpy())
            ensembles["fitted"] = {m: float(w) for m, w in zip(models, weights)}
            fit = ensemble_fit_check(val[models].to_numpy(), val["truth"].to_numpy(), models)
            notes.append(f"ensemble_fitted: {fit['folds']}-fold cross-validated MAE on validation "
                         f"{fit['cross_validated_mae_months']:.2f} months (fitted on all of it: "
                         f"{fit['in_sample_mae_months']:.2f}; equal weights {fit['equal_mae_months']:.2f}; best "
                         f"member {fit['best_member']} {fit['best_member_mae_months']:.2f}); weights over the folds "
                         + ", ".join(f"{m} {lo:.2f}-{hi:.2f}" for m, (lo, hi) in fit["weight_range"].items()))
    return ensembles, notes, fit


def ensemble_fit_check(preds: np.ndarray, truth: np.ndarray, models: list[str], folds: int = 5,
                       seed: int = 0) -> dict:
    """Whether the validation-fitted weights generalise: their MAE on each fold of the validation split when fitted
    on the other folds (out of fold), beside the MAE fitted on all of it, equal weights and the best member, and the
    range of each weight over the folds (weights that swing between folds are not to be trusted); and how alike the
    members err: the correlation of every pair's errors (two seeds of one network err alike and their mean adds
    little; ``docs/results.md``)."""
    preds, truth = np.asarray(preds, float), np.asarray(truth, float)
    order = np.random.default_rng(seed).permutation(len(truth))
    oof, fold_weights = np.empty(len(truth)), []
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        w = fit_ensemble_weights(preds[rest], truth[rest])
        oof[part] = preds[part] @ w
        fold_weights.append(w)
    member = np.abs(preds - truth[:, None]).mean(axis=0)
    fold_weights = np.array(fold_weights)
    return {"folds": folds, "n": len(truth),
            "cross_validated_mae_months": float(np.abs(oof - truth).mean()),
            "in_sample_mae_months": float(np.abs(preds @ fit_ensemble_weights(preds, truth) - truth).mean()),
            "equal_mae_months": float(np.abs(preds.mean(axis=1) - truth).mean()),
            "best_member": models[int(member.argmin())], "best_member_mae_months": float(member.min()),
            "weight_range": {m: (float(fold_weights[:, i].min()), float(fold_weights[:, i].max()))
                             for i, m in enumerate(models)},
            "error_correlation": error_correlation(preds - truth[:, None], models)}


def error_correlation(errors: np.ndarray, models: list[str]) -> dict[str, float]:
    """Pearson correlation of each pair of members' errors (``"a / b"``: r), in member order."""
    out = {}
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            a, b = errors[:, i], errors[:, j]
            ok = a.std() > 0 and b.std() > 0
            out[f"{models[i]} / {models[j]}"] = float(np.corrcoef(a, b)[0, 1]) if ok else float("nan")
    return out


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(type(value))


def _intervals_table(intervals: dict):
    """Coverage and mean width of every row's intervals: overall, per sex and per age band (W&B table)."""
    import wandb

    groups = ["all", "male", "female", *next(iter(intervals.values()))["age_bands"]]
    data = []
    for name, r in intervals.items():
        for group in groups:
            g = r if group == "all" else r[group] if group in ("male", "female") else r["age_bands"][group]
            data.append([name, r["method"], r["nominal"], group, g["n"], g["coverage"], g["mean_width_months"]])
    return wandb.Table(columns=["model", "method", "nominal", "group", "n", "coverage", "mean_width_months"],
                       data=data)


def _log_wandb(opts: EvalOptions, out: Path, result: dict, table: pd.DataFrame, trained: dict, shards: str,
               thumbs: dict) -> None:
    """One W&B run per evaluation: it uses the model artifacts it evaluated, logs the metrics table, the figures,
    a per-radiograph predictions table (thumbnail, sex, truth, every model, the ensembles, errors) and the report
    as an ``evaluation`` artifact."""
    from bonedist.tracking import model_artifact, use_artifact, wandb_mode

    mode = wandb_mode(opts.wandb)
    if mode == "off":
        return
    import wandb

    run = wandb.init(project="bonedist", group=Path(opts.runs).name, job_type="evaluate", name=f"evaluate-{opts.split}",
                     dir=str(out), mode=mode,
                     config={"split": opts.split, "flip": opts.flip, "tta_rotate": opts.tta_rotate,
                             "tta_scale": opts.tta_scale, "aggregate": opts.aggregate, "shards": shards,
                             "models": list(trained)})
    for tm in trained.values():
        use_artifact(run, model_artifact(tm.run_dir, tm.meta))
    rows = [[name, m.get("mae_months"), m.get("bias_months"), m.get("rmse_months"), m.get("mse_z"), m.get("rmse_z"),
             m.get("pearson_r")] for name, m in result["metrics"].items()]
    run.log({"metrics": wandb.Table(columns=["model", "mae_months", "bias_months", "rmse_months", "mse_z", "rmse_z",
                                             "pearson_r"], data=rows),
             "predictions": _predictions_table(table, thumbs, result),
             **({"intervals": _intervals_table(result["intervals"])} if result.get("intervals") else {}),
             **{f"figures/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("*.png"))}})
    if result["labeled"]:
        run.summary.update({f"mae_months/{name}": m["mae_months"] for name, m in result["metrics"].items()})
    report = wandb.Artifact(f"report-{Path(opts.runs).name}-{opts.split}", type="evaluation",
                            metadata={"split": opts.split, "n": result["n"], "models": list(trained)})
    for path in sorted(out.iterdir()):
        if path.is_file():
            report.add_file(str(path))
    run.log_artifact(report)
    run.finish()


def _predictions_table(table: pd.DataFrame, thumbs: dict, result: dict):
    """Per radiograph: a thumbnail, sex, truth, each prediction column and its absolute error, sortable in W&B."""
    import wandb

    predicted = [c for c in table.columns if c not in ("key", "male", "truth")]
    columns = ["id", "image", "sex", "truth_months", *predicted]
    if result["labeled"]:
        columns += [f"abs_error_{c}" for c in predicted]
    data = []
    for row in table.itertuples(index=False):
        values = row._asdict()
        line = [values["key"], wandb.Image(thumbs[values["key"]]), "M" if values["male"] else "F", values["truth"],
                *[float(values[c]) for c in predicted]]
        if result["labeled"]:
            line += [abs(float(values[c]) - values["truth"]) for c in predicted]
        data.append(line)
    return wandb.Table(columns=columns, data=data)
