"""What a model's outputs mean for training, checkpoint selection, evaluation and reporting.

Every model's ``forward(image, male)`` returns ``{"pred": (B,)}`` in z units, plus named extras. Its task says what
else there is, so that the engine, ``evaluate``, the report and ``predict`` never ask which model they hold (timm's
task objects): a plain regressor, or a model with several predicting branches that may train in stages (the model
then has ``set_stage``) and may report attention crops (``boxes``, ``masks``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where models are built, not where they are described
    import torch
    from torch import nn

LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
# an age-distribution head's soft label's standard deviation, in z (``--age-sigma``): a fifth of the ages' spread,
# the order of the disagreement between two readers of one radiograph
LABEL_SIGMA_Z = 0.2


@dataclass(frozen=True)
class Task:
    """A regressor's task, and the base of branched ones.

    Attributes:
        branches: extra predictions in the output (z units), each reported as its own row ``MODEL_BRANCH``.
        weights: each branch's share of the training loss.
        main_branch: the branch that ``pred`` is; the model is then reported under that branch's row only.
        stages: branches that can be trained one after another (``--stages``), in this order.
        label_sigma_z: the width of an age-distribution head's soft labels (``--age-sigma``), in z.
        attention: the output holds attention ``boxes`` (B, 4) and ``masks`` (B, 1, H, W) to draw and log.
        compilable: ``torch.compile`` can trace the forward pass.
    """

    branches: tuple[str, ...] = ()
    weights: dict = field(default_factory=dict)
    main_branch: str | None = None
    stages: tuple[str, ...] = ()
    label_sigma_z: float = LABEL_SIGMA_Z
    attention: bool = False
    compilable: bool = True

    def loss(self, output: dict[str, torch.Tensor], target: torch.Tensor, loss_fn: LossFn,
             stage: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss on z (in fp32) and its parts (detached, for logging). In a stage only that branch's
        term counts. A model with an age-distribution head (``age_logits``) adds the divergence of its distribution
        from a soft label around the target (``bonedist.models.age_bins``), logged as ``loss_age_bins``."""
        if not self.branches:
            loss = loss_fn(output["pred"].float(), target.float())
            if "age_logits" not in output:
                return loss, {"loss": loss.detach()}
            from bonedist.models.age_bins import distribution_loss

            bins = distribution_loss(output["age_logits"], target, self.label_sigma_z)
            return loss + bins, {"loss": (loss + bins).detach(), "loss_age_bins": bins.detach()}
        weights = {stage: 1.0} if stage else self.weights
        parts = {name: loss_fn(output[name].float(), target.float()) for name in weights}
        loss = sum(weights[name] * parts[name] for name in weights)
        return loss, {"loss": loss.detach(), **{f"loss_{name}": value.detach() for name, value in parts.items()}}

    def best_metric(self, metric: str, stage: str | None = None) -> str:
        """The validation metric that picks ``best/``: the loss's own (``metric``), of the training stage's branch
        (else of the main branch) for a branched model."""
        if not self.branches:
            return f"val_{metric}"
        return f"val_{metric}_{stage or self.main_branch}"

    def enter_stage(self, model: nn.Module, stage: str | None) -> None:
        """A staged model trains (and runs, in training mode) only what ``stage`` needs."""
        if self.stages:
            model.set_stage(stage)

    def columns(self, name: str) -> dict[str, str]:
        """Prediction columns of evaluation (column → output key): the model, and each branch."""
        return {name: "pred", **{f"{name}_{branch}": branch for branch in self.branches}}

    def reported(self, name: str) -> list[str]:
        """Rows of the metrics tables: the model, or its branches when ``pred`` is one of them."""
        rows = [f"{name}_{branch}" for branch in self.branches]
        return rows if self.main_branch else [name, *rows]


REGRESSION = Task()
