"""Validation of the evaluated weights (the EMA copy when EMA is on): BatchNorm statistics recomputed and output
offsets refit on a fixed sample of training radiographs, then exact metrics over the whole validation split."""

from __future__ import annotations

import numpy as np

from bonedist.inference import Predictor, gather_predictions, predict_batches
from bonedist.train.batchnorm import recalibrate_batchnorm, training_norm_names


def fit_calibration(pred_z: np.ndarray, true_z: np.ndarray, kind: str) -> tuple[float, float]:
    """(slope, intercept) mapping predictions onto truth, in z: ``offset`` only shifts (slope 1), so the mean error
    is zero; ``linear`` (Deeplasia's) is the least-squares line of truth on prediction."""
    if kind == "linear" and len(pred_z) > 2 and np.std(pred_z) > 1e-6:
        slope, intercept = np.polyfit(pred_z, true_z, 1)
        return float(slope), float(intercept)
    return 1.0, float(np.mean(true_z - pred_z)) if len(pred_z) else 0.0


def calibrate(z, line: tuple[float, float] | list[float]):
    return line[0] * z + line[1]


class Validation:
    """``run()``: the validation metrics of the trainer's evaluated model; ``calibration``: each output's z line
    (slope, intercept), refit by the last recalibration (kept in ``best/`` for ``evaluate`` and ``predict``)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.calibration: dict[str, tuple[float, float]] = {}

    def predictor(self) -> Predictor:
        """The evaluated model as validation (and recalibration) runs it."""
        t = self.trainer
        return Predictor(t.evaluated_model, t.pipe, t.cfg.tta_flip, t.cfg.patch_aggregate, t.accelerator.autocast)

    def recalibrate(self) -> None:
        """Before a validation, on ``recalibrate`` clean training radiographs (the same batches every time, whatever
        the number of ranks), seen as evaluation sees them: the evaluated model's BatchNorm statistics are
        recomputed, then each output's calibration is refit on them: its offset, so that its mean error is zero
        (``--calibration offset``), or a line (``linear``).

        Training never fixes that offset for the evaluation-mode function: batch statistics in training, population
        statistics after; a median under L1. On real radiographs which statistics are used moved the mean error of
        the same weights by months, on the training radiographs themselves (``docs/results.md``, "What was wrong on
        real radiographs"). The refit uses training radiographs only.
        """
        t = self.trainer
        if t.recal_data is None:
            return
        inputs = ((b.image, b.male) for b in map(t.pipe.model_batch, t.recal_data))
        recalibrate_batchnorm(t.evaluated_model, training_norm_names(t.unwrapped), inputs, t.world,
                              t.accelerator.autocast)
        local = predict_batches(self.predictor(), t.recal_data)
        keys = ["pred", *t.task.branches]
        if t.world > 1:  # every rank fits the same line on the whole sample
            from accelerate.utils import gather_object

            parts = [p for p in gather_object([local]) if p]
            local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
        z_true = (local["age"] - t.scale.mu) / t.scale.sigma if local else np.zeros(0)
        self.calibration = {k: fit_calibration(local[k] if local else np.zeros(0), z_true, t.cfg.calibration)
                            for k in keys}

    def run(self) -> dict:
        """Exact metrics over the whole validation split (every sample once, across all ranks): MSE on z and MAE per
        output, the loss's own selection metric, the bias and the predict-the-training-mean baseline."""
        t = self.trainer
        self.recalibrate()
        preds = gather_predictions(predict_batches(self.predictor(), t.val_data.evaluation()), len(t.val_data.index))
        sigma = t.scale.sigma
        z_true = (preds["age"] - t.scale.mu) / sigma
        out = {"val_count": int(len(preds["index"]))}
        for name in ("pred", *t.task.branches):
            if name not in preds:
                continue
            pred = calibrate(preds[name], self.calibration.get(name, (1.0, 0.0)))
            suffix = "" if name == "pred" else f"_{name}"
            out[f"val_loss{suffix}"] = float(np.mean((pred - z_true) ** 2))
            out[f"val_mae_months{suffix}"] = float(np.mean(np.abs(pred - z_true)) * sigma)
            out.setdefault(f"val_{t.loss_fn.metric}{suffix}", t.loss_fn.validation_value(pred, z_true, sigma))
            if name == "pred":
                out["val_bias_months"] = float(np.mean(pred - z_true) * sigma)
        out["val_baseline_mae_months"] = float(np.mean(np.abs(preds["age"] - t.train_mean)))  # predict-the-mean
        return out
