"""Training tasks: each model kind brings its loss, so the training loop stays model-agnostic."""

from __future__ import annotations

import torch
import torch.nn.functional as F

AGCNN_WEIGHTS = {"global": 0.8, "local": 0.1, "fusion": 0.1}  # the paper's convex combination


def regression_loss(output: dict[str, torch.Tensor], target: torch.Tensor, kind: str = "mse",
                    huber_delta: float = 1.0, weights: dict | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss on z for single-output models; returns the loss and its parts (detached) for logging."""
    loss = _pointwise(output["pred"].float(), target.float(), kind, huber_delta)
    return loss, {"loss": loss.detach()}


def agcnn_loss(output: dict[str, torch.Tensor], target: torch.Tensor, kind: str = "mse",
               huber_delta: float = 1.0, weights: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.8·L_global + 0.1·L_local + 0.1·L_fusion. Whether the Fusion term reaches the branches is the model's
    ``fusion_grad`` choice (isolated: paper, joint: Guan et al.). Staged training passes one branch's weight."""
    weights = weights or AGCNN_WEIGHTS
    parts = {name: _pointwise(output[name].float(), target.float(), kind, huber_delta) for name in weights}
    loss = sum(weights[name] * parts[name] for name in weights)
    return loss, {"loss": loss.detach(), **{f"loss_{name}": value.detach() for name, value in parts.items()}}


def _pointwise(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_delta: float) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "huber":
        return F.huber_loss(pred, target, delta=huber_delta)
    raise ValueError(f"loss must be mse, l1 or huber, got {kind!r}")


def task_loss(task: str):
    return {"regression": regression_loss, "agcnn": agcnn_loss}[task]
