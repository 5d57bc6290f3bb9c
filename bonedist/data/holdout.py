"""Held-out splits carved from the training table, stratified by sex and bone age (``bonedist pack --holdout``).

Kaggle's bone-age download has labels for the training set only, and many collections come as one table: a model
still needs a validation split to select checkpoints and fit ensembles, and ideally a test split it is never tuned
on. ``--holdout validation:600,test:1200`` moves that many training records (or a fraction: ``validation:0.05``)
into those splits. The selection is systematic over the records sorted by sex and age (ties broken by a seeded
shuffle), so each held-out split has the training split's sex ratio and age distribution, and it is deterministic:
the same table, counts and seed always hold out the same ids.
"""

from __future__ import annotations

import numpy as np

from bonedist import BonedistError
from bonedist.data.options import HOLDOUT_SPLITS, parse_holdout  # noqa: F401  (parse_holdout re-exported)


def carve_holdout(records: list[dict], holdout: dict[str, float], seed: int = 0) -> dict[str, int]:
    """Move stratified training records into the ``holdout`` splits, in place; returns the count per split.

    Raises:
        BonedistError: a holdout split already exists in the data, or the holdout leaves no training records.
    """
    if not holdout:
        return {}
    existing = sorted({r["split"] for r in records} & set(holdout))
    if existing:
        raise BonedistError(f"--holdout {', '.join(existing)}: the data already has a {' and a '.join(existing)} "
                            f"split; drop it from --holdout (or pack with --splits train to ignore the official one)")
    train = [r for r in records if r["split"] == "train" and r["boneage_months"] is not None]
    counts = {name: int(round(v * len(train))) if v < 1 else int(v) for name, v in holdout.items()}
    total = sum(counts.values())
    if total < 1 or total >= len(train):
        raise BonedistError(f"--holdout asks for {total} of {len(train)} labelled training radiographs; "
                            f"it must leave some for training")
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(len(train))
    order = sorted(range(len(train)), key=lambda i: (bool(train[i]["male"]), train[i]["boneage_months"],
                                                      tiebreak[i]))
    picked = _systematic(len(train), total, rng)
    chosen = [order[i] for i in picked]  # still in sex-then-age order: a stratified sample
    names = list(counts)
    labels = np.full(total, names[-1], dtype=object)
    if len(names) == 2:  # the first split gets an evenly spread share of the chosen, the second the rest
        labels[_systematic(total, counts[names[0]], rng)] = names[0]
    for i, label in zip(chosen, labels):
        train[i]["split"] = str(label)
    return counts


def _systematic(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` evenly spaced positions out of ``n``, with a random start."""
    offset = rng.random() * n / k
    return np.minimum((offset + np.arange(k) * (n / k)).astype(np.int64), n - 1)
