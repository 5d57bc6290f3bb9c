"""Validation of the evaluated weights (the EMA copy when EMA is on): BatchNorm statistics recomputed and output
offsets refit on a fixed sample of training radiographs, then exact metrics over the whole validation split."""

from __future__ import annotations

import numpy as np

from bonedist.inference import Predictor, gather_predictions, predict_batches
from bonedist.spec import tta_views
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

    def predictor(self, model=None, views: tuple = ((0.0, 1.0),)) -> Predictor:
        """The evaluated model (or ``model``) as validation (and recalibration) runs it: with its mirror, without the
        test-time views (``calibrate_views`` adds them once, at the end)."""
        t = self.trainer
        return Predictor(t.evaluated_model if model is None else model, t.pipe, t.cfg.tta_flip, t.cfg.patch_aggregate,
                         t.accelerator.autocast, views)

    def _fit(self, local: dict) -> dict[str, tuple[float, float]]:
        """Each output's calibration fit on the whole recalibration sample (every rank the same)."""
        t = self.trainer
        if t.world > 1:  # every rank fits the same line on the whole sample
            from accelerate.utils import gather_object

            parts = [p for p in gather_object([local]) if p]
            local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
        z_true = (local["age"] - t.scale.mu) / t.scale.sigma if local else np.zeros(0)
        return {k: fit_calibration(local[k] if local else np.zeros(0), z_true, t.cfg.calibration)
                for k in ["pred", *t.task.branches]}

    def calibrate_views(self) -> dict | None:
        """With test-time views (``--tta-rotate``, ``--tta-scale``): ``best/``'s output calibration refit on the
        recalibration sample as the views see it, and its validation MAE with them, written into its meta.json
        (``views``: what evaluate, predict and export then use). Once, when training ends: in every validation they
        would cost several passes over 1,600 radiographs per epoch, out of the time budget. Idempotent (a resumed
        finished run repeats it to the same result). None without views or best/."""
        import copy

        from safetensors.torch import load_file

        from bonedist.files import read_json, write_json_atomic

        t = self.trainer
        views = tta_views(t.cfg.tta_rotate, t.cfg.tta_scale)
        best = t.run_dir / "best"
        if len(views) == 1 or t.recal_data is None or not (best / "meta.json").is_file():
            return None
        model = copy.deepcopy(t.evaluated_model)
        model.load_state_dict(load_file(str(best / "model.safetensors")))
        predictor = self.predictor(model, views)
        calibration = self._fit(predict_batches(predictor, t.recal_data))
        preds = gather_predictions(predict_batches(predictor, t.val_data.evaluation()), len(t.val_data.index))
        z_true = (preds["age"] - t.scale.mu) / t.scale.sigma
        error = (calibrate(preds["pred"], calibration["pred"]) - z_true) * t.scale.sigma
        found = {"val_mae_months": float(np.mean(np.abs(error))), "val_bias_months": float(np.mean(error))}
        if t.accelerator.is_main_process:
            meta = read_json(best / "meta.json", "the run's best/ description")
            meta["views"] = [list(v) for v in views]
            meta["calibration_z"] = {k: list(v) for k, v in calibration.items()}
            meta["views_metrics"] = found
            write_json_atomic(best / "meta.json", meta)
        t.accelerator.wait_for_everyone()
        return found

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
        self.calibration = self._fit(predict_batches(self.predictor(), t.recal_data))

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
