"""Exact distributed prediction over a split: every sample once, gathered in manifest order on every rank."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from accelerate.utils import gather_object

from bonedist.data.augment import InputPipeline
from bonedist.data.source import EvalBatches


@torch.no_grad()
def predict_batches(model: torch.nn.Module, pipe: InputPipeline, batches: EvalBatches, autocast=None,
                    flip: bool = False, aggregate: str = "mean", channels_last: bool = False) -> dict[str, np.ndarray]:
    """This rank's predictions in z units: ``pred`` (and the task's branches), with ``index``, ``age``, ``male``.

    Patch models average (or take the median of) their overlapping grid per radiograph; ``flip`` averages with the
    horizontally flipped input (test-time augmentation).
    """
    was_training = model.training
    model.eval()
    rows: dict[str, list] = {"index": [], "age": [], "male": [], "key": []}
    for batch in batches:
        outputs = predict_radiographs(model, pipe, batch["image"], batch["male"], autocast, flip, aggregate,
                                      channels_last)
        for name, value in outputs.items():
            rows.setdefault(name, []).append(value.float().cpu().numpy())
        rows["index"].append(batch["index"].cpu().numpy())
        rows["age"].append(batch["age"].cpu().numpy())
        rows["male"].append(batch["male"].cpu().numpy())
        rows["key"].append(np.array(batch["key"], dtype=object))
    model.train(was_training)
    if not rows["index"]:
        return {}
    return {k: np.concatenate(v) for k, v in rows.items()}


def predict_radiographs(model, pipe, images, male, autocast=None, flip: bool = False, aggregate: str = "mean",
                        channels_last: bool = False) -> dict[str, torch.Tensor]:
    """One z prediction per radiograph (and branch) for a uint8 batch; ``flip`` averages with the mirror."""
    outputs = _forward(model, pipe, images, male, autocast, aggregate, channels_last)
    if flip:
        flipped = _forward(model, pipe, images.flip(-1), male, autocast, aggregate, channels_last)
        outputs = {k: (v + flipped[k]) / 2 for k, v in outputs.items()}
    return outputs


def _forward(model, pipe, images, male, autocast, aggregate, channels_last) -> dict[str, torch.Tensor]:
    x = pipe.eval(images)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    repeats = pipe.eval_repeats
    with autocast() if autocast else nullcontext():
        out = model(x, male.repeat_interleave(repeats))
    result = {"pred": out["pred"]}
    result.update({k: out[k] for k in model.task.branches})
    if repeats > 1:  # (B*G,) → (B, G) → one value per radiograph
        grouped = {k: v.float().view(-1, repeats) for k, v in result.items()}
        result = {k: v.median(dim=1).values if aggregate == "median" else v.mean(dim=1)
                  for k, v in grouped.items()}
    return result


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
