"""``bonedist predict --table worklist.csv`` and ``bonedist predict FOLDER``: a hospital's worklist in one run.

The models are loaded once; DataLoader workers decode the images (PNG, JPEG, DICOM) and resize them while the
models predict batches; every row gets its result or its own error line, and one CSV and one JSON row per image come
out (bone age, interval, each model, the difference to the chronological age). Under ``accelerate launch`` the rows
are dealt to the processes and every image is predicted exactly once.

A worklist table (CSV) has an image column (``image``, ``path`` or ``file``: relative to the table's folder or
``--image-dir``; or ``id``, looked up there as ``ID.png``/``.jpg``/``.dcm``), a sex column (``sex`` or ``male``) and
optionally a chronological age (``chronological_age``, ``age``: months, or forms like ``10y3m``). In a folder, or
when the table leaves them out, DICOM headers give sex and age (PatientSex, PatientAge or the birth and study
dates); ``--sex`` and ``--chronological-age`` give them to images that have neither.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bonedist import BonedistError
from bonedist.data.images import IMAGE_SUFFIXES, MAX_PIXELS
from bonedist.data.layouts import parse_male
from bonedist.eval.predict import Ensemble, load_radiograph, parse_age, result_row
from bonedist.files import atomic_open, write_atomic
from bonedist.progress import progress

IMAGE_COLUMNS, ID_COLUMNS = ("image", "path", "file"), ("id", "image_id")
SEX_COLUMNS, AGE_COLUMNS = ("sex", "male", "patient_sex"), ("chronological_age", "age", "chronological_age_months")


@dataclass
class WorkItem:
    """One row of work: an image file, and what the table (or the flags) say of it."""

    index: int
    path: Path | None
    male: bool | None = None
    chrono: float | None = None
    label: str = ""  # the image as the table names it
    error: str | None = None  # a bad row: its error, without any decoding
    warnings: list = field(default_factory=list)


def _column(frame: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    lowered = {str(c).strip().lower().replace(" ", "_"): c for c in frame.columns}
    return next((lowered[n] for n in names if n in lowered), None)


def read_worklist(table: Path, image_dir: Path | None = None, allow_outside: bool = False) -> list[WorkItem]:
    """The rows of a worklist CSV; a row that names no usable image, sex or age gets its error here, and so does a
    path that leads outside the images' folder (``--image-dir``, else the table's), unless ``allow_outside``.
    An empty table, or one with a header and no rows, is an error, as an empty folder is."""
    if not table.is_file():
        raise BonedistError(f"--table {table}: no such file")
    try:  # file names as archives hold them: bytes that are not UTF-8 come back as they were
        frame = pd.read_csv(table, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                            encoding_errors="surrogateescape")
    except pd.errors.EmptyDataError:
        raise BonedistError(f"--table {table}: the file is empty (expected a header and one row per image)") from None
    except (OSError, pd.errors.ParserError, ValueError) as exc:
        raise BonedistError(f"--table {table}: cannot read it ({str(exc).strip().splitlines()[0]})") from None
    if frame.empty:
        raise BonedistError(f"--table {table}: no rows under its header; nothing to predict")
    image_col, id_col = _column(frame, IMAGE_COLUMNS), _column(frame, ID_COLUMNS)
    if image_col is None and id_col is None:
        raise BonedistError(f"--table {table}: no image column (one of {', '.join(IMAGE_COLUMNS + ID_COLUMNS)}); "
                            f"its columns: {', '.join(map(str, frame.columns))}")
    sex_col, age_col = _column(frame, SEX_COLUMNS), _column(frame, AGE_COLUMNS)
    base = image_dir or table.parent
    inside = base.resolve()
    items = []
    for i, row in enumerate(frame.to_dict("records")):
        label = str(row[image_col] if image_col else row[id_col]).strip()
        item = WorkItem(i, None, label=label or f"row {i + 2}")
        if not label:
            item.error = f"{table} row {i + 2}: no image given"
        else:
            item.path = base / label if image_col else _find_by_id(base, label)
            if item.path is None:
                item.error = f"{table} row {i + 2}: no image {label}.png, .jpg or .dcm in {base}"
            elif not allow_outside and not item.path.resolve().is_relative_to(inside):
                item.error = (f"{table} row {i + 2}: {label} leads outside {base} (--allow-outside-image-dir to "
                              f"read it)")
        if sex_col and str(row[sex_col]).strip():
            item.male = parse_male(row[sex_col])
            if item.male is None and item.error is None:
                item.error = f"{table} row {i + 2}: unknown sex {row[sex_col]!r} (expected M or F)"
        if age_col and str(row[age_col]).strip() and item.error is None:
            try:
                item.chrono = parse_age(row[age_col])
            except BonedistError:
                item.error = f"{table} row {i + 2}: chronological age {row[age_col]!r} is not a number of months " \
                             f"or a form like 10y3m"
        items.append(item)
    return items


def _find_by_id(folder: Path, image_id: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{image_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def folder_items(folder: Path) -> list[WorkItem]:
    """Every image file below ``folder`` (PNG, JPEG, DICOM; extension-less files are tried as DICOM), sorted."""
    from bonedist.data.dicom import is_dicom, looks_like_dicom

    paths = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(path)
        elif not path.suffix:
            with open(path, "rb") as f:
                head = f.read(132)
            if is_dicom(head) or looks_like_dicom(head):
                paths.append(path)
    return [WorkItem(i, p, label=str(p.relative_to(folder))) for i, p in enumerate(paths)]


class RadiographDataset(torch.utils.data.Dataset):
    """Decodes and resizes one work item (in a DataLoader worker); a bad one comes back with its error."""

    def __init__(self, items: list[WorkItem], size: int, mode: str, max_pixels: int, default_male: bool | None,
                 default_chrono: float | None):
        self.items, self.size, self.mode, self.max_pixels = items, size, mode, max_pixels
        self.default_male, self.default_chrono = default_male, default_chrono

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        out = {"index": item.index, "image": None, "male": item.male, "chrono": item.chrono, "error": item.error,
               "warnings": list(item.warnings)}
        if item.error:
            return out
        try:
            _, resized, _, facts = load_radiograph(item.path, self.size, self.mode, self.max_pixels)
        except BonedistError as exc:
            out["error"] = str(exc)
            return out
        header_male, header_age = facts.get("male"), facts.get("age_months")
        if out["male"] is None:
            out["male"] = header_male if header_male is not None else self.default_male
        elif header_male is not None and header_male != out["male"]:
            out["warnings"].append(f"the DICOM header says {'M' if header_male else 'F'}, the table "
                                   f"{'M' if out['male'] else 'F'} (the table's is used)")
        if out["chrono"] is None:
            out["chrono"] = header_age if header_age is not None else self.default_chrono
        if out["male"] is None:
            out["error"] = f"{item.path}: no sex (none in the table or the DICOM header; give --sex or a table)"
            return out
        out["image"] = torch.from_numpy(resized).unsqueeze(0)  # (1, S, S) uint8
        return out


def _collate(samples: list[dict]) -> list[dict]:
    return samples


def predict_worklist(items: list[WorkItem], ensemble: Ensemble, batch_size: int = 32, workers: int = 2,
                     max_pixels: int = MAX_PIXELS, default_male: bool | None = None,
                     default_chrono: float | None = None, rank: int = 0, world: int = 1,
                     show_progress: bool = True) -> list[dict]:
    """This rank's rows (items ``rank::world``), in item order: each its result or its error."""
    pack = ensemble.pack
    mine = items[rank::world]
    dataset = RadiographDataset(mine, pack["image_size"], pack["resize_mode"], max_pixels, default_male,
                                default_chrono)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    by_index = {item.index: item for item in mine}
    rows = []
    bar = progress(len(mine), "predict", "img", enabled=show_progress and rank == 0)
    for samples in loader:
        good = [s for s in samples if s["error"] is None]
        values = ensemble.predict(torch.stack([s["image"] for s in good]),
                                  torch.tensor([float(s["male"]) for s in good])) if good else {}
        position = {s["index"]: k for k, s in enumerate(good)}
        for s in samples:
            item = by_index[s["index"]]
            label = str(item.path) if item.path is not None else item.label
            if s["error"] is not None:
                rows.append({"index": s["index"], "image": label, "error": s["error"]})
                continue
            row = result_row(label, bool(s["male"]), s["chrono"], values, ensemble, position[s["index"]])
            rows.append({"index": s["index"], **row, **({"warnings": s["warnings"]} if s["warnings"] else {})})
        bar.update(len(samples))
    bar.close()
    return rows


def gather_rows(rows: list[dict], world: int) -> list[dict]:
    """Every rank's rows, in worklist order (each item exactly once)."""
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    rows = sorted(rows, key=lambda r: r["index"])
    if len({r["index"] for r in rows}) != len(rows):
        raise RuntimeError("a worklist row was predicted more than once")
    return rows


CSV_COLUMNS = ["image", "sex", "chronological_age_months", "bone_age_months", "bone_age", "interval_low_months",
               "interval_high_months", "coverage", "chronological_outside_interval", "difference_months", "warnings",
               "error"]


def write_results(rows: list[dict], out: Path) -> tuple[Path, Path]:
    """``out`` (CSV, one row per image, a column per model) and the same rows as JSON beside it."""
    models = sorted({m for r in rows for m in r.get("models", {})})
    out.parent.mkdir(parents=True, exist_ok=True)
    # atomic, and file names written back byte for byte (a name that is not UTF-8 keeps its bytes)
    with atomic_open(out, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS + [f"model_{m}" for m in models])
        writer.writeheader()
        for r in rows:
            interval = r.get("interval") or {}
            flat = {k: r.get(k) for k in CSV_COLUMNS if k in r}
            flat.update(interval_low_months=interval.get("low_months"),
                        interval_high_months=interval.get("high_months"), coverage=interval.get("coverage"),
                        warnings="; ".join(r.get("warnings", [])) or None)
            flat.update({f"model_{m}": v for m, v in r.get("models", {}).items()})
            writer.writerow({k: ("" if v is None else v) for k, v in flat.items()})
    json_path = out.with_suffix(".json")
    write_atomic(json_path, json.dumps([{k: v for k, v in r.items() if k != "index"} for r in rows], indent=1,
                                       default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))
    return out, json_path
