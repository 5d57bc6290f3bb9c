"""The paper's metrics and more, on predictions in months (and z units for the paper's MSE/RMSE columns)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from bonedist.eval.intervals import AGE_BANDS_YEARS  # noqa: F401  (its home is the numpy-only intervals)


def regression_metrics(pred: np.ndarray, true: np.ndarray, male: np.ndarray, mu: float, sigma: float,
                       n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of months predictions against months truth.

    The paper's "P-value" column is most plausibly a paired t-test between predictions and truth (a high p means
    no systematic difference); both it and Pearson's r with its own p-value are reported.
    """
    pred, true, male = np.asarray(pred, float), np.asarray(true, float), np.asarray(male).astype(bool)
    err = pred - true
    abs_err = np.abs(err)
    z_err = err / sigma  # (pred - mu)/sigma - (true - mu)/sigma
    out = {
        "n": int(len(true)),
        "mae_months": float(abs_err.mean()),
        "rmse_months": float(np.sqrt((err**2).mean())),
        "mse_z": float((z_err**2).mean()),
        "rmse_z": float(np.sqrt((z_err**2).mean())),
        "median_ae_months": float(np.median(abs_err)),
        "bias_months": float(err.mean()),
        "within_6_months": float((abs_err <= 6).mean()),
        "within_12_months": float((abs_err <= 12).mean()),
    }
    if len(true) > 2 and np.std(pred) > 0 and np.std(true) > 0:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nearly constant predictions of an untrained model
            r, p = stats.pearsonr(pred, true)
        out.update(pearson_r=float(r), pearson_p=float(p))
    if len(true) > 1 and np.std(err) > 0:
        out["paired_t_p"] = float(stats.ttest_rel(pred, true).pvalue)
    out["mae_male_months"] = float(abs_err[male].mean()) if male.any() else None
    out["mae_female_months"] = float(abs_err[~male].mean()) if (~male).any() else None
    out["mae_by_age_band"] = {
        f"{lo}-{hi}y": (float(abs_err[sel].mean()) if sel.any() else None)
        for lo, hi in AGE_BANDS_YEARS
        for sel in [(true >= lo * 12) & (true < hi * 12)]
    }
    out["mae_ci95_months"] = bootstrap_ci(abs_err, n_boot, seed)
    return out


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float] | None:
    """Percentile 95% interval of the mean of ``values`` over ``n_boot`` resamples."""
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def fit_ensemble_weights(preds: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the squared error of ``preds @ w`` (preds: (N, M)).

    The sum-to-one constraint is a heavily weighted extra row of a non-negative least-squares problem.
    """
    from scipy.optimize import nnls

    preds, true = np.asarray(preds, float), np.asarray(true, float)
    scale = 1e3 * max(1.0, float(np.abs(preds).max()))
    a = np.vstack([preds, scale * np.ones((1, preds.shape[1]))])
    b = np.concatenate([true, [scale]])
    weights, _ = nnls(a, b)
    total = weights.sum()
    return weights / total if total > 0 else np.full(preds.shape[1], 1.0 / preds.shape[1])
