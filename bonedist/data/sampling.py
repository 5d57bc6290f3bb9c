"""Balanced re-sampling (paper IV): draw so that bone age (bins) x sex is uniform, with replacement.

The same per-sample weights drive both data modes: the stream repeats each sample Poisson(w) times, the device
cache draws ``multinomial(w)``; either way every (age bin, sex) group is equally likely. The z targets use the mean
and standard deviation of this re-sampled distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bonedist import BonedistError
from bonedist.data.layouts import OLDEST_RSNA_AGE


@dataclass(frozen=True)
class SplitIndex:
    """Every sample of a split in manifest order: key, bone age (NaN when unknown), male, shard, position."""

    keys: list[str]
    age: np.ndarray
    male: np.ndarray
    shard_names: list[str]
    shard_counts: list[int]

    def __len__(self) -> int:
        return len(self.keys)

    def shard_keys(self) -> list[list[str]]:
        """The keys of each shard, in manifest order."""
        out, start = [], 0
        for count in self.shard_counts:
            out.append(self.keys[start:start + count])
            start += count
        return out

    @classmethod
    def from_manifest(cls, manifest: dict, split: str) -> SplitIndex:
        if split not in manifest["splits"]:
            raise BonedistError(f"split {split!r} is not in the pack (it has {', '.join(manifest['splits'])})")
        shards = manifest["splits"][split]["shards"]
        if shards and "samples" not in shards[0]:
            raise BonedistError("this pack predates per-sample manifest entries; re-run `bonedist pack`")
        samples = [s for shard in shards for s in shard["samples"]]
        return cls(keys=[s[0] for s in samples],
                   age=np.array([np.nan if s[1] is None else s[1] for s in samples], dtype=np.float64),
                   male=np.array([bool(s[2]) for s in samples]),
                   shard_names=[s["name"] for s in shards], shard_counts=[s["count"] for s in shards])


AGE_BINS = 10  # balanced re-sampling: equal age bins ...
BINNED_AGE = OLDEST_RSNA_AGE  # ... over 0-228 months (older ones fall in the last bin)


def mix_seed(*parts: int) -> int:
    """One seed from several integers (run seed, epoch, rank, step, ...): the same in every process."""
    return hash(tuple(int(p) for p in parts)) & 0x7FFF_FFFF_FFFF


def age_sex_groups(age: np.ndarray, male: np.ndarray, n_bins: int = AGE_BINS,
                   max_age: float = BINNED_AGE) -> np.ndarray:
    """Group id per sample: age bin (``n_bins`` equal bins over 0-``max_age``) x sex."""
    bins = np.clip(np.floor(age / (max_age / n_bins)), 0, n_bins - 1).astype(np.int64)
    return bins * 2 + male.astype(np.int64)


def balance_weights(age: np.ndarray, male: np.ndarray, n_bins: int = AGE_BINS,
                    max_age: float = BINNED_AGE) -> np.ndarray:
    """Per-sample weights, mean 1, that make every non-empty (age bin, sex) group equally likely."""
    if np.isnan(age).any():
        raise BonedistError("balanced re-sampling needs a bone age for every training sample")
    groups = age_sex_groups(age, male, n_bins, max_age)
    counts = np.bincount(groups, minlength=2 * n_bins)
    n_groups = int((counts > 0).sum())
    return (len(age) / n_groups) / counts[groups]


def target_stats(age: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """Mean and standard deviation of the (re-sampled) age distribution: z = (age - mu) / sigma."""
    weights = np.ones_like(age) if weights is None else weights
    mu = float(np.average(age, weights=weights))
    sigma = float(np.sqrt(np.average((age - mu) ** 2, weights=weights)))
    return mu, max(sigma, 1e-6)
