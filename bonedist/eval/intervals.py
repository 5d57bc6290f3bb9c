"""Prediction intervals for bone ages: split conformal prediction (crepes' ``ConformalRegressor``) calibrated on the
validation split's residuals, never on the reported split.

The width may depend on what the residuals depend on. Seven ways are fitted and the one whose out-of-fold coverage
on the validation split (each radiograph's interval calibrated on the other four fifths) is closest to the nominal
one, overall and in the worst sex or true-age band, is chosen; ties go to the narrower intervals:

- ``standard``: one width for everyone;
- ``age``: Mondrian by predicted-age band (a width per band: errors grow with age on RSNA);
- ``age_sex``: Mondrian by predicted-age band and sex;
- ``normalised``: the width proportional to the typical error at that predicted age (the bands' mean absolute
  errors, interpolated between band centres), with one quantile of the scaled residuals;
- ``local``: normalised by the mean absolute error of the 25 validation radiographs whose predicted ages are
  nearest (each calibration radiograph's own left out), a finer difficulty estimate than bands;
- ``true_age`` and ``true_age_sex``: label-conditional (Mondrian by the *true* age band, and sex; Vovk et al.,
  Algorithmic Learning in a Random World, 2005, ch. 4.5) split conformal: each band keeps its own lower and upper
  residual quantiles, and the interval is every age ``y`` whose residual ``y - pred`` lies within the quantiles of
  ``y``'s own band (the hull of that set). Coverage then holds within each true-age band, at the price of width
  where young and older children are predicted alike. crepes bins by what is known at prediction time, not by the
  label, so this one is computed here.

The groups whose coverage decides are the sexes and the *true*-age bands of the report (the validation split has
its truths): conformal prediction guarantees coverage given what the bins see (the predicted age), and a model that
pulls the youngest towards the mean errs more on them than their predicted age says.

``IntervalCalibration`` keeps the validation residuals, so that ``predict`` can give any coverage (``--coverage``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

AGE_BANDS_YEARS = ((0, 2), (2, 6), (6, 10), (10, 14), (14, 19))  # the report's bands (metrics re-exports them)

METHODS = ("standard", "age", "age_sex", "normalised", "local", "true_age", "true_age_sex")
LABEL_CONDITIONAL = ("true_age", "true_age_sex")
NEIGHBOURS = 25  # ``local``: validation radiographs whose predicted ages are nearest
MIN_PER_BIN = 40  # calibration residuals per Mondrian bin; smaller bands are merged into their neighbour
AGE_RANGE = (0.0, 240.0)  # months: intervals are clipped to what a bone age can be
NOMINALS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
CROSS_FOLDS, CROSS_REPEATS = 5, 3  # choose_method: out-of-fold coverage from calibrations on 4/5 of the radiographs
MIN_GROUP = 20  # choose_method: a sex or age band with fewer radiographs does not decide


def _band_edges(pred: np.ndarray, min_count: int) -> list[float]:
    """Upper edges (months) of predicted-age bands holding at least ``min_count`` calibration radiographs each."""
    edges = [hi * 12.0 for _, hi in AGE_BANDS_YEARS[:-1]]
    while True:
        counts = np.bincount(np.digitize(pred, edges), minlength=len(edges) + 1)
        small = [i for i, c in enumerate(counts) if c < min_count]
        if not small or not edges:
            return edges
        i = small[0]
        edges.pop(min(i, len(edges) - 1))  # merge the band with its upper neighbour (the last with its lower)


def _out_of_fold(fold: np.ndarray, truth: np.ndarray, bounds) -> tuple[np.ndarray, np.ndarray]:
    """Whether each radiograph's interval covers its truth, and its width, when ``bounds(fit_on, held)`` calibrates
    on the other folds of ``fold`` (a fold number per radiograph) and gives the held-out fold's (N, 2) bounds."""
    inside, width = np.zeros(len(truth), bool), np.zeros(len(truth))
    for k in np.unique(fold):
        held = fold == k
        b = bounds(~held, held)
        inside[held] = (truth[held] >= b[:, 0]) & (truth[held] <= b[:, 1])
        width[held] = b[:, 1] - b[:, 0]
    return inside, width


class SplitConformal:
    """Split conformal regression, standard, normalised (``sigmas``) and Mondrian (``bins``): the arithmetic of
    crepes' ``ConformalRegressor`` (fit, ``predict_int``) in numpy, so that the bundle runtime, which has neither
    crepes nor its pandas and scipy, gives the same intervals (``tests/test_serving.py`` compares the two). One
    difference: a radiograph whose bin had no calibration residual gets the whole age range (crepes: [0, 0])."""

    def __init__(self, residuals: np.ndarray, sigmas: np.ndarray | None = None, bins: np.ndarray | None = None):
        scores = np.abs(np.asarray(residuals, float))
        if sigmas is not None:
            scores = scores / np.asarray(sigmas, float)
        self.bins = None if bins is None else np.asarray(bins)
        if self.bins is None:
            self.scores = {None: np.sort(scores)[::-1]}
        else:
            self.scores = {b: np.sort(scores[self.bins == b])[::-1] for b in np.unique(self.bins)}

    def intervals(self, pred: np.ndarray, coverage: float, sigmas: np.ndarray | None = None,
                  bins: np.ndarray | None = None) -> np.ndarray:
        """(N, 2) bounds: ``pred`` -/+ the calibration score of rank floor((1 - coverage)(n + 1)) of the
        radiograph's bin (times its sigma); infinite where the bin has too few residuals for ``coverage``."""
        pred = np.asarray(pred, float)
        half = np.full(len(pred), np.inf)
        keys = np.full(len(pred), None, object) if self.bins is None else np.asarray(bins)
        for key, scores in self.scores.items():
            rows = np.ones(len(pred), bool) if key is None else keys == key
            index = int((1 - coverage) * (len(scores) + 1)) - 1
            half[rows] = scores[index] if index >= 0 else np.inf
        if sigmas is not None:
            half = half * np.asarray(sigmas, float)
        return np.stack([pred - half, pred + half], axis=1)


@dataclass
class IntervalCalibration:
    """A conformal calibration of one model or ensemble: ``method``, the validation predictions, truths and sexes."""

    method: str
    predicted: list[float]
    truth: list[float]
    male: list[bool]

    def __post_init__(self):
        pred = np.asarray(self.predicted, float)
        self._edges = _band_edges(pred, MIN_PER_BIN)
        band = np.digitize(pred, self._edges)
        err = np.abs(np.asarray(self.truth, float) - pred)
        used = [b for b in range(len(self._edges) + 1) if (band == b).any()]
        # the typical error as a smooth function of the predicted age: each band's mean absolute error placed at
        # the band's mean prediction, linearly interpolated between them (flat beyond the outer ones)
        self._centres = [float(pred[band == b].mean()) for b in used]
        self._band_mae = [max(float(err[band == b].mean()), 1e-3) for b in used]

    def _bins(self, pred: np.ndarray, male: np.ndarray) -> np.ndarray | None:
        if self.method == "age":
            return np.digitize(pred, self._edges)
        if self.method == "age_sex":
            return np.digitize(pred, self._edges) * 2 + np.asarray(male, int)
        return None

    def _sigmas(self, pred: np.ndarray, calibration: bool = False) -> np.ndarray | None:
        if self.method == "normalised":
            return np.interp(pred, self._centres, self._band_mae)
        if self.method != "local":
            return None
        ref = np.asarray(self.predicted, float)
        err = np.abs(np.asarray(self.truth, float) - ref)
        k = min(NEIGHBOURS, len(ref) - 1) if calibration else min(NEIGHBOURS, len(ref))
        distance = np.abs(pred[:, None] - ref[None, :])
        if calibration:
            np.fill_diagonal(distance, np.inf)  # a calibration radiograph's own error is left out of its sigma
        nearest = np.argpartition(distance, k - 1, axis=1)[:, :k] if k > 0 else np.zeros((len(pred), 0), int)
        return np.maximum(err[nearest].mean(axis=1) if k > 0 else np.ones(len(pred)), 1e-3)

    def _regressor(self) -> SplitConformal:
        """The conformal regressor fitted on the calibration residuals, once (predict asks for every batch)."""
        if getattr(self, "_fitted", None) is None:
            cal_pred, cal_male = np.asarray(self.predicted, float), np.asarray(self.male, bool)
            self._fitted = SplitConformal(np.asarray(self.truth, float) - cal_pred,
                                          sigmas=self._sigmas(cal_pred, calibration=True),
                                          bins=self._bins(cal_pred, cal_male))
        return self._fitted

    def _label_conditional(self, pred: np.ndarray, male: np.ndarray, coverage: float) -> np.ndarray:
        """``true_age`` and ``true_age_sex``: per true-age band (of each sex), the conformal lower and upper residual
        quantiles at (1 - coverage) / 2 each; the interval is the hull of the ages whose residual lies within their
        own band's quantiles (the standard interval where no band's admits any age)."""
        cal_pred, truth = np.asarray(self.predicted, float), np.asarray(self.truth, float)
        cal_male = np.asarray(self.male, bool)
        groups = [(cal_male, True), (~cal_male, False)] if self.method == "true_age_sex" else [
            (np.ones(len(truth), bool), None)]
        if self.method == "true_age_sex" and min(cal_male.sum(), (~cal_male).sum()) < 2 * MIN_PER_BIN:
            groups = [(np.ones(len(truth), bool), None)]  # too few of one sex to split: bands only
        alpha = (1.0 - coverage) / 2.0
        lower = np.full(len(pred), np.inf)
        upper = np.full(len(pred), -np.inf)
        for selection, sex in groups:
            edges = [AGE_RANGE[0], *_band_edges(truth[selection], MIN_PER_BIN), AGE_RANGE[1] + 1e-9]
            band = np.digitize(truth[selection], edges[1:-1])
            residual = truth[selection] - cal_pred[selection]
            rows = np.ones(len(pred), bool) if sex is None else (male == sex)
            for b in range(len(edges) - 1):
                r = np.sort(residual[band == b])
                if not len(r):
                    continue
                k_hi, k_lo = int(np.ceil((len(r) + 1) * (1 - alpha))), int(np.floor((len(r) + 1) * alpha))
                hi = r[k_hi - 1] if k_hi <= len(r) else np.inf
                lo = r[k_lo - 1] if k_lo >= 1 else -np.inf
                # ages y in this band with lo <= y - pred <= hi
                y_lo = np.maximum(edges[b], pred + lo)
                y_hi = np.minimum(edges[b + 1], pred + hi)
                admitted = rows & (y_lo <= y_hi)
                lower[admitted] = np.minimum(lower[admitted], y_lo[admitted])
                upper[admitted] = np.maximum(upper[admitted], y_hi[admitted])
        out = np.stack([lower, upper], axis=1)
        empty = ~np.isfinite(lower)
        if empty.any():
            fallback = IntervalCalibration("standard", self.predicted, self.truth, self.male)
            out[empty] = fallback.intervals(pred[empty], male[empty], coverage)
        return np.clip(out, *AGE_RANGE)

    def _band_level(self, coverage: float) -> float:
        """The per-band level of the label-conditional methods that gives ``coverage`` on radiographs the calibration
        has not seen: the hull of the admitted ages also covers some radiographs outside their own band's quantiles,
        so the nominal level in every band over-covers. From 5 % above the nominal level, the level is lowered in
        steps of 0.5 % while the calibration radiographs' out-of-fold coverage (each one's interval from the other
        four fifths, a fixed partition) stays at or above ``coverage``: tuned in sample instead, even with a margin
        for its optimism, the intervals over-covered out of fold (``docs/results.md``)."""
        levels = getattr(self, "_levels", None)
        if levels is None:
            levels = self._levels = {}
        if coverage not in levels:
            pred, truth = np.asarray(self.predicted, float), np.asarray(self.truth, float)
            male = np.asarray(self.male, bool)
            fold = np.random.default_rng(0).permutation(len(pred)) % CROSS_FOLDS
            parts = {k: IntervalCalibration(self.method, pred[fold != k].tolist(), truth[fold != k].tolist(),
                                            male[fold != k].tolist()) for k in np.unique(fold)}
            chosen = None
            for level in np.arange(min(coverage + 0.05, 0.995), max(coverage - 0.2, 0.05), -0.005):
                def bounds(fit_on, held, level=float(level)):
                    return parts[fold[held][0]]._label_conditional(pred[held], male[held], level)

                inside, _ = _out_of_fold(fold, truth, bounds)
                if inside.mean() < coverage and chosen is not None:
                    break
                chosen = float(level)  # the first (highest) level stays even where it falls short
            levels[coverage] = chosen
        return levels[coverage]

    def intervals(self, pred, male, coverage: float = 0.9) -> np.ndarray:
        """(N, 2) lower and upper bounds (months) of the ``coverage`` intervals around predictions ``pred``."""
        pred = np.atleast_1d(np.asarray(pred, float))
        male = np.broadcast_to(np.asarray(male, bool), pred.shape)
        if self.method in LABEL_CONDITIONAL:
            return self._label_conditional(pred, male, self._band_level(coverage))
        out = self._regressor().intervals(pred, coverage, sigmas=self._sigmas(pred), bins=self._bins(pred, male))
        return np.clip(out, *AGE_RANGE)

    def to_dict(self) -> dict:
        return asdict(self)


def coverage_report(cal: IntervalCalibration, pred, truth, male, coverage: float = 0.9) -> dict:
    """Empirical coverage and mean width of ``coverage`` intervals on radiographs with known truth: overall, per
    sex and per (true) age band, and the coverage at several nominal levels."""
    pred, truth, male = np.asarray(pred, float), np.asarray(truth, float), np.asarray(male, bool)
    bounds = cal.intervals(pred, male, coverage)
    inside = (truth >= bounds[:, 0]) & (truth <= bounds[:, 1])
    width = bounds[:, 1] - bounds[:, 0]

    def group(selection) -> dict:
        n = int(selection.sum())
        return {"n": n, "coverage": float(inside[selection].mean()) if n else None,
                "mean_width_months": float(width[selection].mean()) if n else None}

    bands = {f"{lo}-{hi}y": group((truth >= lo * 12) & (truth < hi * 12)) for lo, hi in AGE_BANDS_YEARS}
    levels = {}
    for level in NOMINALS:
        b = cal.intervals(pred, male, level)
        levels[f"{level:g}"] = float(((truth >= b[:, 0]) & (truth <= b[:, 1])).mean())
    return {"method": cal.method, "nominal": coverage, **group(np.ones_like(inside)),
            "male": group(male), "female": group(~male), "age_bands": bands, "by_nominal": levels}


def choose_method(pred, truth, male, coverage: float = 0.9, seed: int = 0, folds: int = CROSS_FOLDS,
                  repeats: int = CROSS_REPEATS) -> tuple[str, dict]:
    """The method whose coverage is closest to ``coverage`` overall and in its worst sex or true-age group, measured
    out of fold on these (validation) radiographs; then the narrower.

    Each radiograph gets its interval from a calibration on the other ``folds - 1`` folds (``repeats`` seeded
    partitions), and a group's coverage is its share of covered radiographs over all of them. Two things this
    avoids: calibrating on halves leaves bands too small to keep (the youngest band falls below ``MIN_PER_BIN`` and
    merges with its neighbour, so the label-conditional methods look as bad as the rest there), and a worst group
    taken per half is mostly noise. Returns the method
    and each method's out-of-fold scores."""
    pred, truth, male = np.asarray(pred, float), np.asarray(truth, float), np.asarray(male, bool)
    rng = np.random.default_rng(seed)
    partitions = [rng.permutation(len(pred)) % folds for _ in range(repeats)]
    groups = [g for g in (male, ~male, *[(truth >= lo * 12) & (truth < hi * 12) for lo, hi in AGE_BANDS_YEARS])
              if g.sum() >= MIN_GROUP]
    scores = {}
    for method in METHODS:
        def bounds(fit_on, held, method=method):
            cal = IntervalCalibration(method, pred[fit_on].tolist(), truth[fit_on].tolist(), male[fit_on].tolist())
            return cal.intervals(pred[held], male[held], coverage)

        inside, width = map(np.array, zip(*(_out_of_fold(fold, truth, bounds) for fold in partitions)))
        covered = inside.mean(axis=0)
        scores[method] = {"coverage": float(covered.mean()),
                          "coverage_gap": float(abs(covered.mean() - coverage)),
                          "worst_group_shortfall": float(max((coverage - covered[g].mean() for g in groups),
                                                             default=coverage - covered.mean())),
                          "mean_width_months": float(width.mean())}
    best = min(METHODS, key=lambda m: (round(scores[m]["coverage_gap"] + max(scores[m]["worst_group_shortfall"], 0),
                                             2), scores[m]["mean_width_months"]))
    return best, scores
