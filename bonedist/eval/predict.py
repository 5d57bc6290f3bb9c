"""``bonedist predict``: bone age of single radiographs with the trained ensemble, on the CPU if need be.

    bonedist predict hand.png --sex F --runs runs/rsna --chronological-age 10y3m
    bonedist predict a.png b.jpg --sex M --json
    bonedist predict hand.png --sex F --heatmap attention.png

Each image is preprocessed exactly as `bonedist pack` does (8/16-bit PNG or JPEG → 8-bit gray → the pack's size and
resize mode), then run through every trained model; the ensemble uses the validation-fitted weights that
`bonedist evaluate` saved (report/ensemble.json), else the paper's weights, else equal weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from bonedist import BonedistError
from bonedist.data.images import MAX_PIXELS, ImageError, decode_gray8, not_a_radiograph, resize_square
from bonedist.data.layouts import parse_male
from bonedist.eval.runs import find_runs, load_trained, paper_weights
from bonedist.models import list_models, model_info


def parse_sex(text: str) -> bool:
    male = parse_male(text)
    if male is None or str(text).strip().lower() in ("1", "0", "true", "false", "t", "yes", "no", "y", "n"):
        raise BonedistError(f"--sex {text!r}: expected F or M (female/male)")
    return male


def parse_age(text: str) -> float:
    """'10y3m', '10y', '123m', '123' (months) or '10.25y' → months."""
    t = text.strip().lower().replace(" ", "")
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)y)?(?:(\d+(?:\.\d+)?)m?)?", t)
    if not t or not match or (match.group(1) is None and match.group(2) is None):
        raise BonedistError(f"--chronological-age {text!r}: expected forms like 10y3m, 10y, 123m or 123 (months)")
    years = float(match.group(1) or 0)
    months = float(match.group(2) or 0)
    return years * 12 + months


def years_months(months: float) -> str:
    total = int(round(months))
    return f"{total // 12} y {total % 12} m"


def _weights(runs: Path, names: list[str]) -> tuple[dict[str, float], str]:
    saved = runs / "report" / "ensemble.json"
    if saved.is_file():
        fitted = json.loads(saved.read_text())["weights"].get("fitted")
        if fitted and set(fitted) <= set(names):
            return fitted, "validation-fitted (report/ensemble.json)"
    paper = paper_weights(names)
    if paper and len(paper) == len(names):
        return paper, "paper"
    return {n: 1.0 / len(names) for n in names}, "equal"


def _load_image(path: Path, size: int, mode: str, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, np.ndarray,
                                                                                         dict]:
    if path.is_dir():
        raise BonedistError(f"{path}: a folder, not an image file (give the images in it: {path}/*.png)")
    if not path.is_file():
        raise BonedistError(f"{path}: no such file")
    try:
        original = decode_gray8(path.read_bytes(), max_pixels)
    except (ImageError, OSError) as exc:
        raise BonedistError(f"{path}: cannot read the image: {exc}") from exc
    except MemoryError:
        raise BonedistError(f"{path}: out of memory while decoding it (lower --max-pixels)") from None
    if (why := not_a_radiograph(original)) is not None:
        raise BonedistError(f"{path}: {why}")
    resized, geometry = resize_square(original, size, mode)
    return original, resized, geometry


@torch.no_grad()
def predict_images(images: list[str], sex: str, runs: str, chronological_age: str | None = None,
                   heatmap: str | None = None, max_pixels: int = MAX_PIXELS) -> list[dict]:
    male = parse_sex(sex)
    chrono = parse_age(chronological_age) if chronological_age else None
    found, _ = find_runs(runs)
    trained = {name: load_trained(path, "cpu") for name, path in found.items()}
    # each run's own test-time flip and patch aggregation, in the precision evaluation uses on this CPU
    predictors = {name: tm.predictor() for name, tm in trained.items()}
    weights, source = _weights(Path(runs), list(trained))
    pack = next(iter(trained.values())).meta["pack"]
    drawn = next((name for name, tm in trained.items() if tm.model.task.attention), None)
    if heatmap and drawn is None:
        raise BonedistError(f"--heatmap needs a trained model with attention crops under --runs "
                            f"({', '.join(m for m in list_models() if model_info(m).task.attention)})")
    results = []
    for image_path in map(Path, images):
        try:  # a bad image gets its error; the others still get their results
            results.append(_predict_one(image_path, male, chrono, trained, predictors, weights, source, pack,
                                        heatmap and drawn, heatmap, several=len(images) > 1, max_pixels=max_pixels))
        except BonedistError as exc:
            results.append({"image": str(image_path), "error": str(exc)})
    return results


def _predict_one(image_path: Path, male: bool, chrono: float | None, trained: dict, predictors: dict, weights: dict,
                 source: str, pack: dict, drawn: str | None, heatmap: str | None, several: bool,
                 max_pixels: int = MAX_PIXELS) -> dict:
    original, resized, geometry = _load_image(image_path, pack["image_size"], pack["resize_mode"], max_pixels)
    batch = {"image": torch.from_numpy(resized).view(1, 1, *resized.shape), "male": torch.full((1,), float(male))}
    per_model, attention = {}, None
    for name, tm in trained.items():
        out = predictors[name](batch)
        per_model[name] = float(tm.months(out["pred"][0]))
        if name == drawn:  # boxes and masks come from one plain forward pass
            inputs = tm.pipe.model_batch(batch)
            attention = tm.model(inputs.image, inputs.male)
    bone_age = float(sum(w * per_model[m] for m, w in weights.items()))
    row = {"image": str(image_path), "sex": "M" if male else "F", "bone_age_months": round(bone_age, 2),
           "bone_age": years_months(bone_age), "models": {k: round(v, 2) for k, v in per_model.items()},
           "ensemble": source, "weights": weights}
    if chrono is not None:
        row.update(chronological_age_months=chrono, difference_months=round(bone_age - chrono, 2))
    if heatmap:
        target = Path(heatmap) if not several else Path(heatmap).with_name(
            f"{Path(heatmap).stem}-{image_path.stem}{Path(heatmap).suffix}")
        draw_heatmap(original, geometry, pack["image_size"], attention["boxes"][0], attention["masks"][0, 0],
                     target)
        row["heatmap"] = str(target)
    return row


def draw_heatmap(original: np.ndarray, geometry: dict, pack_size: int, box: torch.Tensor, mask: torch.Tensor,
                 path: Path) -> None:
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
    lines = [f"{row['image']} ({'male' if row['sex'] == 'M' else 'female'}): bone age {row['bone_age']} "
             f"({row['bone_age_months']:.1f} months), {row['ensemble']} ensemble"]
    for name, value in row["models"].items():
        lines.append(f"  {name:<16}{value:7.1f} months ({years_months(value)})")
    if "difference_months" in row:
        diff = row["difference_months"]
        trend = "advanced" if diff > 0 else "delayed" if diff < 0 else "equal to chronological age"
        lines.append(f"  chronological age {years_months(row['chronological_age_months'])}: bone age "
                     f"{trend} by {abs(diff):.1f} months" if diff else f"  {trend}")
    if "heatmap" in row:
        lines.append(f"  attention drawn in {row['heatmap']}")
    return "\n".join(lines)
