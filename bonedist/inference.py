"""Exact distributed prediction over a split: every sample once, gathered in manifest order on every rank.

A ``Predictor`` is one trained model as evaluation uses it (its input pipeline, test-time flip, patch aggregation
and precision); ``predict_batches`` runs one or several predictors over one pass of the batches, so that a split is
read and decoded once however many models are evaluated on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import gather_object

from bonedist.data.augment import InputPipeline


@dataclass
class Predictor:
    """One z prediction per radiograph (``pred`` and each branch of the model's task) for a uint8 batch."""

    model: torch.nn.Module
    pipe: InputPipeline
    flip: bool = False
    aggregate: str = "mean"
    autocast: Callable | None = None  # a context manager factory (Accelerate's ``autocast``), None: fp32
    views: tuple[tuple[float, float], ...] = ((0.0, 1.0),)  # test-time (degrees, zoom) views (``spec.tta_views``)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        """The mean over the test-time views (each with its mirror when ``flip``), in the order the serving
        runtime sums them."""
        total, count = None, 0
        for view in self.views:
            for flip in (False, True) if self.flip else (False,):
                outputs = self._forward(batch, flip=flip, view=view)
                total = outputs if total is None else {k: total[k] + v for k, v in outputs.items()}
                count += 1
        return total if count == 1 else {k: v / count for k, v in total.items()}

    def _forward(self, batch: dict, flip: bool, view: tuple[float, float] = (0.0, 1.0)) -> dict[str, torch.Tensor]:
        inputs = self.pipe.model_batch(batch, flip=flip, view=view)
        with self.autocast() if self.autocast else nullcontext():
            out = self.model(inputs.image, inputs.male)
        result = {"pred": out["pred"].float(), **{k: out[k].float() for k in self.model.task.branches}}
        if inputs.repeats > 1:  # (B*G,) → (B, G) → one value per radiograph
            grouped = {k: v.view(-1, inputs.repeats) for k, v in result.items()}
            result = {k: v.median(dim=1).values if self.aggregate == "median" else v.mean(dim=1)
                      for k, v in grouped.items()}
        return result


def predict_batches(predictors: Predictor | dict[str, Predictor], batches: Iterable[dict],
                    observe: Callable[[dict], None] | None = None) -> dict[str, np.ndarray]:
    """This rank's predictions in z units with ``index``, ``age``, ``male``, ``key`` of each radiograph.

    One predictor: its outputs as ``pred`` (and its branches); several (a dict): ``NAME/pred``, ``NAME/BRANCH``.
    ``observe`` sees every batch (e.g. to keep thumbnails) so the split need not be read again.
    """
    named = predictors if isinstance(predictors, dict) else {"": predictors}
    models = [p.model for p in named.values()]
    modes = [m.training for m in models]
    for model in models:
        model.eval()
    rows: dict[str, list] = {"index": [], "age": [], "male": [], "key": []}
    try:
        for batch in batches:
            for name, predictor in named.items():
                for key, value in predictor(batch).items():
                    rows.setdefault(f"{name}/{key}" if name else key, []).append(value.cpu().numpy())
            rows["index"].append(batch["index"].cpu().numpy())
            rows["age"].append(batch["age"].cpu().numpy())
            rows["male"].append(batch["male"].cpu().numpy())
            rows["key"].append(np.array(batch["key"], dtype=object))
            if observe is not None:
                observe(batch)
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    if not rows["index"]:
        return {}
    return {k: np.concatenate(v) for k, v in rows.items()}


def gather_predictions(local: dict[str, np.ndarray], total: int) -> dict[str, np.ndarray]:
    """All ranks' predictions in manifest order; checks that every position arrived exactly once."""
    parts = gather_object([local]) if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else [local]
    parts = [p for p in parts if p]
    if not parts:
        return {}
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(merged["index"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    if not np.array_equal(merged["index"], np.arange(total)):
        raise RuntimeError(f"evaluation covered {len(merged['index'])} positions, expected each of {total} once")
    return merged
