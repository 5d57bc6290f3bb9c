"""Synthetic phantoms: deterministic, official layouts, and an age signal that grows monotonically."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bonedist.data.synth import render_phantom, sample_ages, synth_dataset


def _bone_pixels(image: np.ndarray) -> int:
    return int((image > 150).sum())


def test_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth_dataset(a, n=6, n_val=2, n_test=2, seed=5, size=128, workers=1, progress=False)
    synth_dataset(b, n=6, n_val=2, n_test=2, seed=5, size=128, workers=2, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix != ".xlsx")
    assert len(files) == 6 + 2 + 1 + 2 + 1  # pngs, 2 zips, 2 csv
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    test = pd.read_excel(a / "Bone age ground truth.xlsx")
    assert list(test.columns) == ["Case ID", "Sex", "Ground truth bone age (months)"]
    assert set(test["Sex"]) <= {"M", "F"}


def test_anatomy_matures_monotonically_and_girls_earlier():
    # With one seed the nuisances are identical, so only the anatomy differs between ages.
    areas = [_bone_pixels(render_phantom(age, True, 384, seed=11)) for age in (6, 36, 72, 120, 168, 220)]
    assert all(b > a for a, b in zip(areas, areas[1:])), areas
    boy, girl = render_phantom(100, True, 384, seed=3), render_phantom(100, False, 384, seed=3)
    assert _bone_pixels(girl) > _bone_pixels(boy)


def test_markers_are_bright_and_ages_skew_like_rsna():
    image = render_phantom(120, True, 512, seed=0)
    assert image.dtype == np.uint8 and image.shape == (512, 420)
    assert image.max() >= 240  # the lead marker / initials box
    ages = sample_ages(np.random.default_rng(0), 20000)
    assert 1 <= ages.min() and ages.max() <= 228
    assert 120 < ages.mean() < 134 and 35 < ages.std() < 47 and np.median(ages) > ages.mean()
