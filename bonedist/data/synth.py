"""Synthetic hand phantoms with a learnable bone-age signal, written in the official RSNA/Kaggle layouts.

    bonedist synth data/phantoms --n 400 --seed 0

What changes monotonically with maturity (bone age, plus 18 months for girls, who mature earlier):
- overall hand scale and bone thickness;
- the number and size of carpal ossification centres (capitate and hamate first, pisiform last);
- epiphyses: they appear, grow towards the bone's width, and the gap to the shaft narrows until it fuses;
- long-bone lengths relative to the joint spaces.
Nuisances like real radiographs: rotation, position, background gradient, noise, a cassette rectangle, and bright
letter markers ("L", technician initials in a box) in the background, sometimes rotated.
"""

from __future__ import annotations

import multiprocessing as mp
import string
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from bonedist import BonedistError
from bonedist.data.layouts import MAX_AGE_MONTHS, OLDEST_RSNA_AGE
from bonedist.progress import progress as progress_bar

FEMALE_ADVANCE_MONTHS = 18.0
MAX_AGE = OLDEST_RSNA_AGE

# Carpal ossification centres: (name, x, y, radius in hand units, appearance maturity in months).
CARPALS = (
    ("capitate", 0.00, 0.090, 0.040, 2),
    ("hamate", -0.065, 0.095, 0.034, 4),
    ("triquetrum", -0.085, 0.040, 0.028, 30),
    ("lunate", -0.020, 0.030, 0.030, 48),
    ("scaphoid", 0.055, 0.040, 0.030, 66),
    ("trapezium", 0.110, 0.085, 0.028, 66),
    ("trapezoid", 0.065, 0.110, 0.024, 72),
    ("pisiform", -0.105, 0.070, 0.016, 120),
)
# Rays from the little finger to the thumb: base (x, y), angle from vertical (deg, + towards the thumb), and
# lengths of metacarpal, proximal, middle and distal phalanx in hand units (the thumb has no middle phalanx).
RAYS = (
    ((-0.115, 0.160), -14.0, (0.255, 0.165, 0.105, 0.080)),
    ((-0.050, 0.175), -5.0, (0.290, 0.200, 0.130, 0.085)),
    ((0.010, 0.180), 1.0, (0.310, 0.215, 0.140, 0.090)),
    ((0.070, 0.170), 8.0, (0.300, 0.200, 0.120, 0.085)),
    ((0.125, 0.120), 42.0, (0.180, 0.150, 0.0, 0.100)),
)


def maturity(age_months: float, male: bool) -> float:
    return float(age_months) + (0.0 if male else FEMALE_ADVANCE_MONTHS)


def sample_ages(rng: np.random.Generator, n: int) -> np.ndarray:
    """Bone ages skewed like RSNA's (mean ~127, sd ~41 months), within 1-228 months."""
    return np.clip(rng.beta(3.68, 2.92, size=n) * MAX_AGE, 1.0, MAX_AGE)


class _Canvas:
    """Draws in hand coordinates (x right, y towards the fingers, wrist centre at the origin, length 1)."""

    def __init__(self, height: int, width: int, scale: float, centre: tuple[float, float], angle_deg: float):
        self.soft = np.zeros((height, width), np.uint8)
        self.bone = np.zeros((height, width), np.uint8)
        self.scale = scale
        a = np.deg2rad(angle_deg)
        self.rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        self.centre = np.asarray(centre)

    def px(self, point) -> tuple[int, int]:
        x, y = self.rot @ np.asarray(point, dtype=np.float64)
        return int(round(self.centre[0] + x * self.scale)), int(round(self.centre[1] - y * self.scale))

    def thick(self, width: float) -> int:
        return max(1, int(round(width * self.scale)))

    def segment(self, layer: np.ndarray, p0, p1, width: float, value: int) -> None:
        cv2.line(layer, self.px(p0), self.px(p1), value, self.thick(width), cv2.LINE_AA)

    def blob(self, layer: np.ndarray, p, rx: float, ry: float, angle_deg: float, value: int) -> None:
        axes = (max(1, int(round(rx * self.scale))), max(1, int(round(ry * self.scale))))
        rotation = -np.rad2deg(np.arctan2(self.rot[1, 0], self.rot[0, 0]))
        cv2.ellipse(layer, self.px(p), axes, rotation - angle_deg, 0, 360, value, -1, cv2.LINE_AA)


def _long_bone(canvas: _Canvas, start, direction, length, width, m, epi_at_start, appear, fuse) -> np.ndarray:
    """A shaft with a medulla, plus its epiphysis (appears at ``appear``, fuses at ``fuse`` months)."""
    start = np.asarray(start, np.float64)
    end = start + direction * length
    gap = 0.028 * np.clip((fuse - m) / fuse, 0.0, 1.0) ** 0.7  # narrows, 0 once fused
    epi_len = 0.22 * width + 0.5 * gap if m >= appear else 0.0
    shaft_start = start + direction * epi_len if epi_at_start else start
    shaft_end = end if epi_at_start else end - direction * epi_len
    canvas.segment(canvas.bone, shaft_start, shaft_end, width, 215)
    canvas.segment(canvas.bone, shaft_start + direction * width * 0.4, shaft_end - direction * width * 0.4,
                   width * 0.45, 170)
    if m >= appear:
        grow = np.clip((m - appear) / 90.0, 0.25, 1.0)
        centre = start + direction * (epi_len - gap) * 0.5 if epi_at_start else end - direction * (epi_len - gap) * 0.5
        angle = np.rad2deg(np.arctan2(direction[0], direction[1]))
        canvas.blob(canvas.bone, centre, width * 0.5 * grow, max(epi_len - gap, 0.004) * 0.5, angle, 225)
    return end


def render_phantom(age_months: float, male: bool, size: int = 512, seed: int | np.random.SeedSequence = 0
                   ) -> np.ndarray:
    """One (size, ~0.82·size) uint8 radiograph phantom of a left hand, PA view."""
    rng = np.random.default_rng(seed)
    m = maturity(age_months, male)
    t = float(np.clip(m / MAX_AGE_MONTHS, 0.0, 1.0))
    height, width = size, int(round(size * 0.82))
    scale = height * (0.36 + 0.26 * t) * rng.uniform(0.93, 1.07)
    centre = (width * (0.5 + rng.uniform(-0.06, 0.06)), height * (0.80 + rng.uniform(-0.04, 0.03)))
    canvas = _Canvas(height, width, scale, centre, rng.uniform(-14, 14))
    bone_w = 0.050 * (0.70 + 0.45 * t)
    length_gain = 0.88 + 0.12 * t

    # Soft tissue: forearm, palm, fingers.
    canvas.segment(canvas.soft, (0.0, -1.2), (0.0, 0.05), 0.34, 255)
    palm = [(-0.15, 0.0), (0.16, 0.0), (0.19, 0.18), (0.10, 0.47), (-0.14, 0.42), (-0.17, 0.18)]
    cv2.fillConvexPoly(canvas.soft, np.array([canvas.px(p) for p in palm], np.int32), 255, cv2.LINE_AA)
    # Radius and ulna with their distal epiphyses.
    for x, w, appear, fuse in ((0.075, 1.35, 12, 210), (-0.080, 1.0, 72, 200)):
        _long_bone(canvas, (x, -1.2), np.array([0.0, 1.0]), 1.16, bone_w * w, m, False, appear, fuse)
    # Carpals: each centre appears at its own maturity and grows for about five years.
    # Nothing here draws from rng, so with one seed only the anatomy changes with age, never the nuisances.
    for i, (_, x, y, r, appear) in enumerate(CARPALS):
        if m >= appear:
            grow = np.clip((m - appear) / 70.0 + 0.2, 0.2, 1.0) * (0.85 + 0.3 * t)
            canvas.blob(canvas.bone, (x * (0.9 + 0.1 * t), y), r * grow, r * grow * 0.85, 37.0 * i, 205)
    # Metacarpals and phalanges.
    for (base, angle_deg, lengths) in RAYS:
        a = np.deg2rad(angle_deg)
        direction = np.array([np.sin(a), np.cos(a)])
        thumb = lengths[2] == 0.0
        tip = np.asarray(base) + direction * (sum(lengths) * length_gain + 0.1)
        canvas.segment(canvas.soft, base, tip, 0.095 if not thumb else 0.11, 255)
        point = np.asarray(base, np.float64)
        for j, length in enumerate(lengths):
            if length == 0.0:
                continue
            w = bone_w * (1.0 if j < 2 else 0.8 if j == 2 else 0.7)
            epi_at_start = thumb or j > 0  # finger metacarpals carry their epiphysis at the head
            appear = 18 + 6 * j
            end = _long_bone(canvas, point, direction, length * length_gain, w, m, epi_at_start, appear, 190)
            point = end + direction * (0.018 * (1.15 - 0.3 * t))  # joint space
    # Compose: background gradient, soft tissue, bone, noise.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gx, gy = rng.uniform(-1, 1, 2)
    image = 0.06 + 0.05 * (gx * xx / width + gy * yy / height)
    if rng.random() < 0.35:  # a cassette: a slightly brighter rectangle with a bright rim behind the hand
        x0, y0 = int(width * rng.uniform(0.03, 0.1)), int(height * rng.uniform(0.05, 0.15))
        x1, y1 = int(width * rng.uniform(0.9, 0.97)), int(height * rng.uniform(0.9, 0.98))
        image[y0:y1, x0:x1] += 0.05
        cv2.rectangle(image, (x0, y0), (x1, y1), 0.5, max(1, size // 200))
    soft = cv2.GaussianBlur(canvas.soft, (0, 0), max(1.0, size / 300)).astype(np.float32) / 255.0
    bone = cv2.GaussianBlur(canvas.bone, (0, 0), max(0.6, size / 700)).astype(np.float32) / 255.0
    image = image + 0.30 * soft * rng.uniform(0.85, 1.15)
    image = image * (1 - 0.9 * bone) + 0.80 * bone
    image += rng.normal(0.0, 0.018, image.shape).astype(np.float32)
    image = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    _draw_markers(image, rng)
    return image


def _draw_markers(image: np.ndarray, rng: np.random.Generator) -> None:
    """Bright lead markers: an "L", and technician initials in a white box, near the corners, sometimes rotated."""
    height, width = image.shape
    unit = height / 512
    texts = ["L"] + (["".join(rng.choice(list(string.ascii_uppercase), 2))] if rng.random() < 0.7 else [])
    corners = rng.permutation(4)
    for i, text in enumerate(texts):
        font_scale = unit * rng.uniform(1.3, 2.2)
        thickness = max(1, int(round(unit * 3)))
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        pad = int(4 * unit)
        patch = np.zeros((th + base + 2 * pad, tw + 2 * pad), np.uint8)
        boxed = i > 0
        if boxed:
            patch[:] = 235
        cv2.putText(patch, text, (pad, th + pad), cv2.FONT_HERSHEY_SIMPLEX, font_scale, 20 if boxed else 250,
                    thickness, cv2.LINE_AA)
        patch = np.ascontiguousarray(np.rot90(patch, int(rng.integers(0, 4)) if rng.random() < 0.4 else 0))
        ph, pw = patch.shape
        if ph >= height // 2 or pw >= width // 2:
            continue
        corner = corners[i]
        y = int(rng.uniform(0.02, 0.14) * height)
        x = int(rng.uniform(0.02, 0.12) * width)
        y = y if corner < 2 else height - ph - y
        x = x if corner % 2 == 0 else width - pw - x
        region = image[y : y + ph, x : x + pw]
        if boxed:
            region[:] = patch
        else:
            np.maximum(region, patch, out=region)


# ---------------------------------------------------------------------------------------------------------------
# Writing a dataset in the official layouts.


def _render_png(job: tuple[int, float, bool, int, int]) -> bytes:
    image_id, age, male, size, seed = job
    image = render_phantom(age, male, size, np.random.SeedSequence([seed, image_id]))
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok
    return buf.tobytes()


def synth_dataset(out: str | Path, n: int = 400, n_val: int | None = None, n_test: int | None = None, seed: int = 0,
                  size: int = 512, workers: int = 0, progress: bool = True) -> dict:
    """Write train (Kaggle layout), validation (RSNA CSV + two zips) and test (RSNA .xlsx + folder) phantoms."""
    if n < 1:
        raise BonedistError(f"--n must be at least 1, got {n}")
    if size < 64:
        raise BonedistError(f"--image-size must be at least 64 pixels, got {size}")
    n_val = max(1, n // 4) if n_val is None else n_val
    n_test = max(1, n // 4) if n_test is None else n_test
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {"train": n, "validation": n_val, "test": n_test}
    first_id = {"train": 1000, "validation": 100000, "test": 200000}
    tables = {}
    for split, count in counts.items():
        ids = first_id[split] + np.arange(count)
        tables[split] = pd.DataFrame({"id": ids, "age": sample_ages(rng, count), "male": rng.random(count) < 0.54})
    jobs = [(int(r.id), float(r.age), bool(r.male), size, seed) for split in counts for r in tables[split].itertuples()]
    from bonedist.data.pack import default_workers

    workers = workers or default_workers()
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and len(jobs) > 8 else None
    try:
        results = pool.imap(_render_png, jobs, chunksize=4) if pool else map(_render_png, jobs)
        bar, pngs = progress_bar(len(jobs), "synth", "img", enabled=progress), {}
        for job, png in zip(jobs, results):
            pngs[job[0]] = png
            bar.update(1)
        bar.close()
    finally:
        if pool:
            pool.close()
            pool.join()
    _write_layouts(out, tables, pngs)
    return {split: len(t) for split, t in tables.items()}


def _write_layouts(out: Path, tables: dict[str, pd.DataFrame], pngs: dict[int, bytes]) -> None:
    train = tables["train"]
    folder = out / "boneage-training-dataset" / "boneage-training-dataset"  # Kaggle nests it twice
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in train["id"]:
        (folder / f"{image_id}.png").write_bytes(pngs[int(image_id)])
    pd.DataFrame({"id": train["id"], "boneage": train["age"].round().astype(int),
                  "male": train["male"].map({True: "True", False: "False"})}).to_csv(
        out / "boneage-training-dataset.csv", index=False)

    val = tables["validation"]
    halves = np.array_split(val["id"].to_numpy(), 2)
    for part, ids in enumerate(halves, start=1):
        name = f"boneage-validation-dataset-{part}"
        with zipfile.ZipFile(out / f"{name}.zip", "w", zipfile.ZIP_STORED) as zf:
            for image_id in ids:
                info = zipfile.ZipInfo(f"{name}/{image_id}.png", date_time=(2017, 8, 1, 0, 0, 0))
                zf.writestr(info, pngs[int(image_id)])
    pd.DataFrame({"Image ID": val["id"], "male": val["male"].map({True: "TRUE", False: "FALSE"}),
                  "Bone Age (months)": val["age"].round().astype(int)}).to_csv(
        out / "Validation Dataset.csv", index=False)

    test = tables["test"]
    folder = out / "boneage-test-dataset"
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in test["id"]:
        (folder / f"{image_id}.png").write_bytes(pngs[int(image_id)])
    pd.DataFrame({"Case ID": test["id"], "Sex": test["male"].map({True: "M", False: "F"}),
                  "Ground truth bone age (months)": test["age"].round(2)}).to_excel(
        out / "Bone age ground truth.xlsx", index=False)
