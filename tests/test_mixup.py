"""C-Mixup (bonedist.train.mixup): partners of the same sex and similar age, reproducible per step."""

from __future__ import annotations

import pytest
import torch

from bonedist.data.augment import ModelBatch
from bonedist.train.mixup import c_mixup, partners


def _batch(n: int = 64, seed: int = 0) -> ModelBatch:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(n, generator=g)
    male = torch.rand(n, generator=g) < 0.5
    return ModelBatch(torch.rand(n, 1, 8, 8, generator=g), male, target, 1)


def test_partners_share_the_sex_are_near_in_age_and_never_the_sample_itself():
    batch = _batch()
    torch.manual_seed(0)
    index = torch.stack([partners(batch.target, batch.male, 0.2) for _ in range(50)])  # (draws, n)
    assert torch.equal(batch.male[index], batch.male.expand_as(index))
    assert not (index == torch.arange(len(batch.target))).any()
    near = (batch.target[index] - batch.target).abs().mean()
    uniform = (batch.target[:, None] - batch.target[None, :]).abs().mean()
    assert near < 0.3 * uniform  # the kernel, not a uniform draw: partners are much nearer in age than at random
    wide = torch.stack([partners(batch.target, batch.male, 100.0) for _ in range(50)])
    assert (batch.target[wide] - batch.target).abs().mean() > 3 * near  # a wide kernel is close to plain mixup


def test_a_lone_sex_or_ages_far_beyond_the_kernel_still_get_a_partner():
    target = torch.tensor([-3.0, 0.0, 2.5, 1.0])
    male = torch.tensor([True, True, True, False])  # one girl: she pairs with herself
    index = partners(target, male, 1e-4)  # exp(-d^2/2h^2) underflows to 0 for every pair of different ages
    assert index.tolist() == [1, 2, 1, 3]  # each boy with the boy nearest in age


def test_mixing_is_a_convex_blend_seeded_by_step_and_leaves_the_global_generator_alone():
    batch = _batch()
    teacher = batch.target + 0.1
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    mixed, taught = c_mixup(batch, 0.4, 0.2, seed=7, rank=0, step=5, teacher=teacher)
    assert torch.equal(torch.rand(3), before)  # augmentation's own draws are not shifted by mixup's
    again, _ = c_mixup(batch, 0.4, 0.2, seed=7, rank=0, step=5, teacher=teacher)
    other, _ = c_mixup(batch, 0.4, 0.2, seed=7, rank=0, step=6, teacher=teacher)
    assert torch.equal(mixed.image, again.image) and torch.equal(mixed.target, again.target)  # a resume's step
    assert not torch.equal(mixed.target, other.target)
    assert torch.equal(mixed.male, batch.male) and mixed.repeats == 1
    # each mixed image is a blend of the sample and one same-sex partner; the target and teacher use the same weight
    for i in range(len(batch.target)):
        for j in (batch.male == batch.male[i]).nonzero().squeeze(1).tolist():
            d = (batch.image[i] - batch.image[j]).flatten()
            if j == i or not d.any():
                continue
            w = float(((mixed.image[i] - batch.image[j]).flatten() @ d) / (d @ d))  # the blend's weight, fitted
            if -1e-4 <= w <= 1 + 1e-4 and torch.allclose(w * batch.image[i] + (1 - w) * batch.image[j],
                                                          mixed.image[i], atol=1e-5):
                for got, source in ((mixed.target, batch.target), (taught, teacher)):
                    assert float(got[i]) == pytest.approx(float(w * source[i] + (1 - w) * source[j]), abs=1e-4)
                break
        else:
            pytest.fail(f"sample {i}: no same-sex partner explains its mixed image")


def test_patch_inputs_are_refused():
    batch = _batch()
    with pytest.raises(ValueError, match="whole radiographs"):
        c_mixup(ModelBatch(batch.image, batch.male, batch.target, 4), 0.4, 0.2, 0, 0, 0)
