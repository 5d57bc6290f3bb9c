"""How to pack, as typed options (``bonedist pack``'s flags are generated from them) and the constants they are
checked against. Light on purpose: the CLI reads it without importing OpenCV, pandas or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from bonedist import BonedistError
from bonedist.options import check_fields, option

SPLITS = ("train", "validation", "test")
HOLDOUT_SPLITS = ("validation", "test")
RESIZE_MODES = ("pad", "stretch")
# The largest image decoded (``--max-pixels``): RSNA's originals are 3-5 megapixels, the largest radiography detectors
# about 18 (43 x 43 cm at 100 um). 64 megapixels bounds a decode at ~0.5 GB per worker, whatever the files declare.
MAX_PIXELS = 64_000_000
CSV = "generic CSV (collections outside the official layouts)"


def parse_holdout(text: str | None) -> dict[str, float]:
    """``"validation:600,test:0.1"`` → ``{"validation": 600.0, "test": 0.1}`` (counts, or fractions below 1)."""
    if not text:
        return {}
    out: dict[str, float] = {}
    for item in text.split(","):
        name, _, amount = item.strip().partition(":")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if name not in HOLDOUT_SPLITS or name in out or value <= 0 or (value >= 1 and not value.is_integer()):
            raise BonedistError(f"--holdout {text!r}: expected validation:N and/or test:N, each N a count of "
                                f"radiographs or a fraction below 1 (e.g. validation:600,test:0.1)")
        out[name] = value
    return out


def parse_names(text: str) -> tuple[str, ...]:
    """``"train,test"`` → ``("train", "test")``."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parse_pixels(text: str) -> int:
    """``64e6`` or ``64000000`` → 64000000."""
    return int(float(text))


@dataclass
class PackOptions:
    """How to pack. Every field except ``workers`` and ``progress`` changes the shards' bytes."""

    size: int = option(500, "square output side in pixels", flag="--image-size", aliases=("--size",),
                       minimum=32, maximum=4096)
    resize: str = option("pad", "pad: keep the aspect ratio, letterbox; stretch: distort to a square (the paper)",
                         RESIZE_MODES)
    samples_per_shard: int = option(500, "radiographs per shard", minimum=1)
    workers: int = option(0, "processes (0: all cores)", minimum=0)
    strict: bool = option(False, "fail (and write no manifest) if anything is skipped")
    splits: tuple[str, ...] = option(SPLITS, "comma-separated splits to pack", parse=parse_names,
                                     metavar="train,validation,test")
    progress: bool = option(True, "a progress bar (--quiet: none)", cli=False)
    holdout: dict = option({}, "carve held-out splits from the training table, stratified by sex and age (N a count "
                               "or a fraction below 1), for data that comes without them (Kaggle's training set)",
                           parse=parse_holdout, metavar="validation:N[,test:M]")
    holdout_seed: int = option(0, "which radiographs --holdout picks")
    max_pixels: int = option(MAX_PIXELS, "skip images whose header declares more pixels than this, before decoding "
                                         "them (every radiography detector fits; a decompression bomb does not)",
                             minimum=1, parse=parse_pixels)

    def __post_init__(self):
        self.splits = tuple(self.splits)
        check_fields(self)
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise BonedistError(f"--splits: unknown {sorted(unknown)}; choose from {', '.join(SPLITS)}")
        if self.holdout and "train" not in self.splits:
            raise BonedistError("--holdout carves from the train split, which --splits leaves out")


@dataclass
class GenericCSV:
    """Column mapping for a collection outside the official layouts (``bonedist pack --csv``)."""

    csv: Path = option(None, "table of images (path relative to ROOT or absolute)", group=CSV, parse=Path)
    id_col: str = option("id", "image id column", group=CSV)
    age_col: str | None = option("boneage", "bone age column; '' for unlabeled data", group=CSV)
    sex_col: str = option("male", "sex column: True/False, TRUE/FALSE, M/F, male/female, 1/0", group=CSV)
    path_col: str | None = option(None, "image path column (relative to ROOT); else --image-dir", group=CSV)
    image_dir: str | None = option(None, "folder under ROOT searched for <id>.png/.jpg", group=CSV)
    split: str = option("train", "split of every row", SPLITS, group=CSV)
    split_col: str | None = option(None, "column naming each row's split", group=CSV)
    age_unit: str = option("months", "unit of the age column", ("months", "years"), group=CSV)

    def __post_init__(self):
        self.age_col = self.age_col or None  # '' on the command line: unlabeled data


_TRUE = {"true", "t", "1", "1.0", "m", "male", "yes", "y"}
_FALSE = {"false", "0", "0.0", "f", "female", "no", "n"}  # "f": False and Female both mean not male


def parse_male(value) -> bool | None:
    """True/False, TRUE/FALSE, M/F, male/female, 1/0 → is male; None when unrecognised."""
    if isinstance(value, bool):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None
