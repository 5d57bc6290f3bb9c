"""The evaluation report: predictions.csv, report.md (laid out like the paper's Tables 6-7, the paper's numbers
beside ours) and figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bonedist.data.layouts import OLDEST_RSNA_AGE  # noqa: E402
from bonedist.eval.metrics import AGE_BANDS_YEARS  # noqa: E402
from bonedist.files import write_atomic  # noqa: E402
from bonedist.tracking import read_metrics  # noqa: E402


def write_report(out: Path, result: dict, table: pd.DataFrame, trained: dict, sample: dict | None, opts) -> None:
    """``sample``: the first batch of the reported split (uint8 images on the device), for attention examples."""
    frame = table.copy()
    frame.insert(1, "sex", np.where(frame.pop("male"), "M", "F"))
    write_atomic(out / "predictions.csv", frame.rename(columns={"key": "id"}).to_csv(index=False, float_format="%.3f"))
    figures = []
    if result["labeled"]:
        prediction_columns = [c for c in result["metrics"] if c != "predict_the_mean"]
        figures += [_scatter(out, table, prediction_columns), _bland_altman(out, table, prediction_columns),
                    _age_bands(out, result, prediction_columns)]
    if result.get("intervals"):
        figures.append(_interval_figure(out, result["intervals"]))
    figures.append(_training_curves(out, trained))
    for name, tm in trained.items():
        if tm.model.task.attention and sample is not None:
            figures.append(_attention_examples(out, name, tm, sample))
    write_atomic(out / "report.md", _markdown(result, [f for f in figures if f], opts, trained))


def _fmt(value, digits=2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _markdown(result: dict, figures: list[Path], opts, trained: dict) -> str:
    lines = [f"# bonedist evaluation: {opts.runs}, split `{result['split']}` ({result['n']} radiographs)", ""]
    for name, tm in trained.items():
        flip, aggregate = tm.settings(opts.flip, opts.aggregate)
        grid = f", {tm.pipe.grid}x{tm.pipe.grid} patch grid ({aggregate})" if tm.pipe.spec.is_patch else ""
        views = tm.views(opts.tta_rotate, opts.tta_scale)[1:]
        shown = f", views {', '.join(f'{d:+g} deg x{z:g}' for d, z in views)}" if views else ""
        lines.append(f"- {name}: preset {tm.meta['config'].get('preset', '?')}, test-time flip "
                     f"{'on' if flip else 'off'}{shown}{grid}{', hand mask' if tm.pipe.spec.hand_mask else ''}")
    for name, tm in trained.items():
        if tm.model.task.main_branch:
            branch = tm.model.task.main_branch
            lines.append(f"- {name}'s prediction is its {branch} branch (row {name}_{branch}).")
    for note in result["notes"]:
        lines.append(f"- {note}")
    for name in result["missing"]:
        lines.append(f"- {name}: no trained run found, left out of the table and the ensembles")
    if result["labeled"]:
        lines += ["", "## Models, their branches and ensembles (paper's Tables 6-7 beside ours)", "",
                  "| model | MAE (months) | 95% CI | RMSE (months) | MSE (z) | RMSE (z) | r | paired t p | "
                  "within 12 m | paper MSE | paper RMSE | paper P |", "|" + "---|" * 12]
        paper_rows = {row: v for name, tm in trained.items() if name == tm.model_name  # its own run, not a seed
                      for row, v in tm.info.paper.items()}
        for name, m in result["metrics"].items():
            paper = paper_rows.get(name, (None, None, None))
            ci = m.get("mae_ci95_months")
            lines.append(f"| {name} | {_fmt(m['mae_months'])} | {_fmt(ci[0]) + '-' + _fmt(ci[1]) if ci else '-'} | "
                         f"{_fmt(m['rmse_months'])} | {_fmt(m['mse_z'], 3)} | {_fmt(m['rmse_z'], 3)} | "
                         f"{_fmt(m.get('pearson_r'), 3)} | {_fmt(m.get('paired_t_p'), 3)} | "
                         f"{_fmt(100 * m['within_12_months'], 0)}% | {_fmt(paper[0])} | {_fmt(paper[1])} | "
                         f"{_fmt(paper[2])} |")
        lines += ["", "## MAE by sex and age band (months)", "",
                  "| model | male | female | " + " | ".join(f"{lo}-{hi} y" for lo, hi in AGE_BANDS_YEARS) + " |",
                  "|" + "---|" * (3 + len(AGE_BANDS_YEARS))]
        for name, m in result["metrics"].items():
            bands = " | ".join(_fmt(v) for v in m["mae_by_age_band"].values())
            lines.append(f"| {name} | {_fmt(m['mae_male_months'])} | {_fmt(m['mae_female_months'])} | {bands} |")
    lines += ["", "## Ensemble weights (fitted on the validation split)", ""]
    for name, weights in result["ensembles"].items():
        lines.append(f"- {name}: " + ", ".join(f"{m} {w:.3f}" for m, w in weights.items()))
    fit = result.get("ensemble_fit") or {}
    if fit:
        lines += ["", f"Do the fitted weights generalise? {fit['folds']}-fold cross-validation on the validation split "
                  f"({fit['n']} radiographs): MAE {_fmt(fit['cross_validated_mae_months'])} months out of fold, "
                  f"{_fmt(fit['in_sample_mae_months'])} fitted on all of it; equal weights "
                  f"{_fmt(fit['equal_mae_months'])}, best member {fit['best_member']} "
                  f"{_fmt(fit['best_member_mae_months'])}. Each weight over the folds: "
                  + ", ".join(f"{m} {lo:.2f}-{hi:.2f}" for m, (lo, hi) in fit["weight_range"].items()) + "."]
        if fit.get("error_correlation"):
            lines += ["", "How alike do the members err? Correlation of their errors on the validation split: "
                      + ", ".join(f"{pair} {r:.2f}" for pair, r in fit["error_correlation"].items())
                      + ". Members whose errors correlate near 1 (two seeds of one network: about 0.9) add little to "
                        "each other; a member that errs differently adds when it is nearly as accurate."]
    check = result.get("calibration_check") or {}
    if check:
        lines += ["", "## Calibration check (a correction fitted on the validation split, scored here)", "",
                  "What each model's error would be with an offset or a line (Deeplasia's slope and offset) fitted on "
                  "the validation split, beside the calibration its run fitted on training radiographs. Nothing "
                  "else in this report uses these corrections.", "",
                  "| model | MAE as trained | bias | offset: MAE | bias | line: MAE | bias | slope |", "|" + "---|" * 8]
        for name, c in check.items():
            t, o, line = c["as_trained"], c["validation_offset"], c["validation_linear"]
            lines.append(f"| {name} | {_fmt(t['mae_months'])} | {_fmt(t['bias_months'])} | {_fmt(o['mae_months'])} | "
                         f"{_fmt(o['bias_months'])} | {_fmt(line['mae_months'])} | {_fmt(line['bias_months'])} | "
                         f"{_fmt(line['slope'], 3)} |")
    lines += _interval_lines(result.get("intervals") or {})
    lines += ["", "## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures]
    return "\n".join(lines) + "\n"


def _interval_lines(intervals: dict) -> list[str]:
    """The prediction intervals' coverage and width on the reported split (calibrated on validation)."""
    if not intervals:
        return []
    nominal = next(iter(intervals.values()))["nominal"]
    lines = ["", f"## {nominal:.0%} prediction intervals (conformal, calibrated on the validation split)", "",
             "Coverage: the share of radiographs whose true bone age lies inside the interval; width in months. "
             "Age bands by true age; bands with fewer than 50 radiographs in brackets.", "",
             "| model | method | coverage | mean width | male | female | "
             + " | ".join(f"{lo}-{hi} y" for lo, hi in AGE_BANDS_YEARS) + " |",
             "|" + "---|" * (6 + len(AGE_BANDS_YEARS))]
    for name, r in intervals.items():
        bands = []
        for band in r["age_bands"].values():
            text = "-" if band["coverage"] is None else f"{band['coverage']:.0%} / {band['mean_width_months']:.1f}"
            bands.append(text if band["n"] >= 50 or band["coverage"] is None else f"({text})")
        lines.append(f"| {name} | {r['method']} | {r['coverage']:.1%} | {r['mean_width_months']:.1f} | "
                     f"{r['male']['coverage']:.0%} | {r['female']['coverage']:.0%} | " + " | ".join(bands) + " |")
    return lines


def _interval_figure(out: Path, intervals: dict) -> Path:
    """Coverage against nominal coverage for every model and ensemble, and the mean width by age band."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in intervals.items():
        levels = [float(k) for k in r["by_nominal"]]
        left.plot(levels, list(r["by_nominal"].values()), marker="o", label=name, lw=1)
        bands = [(k, b["mean_width_months"]) for k, b in r["age_bands"].items() if b["mean_width_months"]]
        right.plot([k for k, _ in bands], [w for _, w in bands], marker="o", label=name, lw=1)
    left.plot([0.45, 1.0], [0.45, 1.0], color="gray", ls="--", lw=1)
    left.set(xlabel="nominal coverage", ylabel="coverage on the reported split", title="calibration of the intervals")
    right.set(xlabel="true age band", ylabel="mean interval width (months)", title="interval width by age")
    for ax in (left, right):
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, out / "intervals.png")


def _grid(n: int):
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def _scatter(out: Path, table: pd.DataFrame, columns: list[str]) -> Path:
    fig, axes = _grid(len(columns))
    for ax, name in zip(axes, columns):
        ax.scatter(table["truth"], table[name], s=8, alpha=0.6)
        ax.plot([0, OLDEST_RSNA_AGE], [0, OLDEST_RSNA_AGE], "k--", lw=1)
        ax.set(title=name, xlabel="true bone age (months)", ylabel="predicted (months)", xlim=(0, 235), ylim=(0, 235))
    fig.tight_layout()
    return _save(fig, out / "pred_vs_true.png")


def _bland_altman(out: Path, table: pd.DataFrame, columns: list[str]) -> Path:
    fig, axes = _grid(len(columns))
    for ax, name in zip(axes, columns):
        mean, diff = (table[name] + table["truth"]) / 2, table[name] - table["truth"]
        bias, spread = diff.mean(), 1.96 * diff.std()
        ax.scatter(mean, diff, s=8, alpha=0.6)
        for y, style in ((bias, "-"), (bias + spread, "--"), (bias - spread, "--")):
            ax.axhline(y, color="k", ls=style, lw=1)
        ax.set(title=f"{name} (bias {bias:.1f}, LoA ±{spread:.1f})", xlabel="mean of predicted and true (months)",
               ylabel="predicted - true (months)")
    fig.tight_layout()
    return _save(fig, out / "bland_altman.png")


def _age_bands(out: Path, result: dict, columns: list[str]) -> Path:
    fig, ax = plt.subplots(figsize=(10, 4))
    bands = [f"{lo}-{hi}y" for lo, hi in AGE_BANDS_YEARS]
    width = 0.8 / len(columns)
    for i, name in enumerate(columns):
        values = [result["metrics"][name]["mae_by_age_band"][b] or 0.0 for b in bands]
        ax.bar(np.arange(len(bands)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(bands)) + 0.4 - width / 2, bands)
    ax.set(ylabel="MAE (months)", title="MAE by age band")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, out / "mae_by_age_band.png")


def _training_curves(out: Path, trained: dict) -> Path | None:
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for name, tm in trained.items():
        epochs = [r for r in read_metrics(tm.run_dir / "metrics.jsonl", warn=print) if r.get("kind") == "epoch"]
        if not epochs:
            continue
        x = [r["epoch"] for r in epochs]
        ax[0].plot(x, [r["train_loss"] for r in epochs], marker="o", label=f"{name} train")
        ax[0].plot(x, [r["val_loss"] for r in epochs], marker="x", ls="--", label=f"{name} val")
        ax[1].plot(x, [r["val_mae_months"] for r in epochs], marker="o", label=name)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax[0].set(xlabel="epoch", ylabel="loss (z)", title="training and validation loss")
    ax[1].set(xlabel="epoch", ylabel="MAE (months)", title="validation MAE")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out / "training_curves.png")


@torch.no_grad()
def _attention_examples(out: Path, name: str, tm, batch: dict) -> Path:
    inputs = tm.pipe.model_batch(batch)
    x = inputs.image
    result = tm.model(x, inputs.male)
    fig, axes = plt.subplots(2, len(x), figsize=(2.2 * len(x), 4.6), squeeze=False)
    for i in range(len(x)):
        image = x[i, 0].float().cpu().numpy()
        x1, y1, x2, y2 = result["boxes"][i].tolist()
        axes[0, i].imshow(image, cmap="gray")
        axes[0, i].add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1.5))
        axes[0, i].set_title(batch["key"][i], fontsize=7)
        axes[1, i].imshow(image, cmap="gray")
        axes[1, i].imshow(result["masks"][i, 0].float().cpu().numpy(), cmap="autumn", alpha=0.35)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle(f"{name} attention: crop box (top), chosen component (bottom)")
    fig.tight_layout()
    return _save(fig, out / f"{name}_attention.png")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
