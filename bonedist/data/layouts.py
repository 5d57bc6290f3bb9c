"""Find and read the official RSNA/Kaggle bone-age layouts (or a generic CSV) into one normalised table.

Every layout becomes rows of ``id, split, boneage_months, male, source, origin``: ``source`` is where the image
lies relative to the data root (``folder/1377.png`` or ``archive.zip!folder/1377.png``), ``origin`` names the CSV
row the record came from, for error messages. Rows that cannot be used are returned as ``skipped`` entries
(``{"source", "reason"}``) and never stop the rest.
"""

from __future__ import annotations

import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from bonedist import BonedistError
from bonedist.data.images import IMAGE_SUFFIXES
from bonedist.data.options import SPLITS, GenericCSV, parse_male  # noqa: F401  (re-exported)

MAX_AGE_MONTHS = 240.0  # labels accepted by pack: 0-20 years
OLDEST_RSNA_AGE = 228.0  # the oldest bone age in RSNA 2017 (19 years): phantoms, age bins and plots stop there
ZIP_SEP = "!"
MAX_DEPTH = 4  # how deep below the root the layout files and image folders are looked for


@dataclass(frozen=True)
class Layout:
    """One official table format: its file name, split, and column names (matched case-insensitively)."""

    name: str
    filename: str
    split: str
    id_col: str
    sex_col: str
    age_col: str | None  # None: the layout has no ages (unlabeled test data)


# In priority order: for a split, the first layout found is read and later ones are reported as ignored.
OFFICIAL_LAYOUTS = (
    Layout("kaggle-train", "boneage-training-dataset.csv", "train", "id", "male", "boneage"),
    Layout("rsna-train", "train.csv", "train", "id", "male", "boneage"),
    Layout("rsna-validation", "Validation Dataset.csv", "validation", "Image ID", "male", "Bone Age (months)"),
    Layout("rsna-test", "Bone age ground truth.xlsx", "test", "Case ID", "Sex", "Ground truth bone age (months)"),
    Layout("kaggle-test", "boneage-test-dataset.csv", "test", "Case ID", "Sex", None),
)
# Words that tie a folder or zip to a split, however the download was unpacked: Kaggle's
# ``boneage-training-dataset``, ``boneage-validation-dataset-1.zip``, ``boneage-test-dataset``; RSNA's
# ``Bone Age Training Set``, ``Bone Age Validation Set``, ``Bone Age Test Set/Test Set Images``.
SPLIT_WORDS = {"train": "train", "validation": "valid", "test": "test"}



@dataclass
class Table:
    """The normalised records of every split found, what was skipped, and which layout files were read."""

    records: pd.DataFrame
    skipped: list[dict] = field(default_factory=list)
    layouts: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # problems that must stop the pack (no manifest written)


def parse_age(value) -> tuple[float | None, str | None]:
    """Return (months, None) or (None, reason)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None, "missing bone age"
    try:
        age = float(str(value).strip())
    except ValueError:
        return None, f"invalid bone age {value!r}"
    if not math.isfinite(age) or not 0.0 <= age <= MAX_AGE_MONTHS:
        return None, f"bone age {value} outside 0-{MAX_AGE_MONTHS:g} months"
    return age, None


def normalise_id(value) -> str | None:
    """Spreadsheet ids arrive as 1377.0; keep them as the file stem ``1377``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def sample_key(image_id: str) -> str:
    """WebDataset keys may not contain dots (they separate the extension) nor slashes."""
    return "".join("_" if c in "./\\ " else c for c in image_id)


def read_source(root: Path, source: str, zips: dict[str, zipfile.ZipFile] | None = None) -> bytes:
    """The bytes of an image named by a ``source`` string (a file, or a member of a zip archive).

    ``zips`` keeps archives open between calls (a packing worker reads thousands of members of the same zip).
    """
    path = root / source
    archive = next((source[:i] for i, c in enumerate(source) if c == ZIP_SEP and source[:i].lower().endswith(".zip")),
                   None)
    if archive is None or path.is_file():  # a file whose name holds a "!" is a file, not a zip member
        return path.read_bytes()
    member = source[len(archive) + 1:]
    if zips is None:
        with zipfile.ZipFile(root / archive) as zf:
            return zf.read(member)
    if archive not in zips:
        zips[archive] = zipfile.ZipFile(root / archive)
    return zips[archive].read(member)


def read_table(root: str | Path, generic: GenericCSV | None = None, splits: tuple[str, ...] = SPLITS) -> Table:
    """Detect the layouts under ``root`` (or read ``generic``) and return the normalised table.

    Raises:
        BonedistError: the root does not exist, or no known layout was found in it.
    """
    root = Path(root)
    if not root.is_dir():
        raise BonedistError(f"data root {root} does not exist or is not a folder")
    table = Table(records=pd.DataFrame())
    rows: list[dict] = []
    if generic is not None:
        rows = _read_generic(root, generic, table)
    else:
        files, outside = _walk(root)
        images = ImageIndex(root, files, outside)
        found_splits = set()
        for layout in OFFICIAL_LAYOUTS:
            matches = [f for f in files if f.name.lower() == layout.filename.lower()]
            if not matches or layout.split not in splits:
                continue
            path = matches[0]
            if layout.split in found_splits:
                table.layouts.append({"split": layout.split, "layout": layout.name, "file": _rel(root, path),
                                      "used": False, "note": "another file of this split was read first"})
                continue
            split_rows = _read_official(root, path, layout, images, table)
            if split_rows is None:
                continue
            found_splits.add(layout.split)
            rows.extend(split_rows)
        if not table.layouts and "test" in splits:
            rows = _read_dicom_folder(root, files, table)
        if not table.layouts:
            known = ", ".join(sorted({layout.filename for layout in OFFICIAL_LAYOUTS}))
            raise BonedistError(
                f"no known bone-age layout under {root}: looked for {known} and DICOM files (up to {MAX_DEPTH} "
                "folders deep); for another collection pass --csv FILE with --id-col/--age-col/--sex-col"
            )
    columns = ["id", "key", "split", "boneage_months", "male", "source", "origin"]
    records = pd.DataFrame(rows, columns=columns)
    table.records = _drop_duplicates(records, table.skipped)
    return table


def _read_dicom_folder(root: Path, files: list[Path], table: Table) -> list[dict]:
    """A folder of DICOM radiographs without a table (an archive export): each file is an unlabeled ``test``
    sample, its sex from the header (PatientSex); ids are paths below the root without the suffix."""
    from bonedist.data.dicom import header_facts

    rows = []
    for path in files:
        if path.name.startswith(".") or (path.suffix and path.suffix.lower() != ".dcm"):
            continue
        facts = header_facts(path)
        if facts is None:
            continue
        rel = _rel(root, path)
        image_id = rel[: -len(path.suffix)] if path.suffix else rel
        if facts["male"] is None:
            table.skipped.append({"source": rel, "reason": "DICOM header has no PatientSex M or F"})
            continue
        rows.append({"id": image_id, "key": sample_key(image_id), "split": "test", "boneage_months": None,
                     "male": facts["male"], "source": rel, "origin": rel})
    if rows or table.skipped:
        table.layouts.append({"split": "test", "layout": "dicom-folder", "file": f"{len(rows)} DICOM files, sex "
                              f"from their headers (no table)", "used": True, "labeled": False})
    return rows


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """Files up to ``MAX_DEPTH`` folders below ``root``, and the links among them that point outside it."""
    out, outside = [], []
    resolved_root = root.resolve()
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink() and not entry.resolve().is_relative_to(resolved_root):
                outside.append(entry)
            elif entry.is_dir() and depth < MAX_DEPTH and not entry.name.startswith("."):
                stack.append((entry, depth + 1))
            elif entry.is_file():
                out.append(entry)
    return sorted(out), sorted(outside)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _load_frame(path: Path) -> pd.DataFrame:
    if path.suffix.lower() in (".xlsx", ".xls"):
        return pd.read_excel(path, sheet_name=0, dtype=object)
    # utf-8-sig: a table saved by Excel starts with a byte-order mark that would otherwise stick to the first column
    return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")


def _find_column(frame: pd.DataFrame, name: str) -> str | None:
    wanted = name.strip().lower()
    for column in frame.columns:
        if str(column).strip().lower() == wanted:
            return column
    return None


def _read_official(root: Path, path: Path, layout: Layout, images: ImageIndex, table: Table) -> list[dict] | None:
    rel = _rel(root, path)
    try:
        frame = _load_frame(path)
    except Exception as exc:  # a malformed CSV or spreadsheet: report it and read the other layouts
        table.skipped.append({"source": rel, "reason": f"cannot read {layout.name} table: {exc}"})
        return None
    wanted = [layout.id_col, layout.sex_col] + ([layout.age_col] if layout.age_col else [])
    columns = {name: _find_column(frame, name) for name in wanted}
    missing = [name for name, col in columns.items() if col is None]
    if missing:
        table.skipped.append({"source": rel, "reason": f"unknown columns {list(map(str, frame.columns))}: "
                                                      f"a {layout.name} table needs {wanted}"})
        return None
    table.layouts.append({"split": layout.split, "layout": layout.name, "file": rel, "used": True})
    rows, missing = [], 0
    for i, raw in enumerate(frame.to_dict("records")):
        origin = f"{rel} row {i + 2}"
        image_id = normalise_id(raw[columns[layout.id_col]])
        age = raw[columns[layout.age_col]] if layout.age_col else None
        record = _record(image_id, layout.split, age, raw[columns[layout.sex_col]], origin,
                         labeled=layout.age_col is not None, table=table)
        if record is None:
            continue
        source, why = images.find(image_id, layout.split)
        if source is None:
            table.skipped.append({"source": origin, "reason": why})
            missing += 1
            continue
        record["source"] = source
        rows.append(record)
    if layout.age_col and missing and not rows:  # a labelled split must not vanish in silence
        table.errors.append(f"{rel}: none of its {missing} images was found under {root} (looked for <id>.png "
                            f"or .jpg in every folder and zip up to {MAX_DEPTH} levels deep)")
    return rows


def _record(image_id, split, age_value, sex_value, origin, labeled, table) -> dict | None:
    if image_id is None:
        table.skipped.append({"source": origin, "reason": "missing image id"})
        return None
    age = None
    if labeled:
        age, why = parse_age(age_value)
        if why:
            table.skipped.append({"source": origin, "reason": f"{why} for image {image_id}"})
            return None
    male = parse_male(sex_value)
    if male is None:
        table.skipped.append({"source": origin, "reason": f"invalid sex {sex_value!r} for image {image_id} "
                                                          "(expected True/False, TRUE/FALSE, M/F)"})
        return None
    return {"id": image_id, "key": sample_key(image_id), "split": split, "boneage_months": age, "male": male,
            "origin": origin}


class ImageIndex:
    """Every image file under the root, in folders or zips, by id (file stem); found once, matched per table.

    An id found in several places is resolved by where it lies: a folder or zip named for the table's split
    (``SPLIT_WORDS``) wins over one named for another split or none, and an extracted file over a zip member. Copies
    of the same size are the same image; otherwise the id is ambiguous and reported with every place it was found.
    """

    def __init__(self, root: Path, files: list[Path], outside: list[Path] = ()):
        self.candidates: dict[str, list[tuple[str, int]]] = {}  # id -> [(source, size)]
        for path in files:
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES and not path.name.startswith("."):
                self._add(path.stem, _rel(root, path), path.stat().st_size)
            elif suffix == ".zip":
                try:
                    with zipfile.ZipFile(path) as zf:
                        members = [(info.filename, info.file_size) for info in zf.infolist()]
                except (zipfile.BadZipFile, OSError):
                    continue
                for name, size in members:
                    member = PurePosixPath(name)
                    if member.suffix.lower() in IMAGE_SUFFIXES and not member.name.startswith("."):
                        self._add(member.stem, f"{_rel(root, path)}{ZIP_SEP}{name}", size)
        self.outside = {p.stem: _rel(root, p) for p in outside if p.suffix.lower() in IMAGE_SUFFIXES}

    def _add(self, image_id: str, source: str, size: int) -> None:
        self.candidates.setdefault(image_id, []).append((source, size))

    def find(self, image_id: str, split: str) -> tuple[str | None, str | None]:
        """``(source, None)``, or ``(None, reason)`` when the image is missing or ambiguous."""
        found = self.candidates.get(image_id, [])
        if not found:
            if image_id in self.outside:
                return None, f"image {image_id}: {self.outside[image_id]} is a link to outside the data root"
            return None, f"image {image_id}.png not found under the data root (folders and zips)"
        scored = sorted(((_place_score(source, split), source, size) for source, size in found),
                        key=lambda t: (-t[0], t[1]))
        best = [t for t in scored if t[0] == scored[0][0]]
        if len({size for _, _, size in best}) > 1:
            places = ", ".join(source for _, source, _ in best)
            return None, f"image {image_id} is ambiguous: different files at {places}"
        return best[0][1], None


def _place_score(source: str, split: str) -> int:
    """How well a file's folders (or zip) fit ``split``: named for it 2, for another split -2; extracted +1."""
    parts = [re.sub(r"[^a-z]", "", part.lower()) for part in PurePosixPath(source.replace(ZIP_SEP, "/")).parts[:-1]]
    mine = any(SPLIT_WORDS[split] in part for part in parts)
    other = any(word in part for name, word in SPLIT_WORDS.items() if name != split for part in parts)
    return (2 if mine else -2 if other else 0) + (0 if ZIP_SEP in source else 1)


def _read_generic(root: Path, spec: GenericCSV, table: Table) -> list[dict]:
    csv = spec.csv if spec.csv.is_absolute() else root / spec.csv
    if not csv.is_file():
        raise BonedistError(f"--csv {spec.csv}: file not found")
    try:
        frame = _load_frame(csv)
    except Exception as exc:
        raise BonedistError(f"--csv {csv}: cannot read it: {exc}") from exc
    flags = {"--id-col": spec.id_col, "--sex-col": spec.sex_col, "--age-col": spec.age_col,
             "--path-col": spec.path_col, "--split-col": spec.split_col}
    columns = {}
    for flag, name in flags.items():
        if name is None:
            continue
        columns[flag] = _find_column(frame, name)
        if columns[flag] is None:
            raise BonedistError(f"--csv {csv.name}: no column {name!r} (given by {flag}); "
                                f"the columns are {list(map(str, frame.columns))}")
    if spec.age_unit not in ("months", "years"):
        raise BonedistError(f"--age-unit must be months or years, got {spec.age_unit!r}")
    rel_csv = csv.name
    table.layouts.append({"split": spec.split_col or spec.split, "layout": "generic-csv", "file": str(csv),
                          "used": True})
    images = {}
    resolved_root = root.resolve()
    if spec.path_col is None:
        image_dir = root / (spec.image_dir or ".")
        if not image_dir.resolve().is_relative_to(resolved_root):
            raise BonedistError(f"--image-dir {spec.image_dir}: outside the data root {root}; images are read "
                                f"only from inside it (pass the folder that holds both as ROOT)")
        if not image_dir.is_dir():
            raise BonedistError(f"--image-dir {spec.image_dir}: not a folder under {root}")
        for path in sorted(image_dir.rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            source = _safe_path(root, resolved_root, _rel(root, path))
            if source is None:
                table.skipped.append({"source": _rel(root, path), "reason": "a link to outside the data root"})
            else:
                images.setdefault(path.stem, source)
    rows = []
    for i, raw in enumerate(frame.to_dict("records")):
        origin = f"{rel_csv} row {i + 2}"
        split = str(raw[columns["--split-col"]]).strip().lower() if spec.split_col else spec.split
        if split not in SPLITS:
            table.skipped.append({"source": origin, "reason": f"unknown split {split!r} (expected {SPLITS})"})
            continue
        age = raw[columns["--age-col"]] if spec.age_col else None
        if spec.age_col and spec.age_unit == "years":
            try:
                age = float(age) * 12.0
            except (TypeError, ValueError):
                pass  # parse_age reports it
        record = _record(normalise_id(raw[columns["--id-col"]]), split, age, raw[columns["--sex-col"]], origin,
                         labeled=spec.age_col is not None, table=table)
        if record is None:
            continue
        if spec.path_col:
            source = _safe_path(root, resolved_root, str(raw[columns["--path-col"]]).strip())
            if source is None:
                table.skipped.append({"source": origin, "reason": "image path escapes the data root"})
                continue
        else:
            source = images.get(record["id"])
            if source is None:
                table.skipped.append({"source": origin, "reason": f"image {record['id']}.* not found in "
                                                                  f"{spec.image_dir or root}"})
                continue
        record["source"] = source
        rows.append(record)
    return rows


def _safe_path(root: Path, resolved_root: Path, text: str) -> str | None:
    """A CSV path relative to the root, or None when it points outside it (absolute, ``..``, symlink out)."""
    if not text or ZIP_SEP in text:
        return None
    target = (root / text).resolve()
    if not target.is_relative_to(resolved_root):
        return None
    return target.relative_to(resolved_root).as_posix()


def _drop_duplicates(records: pd.DataFrame, skipped: list[dict]) -> pd.DataFrame:
    """Keep the first record of each key (in split order train → validation → test, then file order).

    A duplicate inside a split is ambiguous; one across splits would leak test images into training.
    """
    if records.empty:
        return records
    order = {split: i for i, split in enumerate(SPLITS)}
    records = records.assign(_split_order=records["split"].map(order)).sort_values("_split_order", kind="stable")
    first: dict[str, str] = {}
    keep = []
    for key, origin, split in zip(records["key"], records["origin"], records["split"]):
        if key in first:
            skipped.append({"source": origin, "reason": f"duplicate id {key} (first seen at {first[key]})"})
            keep.append(False)
        else:
            first[key] = f"{origin} ({split})"
            keep.append(True)
    return records[keep].drop(columns="_split_order").reset_index(drop=True)
