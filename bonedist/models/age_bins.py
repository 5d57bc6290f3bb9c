"""An age-distribution head: the model predicts a distribution over age bins and its mean is the prediction
(``--age-bins N``, label distribution learning as in DLDL-v2, Gao et al. 2018).

The bins are fixed in z units (``SPAN_Z``: the training split's mean age +- 4 standard deviations, wider than 0-19
years on any RSNA split), so that a model's output means the same whatever data it is built for. Training adds to
the regression loss on the mean the Kullback-Leibler divergence from a Gaussian soft label around the target
(``--age-sigma`` wide, ``LABEL_SIGMA_Z`` by default; the model's task holds it) to the predicted distribution: every
bin gets a dense, ordered signal, and a radiograph's neighbours in age share what is learned. Evaluation, intervals,
distillation and export read the mean only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bonedist import BonedistError
from bonedist.models.task import LABEL_SIGMA_Z

SPAN_Z = (-4.0, 4.0)


def bin_centers(bins: int, device=None) -> torch.Tensor:
    """The ``bins`` bin centres (z units, fp32), evenly spaced over ``SPAN_Z``."""
    return torch.linspace(*SPAN_Z, bins, device=device, dtype=torch.float32)


class AgeBinsHead(nn.Module):
    """``layers`` to one logit per age bin → ``{"pred": mean age (z), "age_logits": (B, bins)}``."""

    def __init__(self, layers: nn.Module, bins: int):
        super().__init__()
        if bins < 2:
            raise BonedistError(f"--age-bins {bins}: an age distribution needs at least 2 bins (0: one age)")
        self.layers = layers
        self.register_buffer("centers", bin_centers(bins), persistent=False)  # derived from the bin count

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.layers(x)
        # softmax and the weighted sum in fp32: elementwise ops, which autocast leaves in the input's precision
        pred = (logits.float().softmax(dim=-1) * self.centers).sum(dim=-1)
        return {"pred": pred, "age_logits": logits}


def soft_labels(target: torch.Tensor, bins: int, sigma: float = LABEL_SIGMA_Z) -> torch.Tensor:
    """(B,) targets in z → (B, bins) Gaussian soft labels over the bins, ``sigma`` (z) wide, each row summing to 1."""
    centers = bin_centers(bins, target.device)
    return torch.softmax(-0.5 * ((centers - target.float().unsqueeze(-1)) / sigma) ** 2, dim=-1)


def distribution_loss(logits: torch.Tensor, target: torch.Tensor, sigma: float = LABEL_SIGMA_Z) -> torch.Tensor:
    """KL(soft label ``sigma`` wide || predicted distribution), averaged over the batch (0 when they agree)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(log_probs, soft_labels(target, logits.shape[-1], sigma), reduction="batchmean")
