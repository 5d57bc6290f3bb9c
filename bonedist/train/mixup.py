"""C-Mixup for regression (Yao et al., NeurIPS 2022): mix each training radiograph with a partner of similar age.

Plain mixup blends two random images and their labels; for regression that invents implausible pairs (a 2-year-old's
hand over a 17-year-old's, labelled 9.5 years). C-Mixup draws each sample's partner with probability proportional to
a Gaussian kernel of the label distance, ``exp(-(y_i - y_j)^2 / (2 h^2))``, so mixed samples stay near the label
manifold. Here the partner is drawn from the same batch (the paper samples from the whole set; a training batch of
dozens of radiographs spans the ages), among radiographs of the same sex (bone age differs by sex, and a model with a
sex input gets one sex per input), never the sample itself while another candidate exists. Images, z targets and a
distilled run's teacher targets are mixed with one ``lam ~ Beta(alpha, alpha)`` per sample.

Sampling is seeded from (run seed, rank, step), as augmentation is, so a resumed run mixes the same pairs.
"""

from __future__ import annotations

import torch

from bonedist.data.augment import ModelBatch
from bonedist.data.sampling import mix_seed

MIXUP_STREAM = 0x6D6978  # separates mixup's seeds from augmentation's, which use (seed, rank, step)


def partners(target: torch.Tensor, male: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """For each sample, the index of its partner: drawn (from torch's global generator, on the CPU) with weight
    ``exp(-d^2 / 2h^2)`` (``d``: target distance, ``h``: ``bandwidth``, both in z) among samples of the same sex,
    itself only when it is alone."""
    t = target.detach().float().cpu()
    distance = t[:, None] - t[None, :]
    same = male.cpu()[:, None] == male.cpu()[None, :]
    alone = same.sum(dim=1, keepdim=True) == 1
    allowed = same & (~torch.eye(len(t), dtype=torch.bool) | alone)
    # the kernel in log space, less each row's largest: the same ratios, and the nearest allowed age keeps weight 1
    # however far beyond the bandwidth it is, so no row underflows to all zeros
    logit = torch.where(allowed, -0.5 * (distance / bandwidth) ** 2, torch.full_like(distance, -torch.inf))
    weight = torch.exp(logit - logit.max(dim=1, keepdim=True).values)
    return torch.multinomial(weight, 1).squeeze(1)


def c_mixup(inputs: ModelBatch, alpha: float, bandwidth: float, seed: int, rank: int, step: int,
            teacher: torch.Tensor | None = None) -> tuple[ModelBatch, torch.Tensor | None]:
    """``inputs`` (whole-image models: one input per radiograph) mixed with C-Mixup partners for training ``step``;
    ``teacher``: a distilled run's z targets, mixed alike."""
    if inputs.repeats != 1:
        raise ValueError("C-Mixup mixes whole radiographs: one model input per radiograph")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, rank, step, MIXUP_STREAM))
        index = partners(inputs.target, inputs.male, bandwidth)
        lam = torch.distributions.Beta(alpha, alpha).sample((len(index),))
    device = inputs.target.device
    index, lam = index.to(device), lam.to(device)
    image = inputs.image
    weight = lam.view(-1, 1, 1, 1).to(image.dtype)
    mixed = image * weight + image[index] * (1 - weight)
    if image.is_contiguous(memory_format=torch.channels_last):
        mixed = mixed.contiguous(memory_format=torch.channels_last)
    target = lam * inputs.target + (1 - lam) * inputs.target[index]
    taught = lam * teacher + (1 - lam) * teacher[index] if teacher is not None else None
    return ModelBatch(mixed, inputs.male, target, inputs.repeats), taught
