"""Knowledge distillation: a student trained on a teacher's predictions beside the labels.

The teacher is a table of predictions for the training radiographs, in months, keyed like the pack: the
``report/predictions.csv`` that ``bonedist evaluate --runs TEACHER --split train`` writes (an ensemble's column, or
one model's), or any CSV with an ``id`` (or ``key``) column of the pack's keys and a column of months. The
student's loss on each radiograph is

    (1 - w) * loss(pred, label) + w * loss(pred, teacher)

on z (the run's own normalisation), so that one model learns what the ensemble learned and keeps one model's
inference cost. The table is read once, checked (one line naming the file and what is wrong: a missing column, a
training radiograph without a prediction, a value that is not a finite age), and identified by its SHA-256 in
best/meta.json and every checkpoint, so that a resume on another teacher is refused like one on another pack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from bonedist import BonedistError
from bonedist.files import sha256_file

KEYS = ("id", "key")  # the radiograph's key: predictions.csv's id (the pack's key), or key
NOT_PREDICTIONS = (*KEYS, "sex", "male", "truth")  # predictions.csv's columns that are not a model's
MAX_AGE_MONTHS = 360.0  # far beyond the RSNA range (0-228): a larger value is not an age in months


@dataclass(frozen=True)
class Teacher:
    """A teacher's months for every training radiograph: ``months[key]``; ``identity`` goes into the run's meta."""

    path: str
    column: str
    sha256: str
    months: dict[str, float]

    @property
    def identity(self) -> dict:
        return {"path": self.path, "column": self.column, "sha256": self.sha256, "rows": len(self.months)}

    def z_targets(self, keys: list[str], scale, repeats: int, device) -> torch.Tensor:
        """The teacher's z targets of a batch (its ``key`` list), repeated like the labels (patch models)."""
        months = torch.tensor([self.months[k] for k in keys], dtype=torch.float64)
        return scale.z(months).repeat_interleave(repeats).to(device)


def default_column(columns: list[str], path: str) -> str:
    """An ensemble's column when the table has one (fitted before equal), else its only model's column."""
    for name in ("ensemble_fitted", "ensemble_equal"):
        if name in columns:
            return name
    models = [c for c in columns if c not in NOT_PREDICTIONS and not c.startswith("ensemble_")]
    if len(models) == 1:
        return models[0]
    predictions = [c for c in columns if c not in NOT_PREDICTIONS]
    raise BonedistError(f"--teacher {path}: name the teacher's column with --teacher-column (it has "
                        f"{', '.join(predictions) or 'no prediction column'})")


def load_teacher(path: str, column: str | None, keys: list[str]) -> Teacher:
    """The teacher table at ``path`` for the training ``keys``, checked: every key has one finite age in months."""
    import pandas as pd

    file = Path(path)
    try:
        table = pd.read_csv(file, dtype={k: str for k in KEYS})
    except FileNotFoundError:
        raise BonedistError(f"--teacher {path}: no such file (write one with `bonedist evaluate --runs TEACHER "
                            f"--split train`, its report/predictions.csv)") from None
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BonedistError(f"--teacher {path}: not a readable CSV ({first})") from None
    keyed = [k for k in KEYS if k in table.columns]
    if not keyed:
        raise BonedistError(f"--teacher {path}: no 'id' (or 'key') column naming the radiographs (columns: "
                            f"{', '.join(map(str, table.columns))})")
    ids = table[keyed[0]].astype(str)
    column = column or default_column([str(c) for c in table.columns], path)
    if column not in table.columns or column in NOT_PREDICTIONS:
        raise BonedistError(f"--teacher-column {column!r}: not a prediction column of {path} (columns: "
                            f"{', '.join(c for c in map(str, table.columns) if c not in NOT_PREDICTIONS)})")
    values = pd.to_numeric(table[column], errors="coerce")
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise BonedistError(f"--teacher {path}: key {duplicated.iloc[0]!r} appears more than once "
                            f"({duplicated.nunique()} keys repeated)")
    months = dict(zip(ids, values.astype(float)))
    missing = [k for k in keys if k not in months]
    if missing:
        raise BonedistError(f"--teacher {path}: {len(missing)} of the {len(keys)} training radiographs have no "
                            f"prediction (first: {missing[0]!r}); predict the pack's train split with the teacher "
                            f"(`bonedist evaluate --runs TEACHER --split train`)")
    wanted = set(keys)
    for row, key in enumerate(ids):  # rows of other radiographs are never read
        value = months[key]
        if key in wanted and not (math.isfinite(value) and 0.0 <= value <= MAX_AGE_MONTHS):
            raise BonedistError(f"--teacher {path}: row {row + 2} (key {key!r}), column {column!r}: "
                                f"{table[column].iloc[row]!r} is not an age in months (0-{MAX_AGE_MONTHS:g})")
    return Teacher(str(path), str(column), sha256_file(file), {k: v for k, v in months.items() if k in wanted})


def distill_loss(task, out: dict, target: torch.Tensor, teacher: torch.Tensor, loss_fn, stage: str | None,
                 weight: float) -> tuple[torch.Tensor, dict]:
    """The task's loss on the labels and on the teacher's predictions, mixed ``(1 - weight) : weight``; its parts
    (each branch's, for logging and the epoch sums) mixed alike, with the two terms as ``loss_label`` and
    ``loss_teacher``."""
    label, label_parts = task.loss(out, target, loss_fn, stage)
    taught, taught_parts = task.loss(out, teacher, loss_fn, stage)
    loss = (1.0 - weight) * label + weight * taught
    parts = {name: (1.0 - weight) * value + weight * taught_parts[name] for name, value in label_parts.items()}
    parts.update(loss=loss.detach(), loss_label=label.detach(), loss_teacher=taught.detach())
    return loss, parts
