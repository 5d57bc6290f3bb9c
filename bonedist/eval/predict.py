"""``bonedist predict``: bone age of radiographs with the trained ensemble and its prediction interval, on a CPU if
need be: single images, a worklist table, or a folder (``bonedist.eval.worklist``).

    bonedist predict hand.png --sex F --runs runs/rsna --chronological-age 10y3m
    bonedist predict a.png b.dcm --sex M --json
    bonedist predict --table worklist.csv --runs runs/rsna --out results.csv
    bonedist predict /archive/export/ --runs runs/rsna --out results.csv     # DICOM headers give sex and age

Each image is preprocessed exactly as `bonedist pack` does (8/16-bit PNG, JPEG or DICOM → 8-bit gray → the pack's
size and resize mode), then run through every trained model; the ensemble uses the validation-fitted weights that
`bonedist evaluate` saved (report/ensemble.json), else the paper's weights, else equal weights, and its conformal
interval calibration (report/intervals.json) gives the interval at ``--coverage``.

Torch is imported where a trained model runs: the parsing, loading and formatting helpers here also serve the bundle
runtime (``bonedist.serving``), which has no torch.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from bonedist import BonedistError
from bonedist.data.dicom import read_radiograph
from bonedist.data.images import MAX_PIXELS, resize_square
from bonedist.data.options import parse_male
from bonedist.eval.intervals import IntervalCalibration
from bonedist.files import Fields, read_json, reason


def parse_sex(text: str) -> bool:
    male = parse_male(text)
    if male is None or str(text).strip().lower() in ("1", "0", "true", "false", "t", "yes", "no", "y", "n"):
        raise BonedistError(f"--sex {text!r}: expected F or M (female/male)")
    return male


def parse_age(text: str) -> float:
    """'10y3m', '10y', '123m', '123' (months) or '10.25y' → months."""
    t = str(text).strip().lower().replace(" ", "")
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)y)?(?:(\d+(?:\.\d+)?)m?)?", t)
    if not t or not match or (match.group(1) is None and match.group(2) is None):
        raise BonedistError(f"--chronological-age {text!r}: expected forms like 10y3m, 10y, 123m or 123 (months)")
    years = float(match.group(1) or 0)
    months = float(match.group(2) or 0)
    return years * 12 + months


def years_months(months: float) -> str:
    total = int(round(months))
    return f"{total // 12} y {total % 12} m"


def load_radiograph(path: Path, size: int, mode: str, max_pixels: int = MAX_PIXELS):
    """(original 8-bit image, resized to the pack's size, resize geometry, DICOM header facts) of an image file."""
    if path.is_dir():
        raise BonedistError(f"{path}: a folder, not an image file (predict FOLDER reads all the images in it)")
    if not path.is_file():
        raise BonedistError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BonedistError(f"{path}: cannot read the image: {exc.strerror or reason(exc)}") from None
    original, facts = read_radiograph(data, str(path), max_pixels, memory_hint=" (lower --max-pixels)")
    try:
        resized, geometry = resize_square(original, size, mode)
    except Exception as exc:  # noqa: BLE001
        raise BonedistError(f"{path}: cannot resize the image ({reason(exc)})") from None
    return original, resized, geometry, facts


class Ensemble:
    """The trained models of a runs folder as one predictor: every model's months, the ensemble's, and its
    conformal interval at ``coverage`` (when ``evaluate`` calibrated one)."""

    def __init__(self, runs: str | Path, coverage: float = 0.9, device="cpu"):
        from bonedist.eval.runs import find_runs, load_trained

        if not 0.05 <= coverage <= 0.99:
            raise BonedistError(f"--coverage must be between 0.05 and 0.99, got {coverage}")
        self.runs, self.coverage = Path(runs), coverage
        found, _ = find_runs(runs)
        self.trained = {name: load_trained(path, device, name) for name, path in found.items()}
        # each run's own test-time flip and patch aggregation, in the precision evaluation uses here
        self.predictors = {name: tm.predictor() for name, tm in self.trained.items()}
        self.pack = same_pack(self.trained)
        self.weights, self.source, self.column = self._weights()  # column: the report's name of this ensemble
        self.calibration = self._calibration(self.column)

    def _weights(self) -> tuple[dict[str, float], str, str]:
        from bonedist.eval.runs import paper_weights

        names = list(self.trained)
        saved = self.runs / "report" / "ensemble.json"
        if saved.exists():
            fitted = load_fitted_weights(saved, names)
            if fitted:
                left = [n for n in names if n not in fitted]
                if left:
                    print(f"note: {saved} was fitted without {', '.join(left)} (trained since); re-run bonedist "
                          f"evaluate to include it", file=sys.stderr)
                return fitted, "validation-fitted (report/ensemble.json)", "ensemble_fitted"
        if len(names) == 1:
            task = self.trained[names[0]].model.task
            return {names[0]: 1.0}, "one model", f"{names[0]}_{task.main_branch}" if task.main_branch else names[0]
        paper = paper_weights({n: self.trained[n] for n in names})
        if paper and len(paper) == len(names):
            return paper, "paper", "ensemble_paper"
        return {n: 1.0 / len(names) for n in names}, "equal", "ensemble_equal"

    def _calibration(self, column: str) -> IntervalCalibration | None:
        saved = self.runs / "report" / "intervals.json"
        if not saved.exists():
            return None
        return load_interval_calibration(saved, column)

    def predict(self, images, male) -> dict[str, np.ndarray]:
        """A uint8 batch (B, 1, S, S) at the pack's size → months per model (``model/NAME``), ``bone_age`` and,
        with a calibration, ``low`` and ``high``."""
        import torch

        batch = {"image": images, "male": male.float()}
        with torch.no_grad():
            out = {f"model/{name}": self.trained[name].months(self.predictors[name](batch)["pred"].cpu().numpy())
                   for name in self.trained}
        out["bone_age"] = sum(w * out[f"model/{m}"] for m, w in self.weights.items())
        if self.calibration is not None:
            bounds = self.calibration.intervals(out["bone_age"], male.cpu().numpy().astype(bool), self.coverage)
            out["low"], out["high"] = bounds[:, 0], bounds[:, 1]
        return out


def same_pack(trained: dict) -> dict:
    """The pack settings (image size, resize mode) every model was trained with; models trained on packs of other
    settings cannot share one preprocessed image: refused with one line naming both."""
    first_name, first = next(iter(trained.items()))
    for name, tm in trained.items():
        if tm.meta["pack"] != first.meta["pack"]:
            raise BonedistError(
                f"{first_name} and {name} were trained on different packs ({_pack_text(first)} vs {_pack_text(tm)}): "
                f"one ensemble cannot read a radiograph for both; keep them in separate --runs folders")
    return first.meta["pack"]


def _pack_text(tm) -> str:
    pack = tm.meta["pack"]
    return f"{tm.meta.get('config', {}).get('shards', '?')}: {pack['image_size']} px, {pack['resize_mode']}"


def load_fitted_weights(path: Path, members: list[str]) -> dict[str, float] | None:
    """The validation-fitted weights of ``report/ensemble.json`` (None when it has none), checked: every member a
    run of this folder, each weight finite and non-negative, their sum 1 within rounding."""
    data = Fields(read_json(path, "ensemble weights"), path)
    weights = data.mapping("weights")
    if not weights.has("fitted"):
        return None
    fitted = weights.mapping("fitted")
    unknown = [m for m in fitted.data if m not in members]
    if unknown:
        fitted.fail(unknown[0], f"is not a trained run under {path.parent.parent} (runs: {', '.join(members)}); "
                                f"re-run bonedist evaluate")
    values = {m: fitted.number(m, minimum=0) for m in fitted.data}
    total = sum(values.values())
    if not values or abs(total - 1.0) > 1e-3:
        weights.fail("fitted", f"weights sum to {total:.6g}, not 1; the file was edited or damaged: re-run "
                               f"bonedist evaluate")
    return values


def load_interval_calibration(path: Path, column: str) -> IntervalCalibration | None:
    """The conformal calibration of ``column`` in ``report/intervals.json`` (None when it has none), checked:
    a known method and, for every calibration radiograph, a finite prediction and truth and a sex."""
    from bonedist.eval.intervals import METHODS

    data = Fields(read_json(path, "interval calibration"), path)
    columns = data.mapping("columns")
    if not columns.has(column):
        return None
    entry = columns.mapping(column)
    method = entry.text("method", METHODS)
    predicted = entry.numbers("predicted", minimum=-1e4)
    truth = entry.numbers("truth", length=len(predicted))
    male = entry.value("male")
    if not isinstance(male, list) or len(male) != len(predicted) or not all(isinstance(m, bool) for m in male):
        entry.fail("male", f"must be {len(predicted)} true/false values, one per calibration radiograph")
    if len(predicted) < 20:
        entry.fail("predicted", f"holds {len(predicted)} calibration radiographs; at least 20 are needed")
    return IntervalCalibration(method, predicted, truth, male)


def result_row(image: str, male: bool, chrono: float | None, values: dict, ensemble: Ensemble, index: int = 0) -> dict:
    """One image's result, as printed, written to CSV/JSON and returned."""
    bone_age = float(values["bone_age"][index])
    models = {k.split("/", 1)[1]: round(float(v[index]), 2) for k, v in values.items() if k.startswith("model/")}
    row = {"image": image, "sex": "M" if male else "F", "bone_age_months": round(bone_age, 2),
           "bone_age": years_months(bone_age), "models": models, "ensemble": ensemble.source,
           "weights": ensemble.weights}
    if "low" in values:
        row["interval"] = {"coverage": ensemble.coverage, "low_months": round(float(values["low"][index]), 2),
                           "high_months": round(float(values["high"][index]), 2),
                           "method": ensemble.calibration.method}
    if chrono is not None:
        row.update(chronological_age_months=round(chrono, 2), difference_months=round(bone_age - chrono, 2))
        if "interval" in row:
            row["chronological_outside_interval"] = not (row["interval"]["low_months"] <= chrono
                                                         <= row["interval"]["high_months"])
    return row


def predict_images(images: list[str], sex: str, runs: str, chronological_age: str | None = None,
                   heatmap: str | None = None, max_pixels: int = MAX_PIXELS, coverage: float = 0.9) -> list[dict]:
    """Single images with one sex (and chronological age) for all: each gets its result or its error."""
    import torch

    from bonedist.models import list_models, model_info

    male = parse_sex(sex)
    chrono = parse_age(chronological_age) if chronological_age else None
    ensemble = Ensemble(runs, coverage)
    drawn = next((name for name, tm in ensemble.trained.items() if tm.model.task.attention), None)
    if heatmap and drawn is None:
        raise BonedistError(f"--heatmap needs a trained model with attention crops under --runs "
                            f"({', '.join(m for m in list_models() if model_info(m).task.attention)})")
    pack = ensemble.pack
    results = []
    for image_path in map(Path, images):
        try:  # a bad image gets its error; the others still get their results
            original, resized, geometry, _ = load_radiograph(image_path, pack["image_size"], pack["resize_mode"],
                                                             max_pixels)
            batch = torch.from_numpy(resized).view(1, 1, *resized.shape)
            sexes = torch.full((1,), float(male))
            row = result_row(str(image_path), male, chrono, ensemble.predict(batch, sexes), ensemble)
            if heatmap:
                row["heatmap"] = _draw(ensemble.trained[drawn], batch, sexes, original, geometry, pack, heatmap,
                                       image_path, several=len(images) > 1)
            results.append(row)
        except BonedistError as exc:
            results.append({"image": str(image_path), "error": str(exc)})
    return results


def _draw(tm, batch, sexes, original, geometry, pack, heatmap: str, image_path: Path, several: bool) -> str:
    import torch

    inputs = tm.pipe.model_batch({"image": batch, "male": sexes})  # boxes and masks of one plain forward pass
    with torch.no_grad():
        attention = tm.model(inputs.image, inputs.male)
    target = Path(heatmap) if not several else Path(heatmap).with_name(
        f"{Path(heatmap).stem}-{image_path.stem}{Path(heatmap).suffix}")
    draw_heatmap(original, geometry, pack["image_size"], attention["boxes"][0], attention["masks"][0, 0], target)
    return str(target)


def draw_heatmap(original: np.ndarray, geometry: dict, pack_size: int, box, mask, path: Path) -> None:
    """The AG-CNN attention box and chosen component, mapped back onto the original radiograph.

    Model space (the model's input size) → packed space (``pack_size``, letterboxed or stretched) → original pixels.
    """
    import cv2

    height, width = original.shape
    sx, sy, top, left = geometry["scale_x"], geometry["scale_y"], geometry["pad_top"], geometry["pad_left"]
    packed_mask = cv2.resize(mask.float().numpy(), (pack_size, pack_size), interpolation=cv2.INTER_NEAREST)
    content = packed_mask[top: top + round(height * sy), left: left + round(width * sx)]
    overlay = cv2.resize(content, (width, height), interpolation=cv2.INTER_NEAREST) > 0.5
    canvas = cv2.cvtColor(original, cv2.COLOR_GRAY2BGR)
    canvas[overlay] = (0.6 * canvas[overlay] + 0.4 * np.array([0, 80, 255])).astype(np.uint8)
    to_pack = pack_size / mask.shape[-1]
    x1, y1, x2, y2 = (v * to_pack for v in box.tolist())
    p1 = (int((x1 - left) / sx), int((y1 - top) / sy))
    p2 = (int((x2 + to_pack - left) / sx), int((y2 + to_pack - top) / sy))
    cv2.rectangle(canvas, p1, p2, (0, 255, 0), max(2, height // 250))
    if not cv2.imwrite(str(path), canvas):
        raise BonedistError(f"cannot write {path}")


def format_result(row: dict) -> str:
    interval = row.get("interval")
    span = (f" ({interval['coverage']:.0%} interval {years_months(interval['low_months'])} – "
            f"{years_months(interval['high_months'])})" if interval else "")
    lines = [f"{row['image']} ({'male' if row['sex'] == 'M' else 'female'}): bone age {row['bone_age']}{span} "
             f"({row['bone_age_months']:.1f} months), {row['ensemble']} ensemble"]
    for name, value in row["models"].items():
        lines.append(f"  {name:<16}{value:7.1f} months ({years_months(value)})")
    if "difference_months" in row:
        diff = row["difference_months"]
        trend = "advanced" if diff > 0 else "delayed" if diff < 0 else "equal to chronological age"
        lines.append(f"  chronological age {years_months(row['chronological_age_months'])}: bone age "
                     f"{trend} by {abs(diff):.1f} months" if diff else f"  {trend}")
        if "chronological_outside_interval" in row:
            outside = row["chronological_outside_interval"]
            lines.append(f"  the chronological age lies {'outside' if outside else 'inside'} the "
                         f"{interval['coverage']:.0%} interval: "
                         + ("the bone age differs from it" if outside else "no difference shown at this coverage"))
    if "heatmap" in row:
        lines.append(f"  attention drawn in {row['heatmap']}")
    return "\n".join(lines)
