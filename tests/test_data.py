"""Loaders in one process: balanced re-sampling, both data modes, augmentation and patches on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2_contingency, chisquare

from bonedist import BonedistError
from bonedist.data.augment import AugmentConfig, InputPipeline, gather_patches
from bonedist.data.manifest import load_manifest
from bonedist.data.pack import PackOptions, pack_dataset
from bonedist.data.sampling import SplitIndex, age_sex_groups, balance_weights, target_stats
from bonedist.data.source import DataConfig, choose_mode, open_split
from bonedist.data.synth import synth_dataset
from bonedist.models import create_model
from bonedist.spec import InputSpec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def skewed_shards(tmp_path_factory):
    """80 phantoms (RSNA-like skewed ages) at 48 px: enough draws for a chi-square test in seconds."""
    root = tmp_path_factory.mktemp("skewed")
    synth_dataset(root / "data", n=80, n_val=6, n_test=6, seed=4, size=96, workers=2, progress=False)
    pack_dataset(root / "data", root / "shards", PackOptions(size=48, samples_per_shard=9, workers=2,
                                                                progress=False))
    return root / "shards"


def _group_counts(shards, mode: str, epochs: int) -> tuple[np.ndarray, np.ndarray]:
    cfg = DataConfig(shards=str(shards), batch_size=8, mode=mode, workers=0, balanced=True, seed=1)
    batches = open_split(cfg, "train", CPU, progress=False, training=True)
    assert batches.mode == mode
    groups = []
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for batch in batches.training():
            groups.extend(age_sex_groups(batch["age"].numpy(), batch["male"].numpy().astype(bool)).tolist())
    index = batches.index
    present = np.unique(age_sex_groups(index.age, index.male))
    return np.array([groups.count(g) for g in present]), present


@pytest.mark.parametrize("mode", ["stream", "cache"])
def test_balanced_resampling_is_uniform_over_age_bins_and_sex(skewed_shards, mode):
    counts, present = _group_counts(skewed_shards, mode, epochs=25)
    assert counts.sum() >= 1500 and len(present) >= 8
    assert chisquare(counts).pvalue > 1e-3, counts  # uniform over the non-empty (bin, sex) groups
    # while the raw split is far from uniform
    index = SplitIndex.from_manifest(load_manifest(skewed_shards), "train")
    raw = np.array([(age_sex_groups(index.age, index.male) == g).sum() for g in present])
    assert chisquare(raw * (counts.sum() / raw.sum())).pvalue < 1e-3


def test_stream_and_cache_draw_the_same_distribution(skewed_shards):
    stream, _ = _group_counts(skewed_shards, "stream", epochs=15)
    cache, _ = _group_counts(skewed_shards, "cache", epochs=15)
    assert chi2_contingency(np.stack([stream, cache])).pvalue > 1e-3


def test_weights_and_target_stats():
    age = np.array([10.0, 12.0, 100.0, 100.0, 100.0, 200.0])
    male = np.array([True, True, False, False, False, True])
    w = balance_weights(age, male)
    assert w.mean() == pytest.approx(1.0)
    groups = age_sex_groups(age, male)
    per_group = {g: w[groups == g].sum() for g in np.unique(groups)}
    assert np.allclose(list(per_group.values()), 2.0)  # 6 samples / 3 groups each
    mu, sigma = target_stats(age, w)
    assert mu == pytest.approx((11 + 100 + 200) / 3)  # the mean of the group means
    assert sigma > 0


def test_cache_and_stream_evaluate_the_same_samples(skewed_shards):
    results = {}
    for mode in ("stream", "cache"):
        cfg = DataConfig(shards=str(skewed_shards), eval_batch_size=4, mode=mode, workers=2)
        rows = {}
        for batch in open_split(cfg, "validation", CPU).evaluation():
            for i, image in zip(batch["index"].tolist(), batch["image"]):
                rows[i] = image.double().sum().item()
        results[mode] = rows
    assert results["stream"] == results["cache"] and sorted(results["cache"]) == list(range(6))


def test_auto_mode_caches_when_it_fits_and_says_why(skewed_shards):
    manifest = load_manifest(skewed_shards)
    index = SplitIndex.from_manifest(manifest, "train")
    mode, reason = choose_mode(DataConfig(shards=str(skewed_shards)), index, 48, CPU)
    assert mode == "cache" and "fits" in reason
    mode, reason = choose_mode(DataConfig(shards=str(skewed_shards), cache_share=1e-9), index, 48, CPU)
    assert mode == "stream" and "exceeds" in reason


def _uint8_batch(b=4, size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 1, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", ["inception_v3", "xception", "agcnn"])
def test_augmentation_keeps_shape_dtype_range_and_is_reproducible(name):
    spec = create_model(name, {"image_size": 96}).spec
    images = _uint8_batch()
    pipe = InputPipeline(spec, AugmentConfig(), seed=3)
    x = pipe.train(images, step=5)
    assert x.shape == (4, spec.channels, 96, 96) and x.dtype == torch.float32
    lo = min((0 - m) / s for m, s in zip(spec.mean, spec.std))
    hi = max((1 - m) / s for m, s in zip(spec.mean, spec.std))
    assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5
    assert torch.equal(x, pipe.train(images, step=5))  # same seed and step: same augmentation
    assert not torch.equal(x, pipe.train(images, step=6))
    assert not torch.equal(x, pipe.eval(images))


def test_augmentation_is_the_identity_at_zero_ranges():
    spec = InputSpec(image_size=96, input_size=96, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    images = _uint8_batch()
    x = InputPipeline(spec, AugmentConfig.off(), seed=0).train(images, step=1)
    assert torch.equal(x, InputPipeline(spec).eval(images))
    assert torch.allclose(x[:, 0], images[:, 0].float() / 127.5 - 1.0)  # [0, 255] -> [-1, 1]


def test_progressive_resizing_downsamples_the_augmented_image_and_refuses_patches():
    """--low-res: the same augmentation as at full size, then an antialiased downsampling to the low side."""
    spec = InputSpec(image_size=96, input_size=96, channels=1, mean=(0.5,), std=(0.5,))
    images, pipe = _uint8_batch(), InputPipeline(spec, AugmentConfig(), seed=3)
    full, low = pipe.train(images, step=5), pipe.train(images, step=5, size=48)
    assert low.shape == (4, 1, 48, 48) and torch.equal(pipe.train(images, step=5, size=96), full)
    expected = F.interpolate(full, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(low, expected, atol=1e-5)  # normalising commutes with the resampling's weighted means
    patches = InputSpec(image_size=96, input_size=48, channels=1, mean=(0.5,), std=(0.5,), num_patches=4)
    with pytest.raises(BonedistError, match="--low-res is for whole-image models"):
        InputPipeline(patches).train(images, step=1, size=32)


def test_resize_to_the_model_input_size():
    spec = InputSpec(image_size=64, input_size=64, channels=1, mean=(0.5,), std=(0.5,))
    assert InputPipeline(spec).eval(_uint8_batch(size=96)).shape == (4, 1, 64, 64)


@pytest.mark.parametrize("k, p, grid", [(1, 500, 1), (3, 224, 3), (9, 128, 4), (36, 64, 8), (150, 32, 16)])
def test_patch_shapes_for_every_table5_setting(k, p, grid):
    model = create_model("resnet50_patch", {"image_size": 500, "patch_size": p, "num_patches": k})
    pipe = InputPipeline(model.spec, AugmentConfig(), seed=0)
    images = _uint8_batch(b=2, size=500)
    assert pipe.train(images, step=0).shape == (2 * k, 3, p, p)
    assert pipe.eval_repeats == grid * grid
    assert pipe.eval(images).shape == (2 * grid * grid, 3, p, p)


def test_gather_patches_matches_slicing():
    images = torch.arange(2 * 1 * 10 * 10, dtype=torch.float32).view(2, 1, 10, 10)
    ys, xs = torch.tensor([[0, 3], [5, 1]]), torch.tensor([[2, 0], [4, 6]])
    patches = gather_patches(images, ys, xs, 4)
    for b in range(2):
        for k in range(2):
            y, x = ys[b, k].item(), xs[b, k].item()
            assert torch.equal(patches[b * 2 + k, 0], images[b, 0, y : y + 4, x : x + 4])


def test_subset_batches_are_the_same_batches_whatever_the_world(skewed_shards):
    """Recalibration statistics are computed batch by batch and summed over ranks: one process and two must see the
    same batches (the 1-vs-2-process parity test depends on it), from the decoded sample or from the cache."""
    manifest = load_manifest(skewed_shards)

    def batches(world: int, mode: str = "stream", **kw) -> list[tuple[float, ...]]:
        cfg = DataConfig(shards=str(skewed_shards), eval_batch_size=8, workers=0, mode=mode)
        out = []
        for rank in range(world):
            split = open_split(cfg, "train", CPU, rank, world, manifest, progress=False)
            for batch in split.subset(60, seed=3, **kw):
                out.append(tuple(sorted(batch["age"].tolist())))
        return sorted(out)

    one = batches(1)
    assert len(one) == 7 and all(len(b) == 8 for b in one)  # 60 radiographs: 7 full batches of 8
    assert batches(2) == one == batches(3) == batches(2, mode="cache")
    assert len(batches(2, equal=True)) == 6  # SyncBatchNorm: as many batches on every rank
