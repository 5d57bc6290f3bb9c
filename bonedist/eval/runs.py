"""Loading trained runs (``runs/EXPERIMENT/RUN/best``) for evaluation and prediction.

A run is named by its folder: the model's name (``resnet18``, ``timm/resnet34``), or a name of its own given with
``--run-name`` (``resnet18-2``: another seed of the same model, a separate row and ensemble member)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from bonedist import BonedistError
from bonedist.data.augment import InputPipeline
from bonedist.files import Fields, read_json
from bonedist.inference import Predictor
from bonedist.models import create_model, default_models, is_model, list_models, model_info
from bonedist.spec import VIEWS_RULE, InputSpec, tta_views, valid_views
from bonedist.train.precision import autocast_for, inference_precision
from bonedist.train.presets import list_presets


@dataclass
class TrainedModel:
    name: str  # the run's: its row in evaluate's tables and ensembles
    model: torch.nn.Module
    meta: dict
    pipe: InputPipeline
    run_dir: Path

    @property
    def model_name(self) -> str:
        """The registered model it is (``name`` unless the run has a name of its own)."""
        return str(self.meta["model"])

    @property
    def info(self):
        return model_info(self.model_name)

    @property
    def mu(self) -> float:
        return float(self.meta["mu"])

    @property
    def sigma(self) -> float:
        return float(self.meta["sigma"])

    def months(self, z, key: str = "pred"):
        """Predictions in z units → months, with the calibration the run refit on training radiographs (a line, or
        the offset that runs before 0.2 saved)."""
        line = self.meta.get("calibration_z", {}).get(key)
        if line is None:
            line = (1.0, -float(self.meta.get("offsets_z", {}).get(key, 0.0)))
        return self.mu + self.sigma * (line[0] * z + line[1])

    @property
    def train_mean(self) -> float:
        """The training split's own mean age: what predict-the-mean predicts (runs before it was saved: mu)."""
        return float(self.meta.get("train_mean_months", self.meta["mu"]))

    @property
    def flip(self) -> bool:
        """The run's own test-time flip setting (on in the improved presets)."""
        return bool(self.meta.get("config", {}).get("tta_flip", False))

    @property
    def aggregate(self) -> str:
        return self.meta.get("config", {}).get("patch_aggregate", "mean")

    def settings(self, flip: bool | None = None, aggregate: str | None = None) -> tuple[bool, str]:
        """Test-time flip and patch aggregation: the given ones (command line), else the run's own."""
        return (self.flip if flip is None else flip), (self.aggregate if aggregate is None else aggregate)

    @property
    def own_views(self) -> tuple[tuple[float, float], ...]:
        """The test-time views its calibration was refit with at the end of training (``best/meta.json``'s
        ``views``; runs without them: the radiograph alone)."""
        return tuple((float(d), float(z)) for d, z in self.meta.get("views", [[0.0, 1.0]]))

    def views(self, rotate: float | None = None, scale: float | None = None) -> tuple[tuple[float, float], ...]:
        """Test-time (degrees, zoom) views, ``spec.tta_views``: of the given rotation and zoom (command line; either
        alone keeps the other at 0), else the run's own (``own_views``)."""
        if rotate is None and scale is None:
            return self.own_views
        return tta_views(rotate or 0.0, scale or 0.0)

    def predictor(self, flip: bool | None = None, aggregate: str | None = None, precision: str = "auto",
                  rotate: float | None = None, scale: float | None = None) -> Predictor:
        """The model as evaluation runs it: test-time flip, views and patch aggregation (the given ones, else the
        run's own) in the precision and memory format ``inference_precision`` chooses for ``precision`` here."""
        flip, aggregate = self.settings(flip, aggregate)
        device = next(self.model.parameters()).device
        chosen = inference_precision(precision, device.type == "cuda", self.info.cpu_precision,
                                     discrete=self.model.task.attention)
        pipe = self.pipe
        if chosen.channels_last:
            chosen.apply(self.model)
            pipe = InputPipeline(self.model.spec, channels_last=chosen.input_channels_last)
        return Predictor(self.model, pipe, flip, aggregate, autocast_for(chosen, device), self.views(rotate, scale))


def find_runs(runs: str | Path, expected: list[str] | None = None) -> tuple[dict[str, Path], list[str]]:
    """The best checkpoint of each run under ``runs`` (name → folder, the registry's order of their models, then by
    name) and the ``expected`` models that have no run (default: those of the runs' presets' default lists,
    ``bonedist models --preset P``)."""
    runs = Path(runs)
    if not runs.is_dir():
        raise BonedistError(f"--runs {runs}: no such folder (train first: bonedist train ... --experiment NAME)")
    trained, models, presets = {}, {}, set()
    for meta in sorted(runs.glob("*/best/meta.json")) + sorted(runs.glob("*/*/best/meta.json")):  # timm/ARCH too
        run_dir = meta.parent.parent
        name = run_dir.relative_to(runs).as_posix()
        model, preset = _model_of(meta, name)
        if (meta.parent / "model.safetensors").is_file() and is_model(model):
            trained[name], models[name] = run_dir, model
            presets.add(preset)
    order = {name: i for i, name in enumerate(list_models())}  # the registry's order, then models made on demand
    found = {name: trained[name] for name in sorted(trained, key=lambda n: (order.get(models[n], len(order)),
                                                                            models[n], n != models[n], n))}
    unknown = [m for m in expected or [] if not is_model(m)]
    if unknown:
        raise BonedistError(f"--expect: unknown model(s) {', '.join(unknown)}; choose from {', '.join(list_models())}")
    if expected is None:
        expected = [m for m in list_models() if any(m in default_models(p) for p in presets if p in list_presets())]
    missing = [name for name in dict.fromkeys(expected) if name not in models.values()]
    if not found:
        raise BonedistError(f"no trained model under {runs}: expected {runs}/RUN/best/model.safetensors for "
                            f"one of {', '.join(list_models())} (RUN: the model's name or the run's own)")
    return found, missing


def _model_of(meta: Path, name: str) -> tuple[str, str | None]:
    """The model and preset a run's ``best/meta.json`` names (a run folder named as its model when it cannot be
    read: loading it then says what is wrong)."""
    try:
        values = json.loads(meta.read_text())
        return str(values.get("model", name)), (values.get("config") or {}).get("preset")
    except (OSError, ValueError, AttributeError):
        return name, None


def load_trained(run_dir: Path, device: torch.device | str = "cpu", name: str | None = None) -> TrainedModel:
    """The run in ``run_dir`` ready to predict, named ``name`` (``find_runs``'s; default: the run's own name)."""
    best = Path(run_dir) / "best"
    meta = check_meta(read_json(best / "meta.json", "the trained model's description"), best / "meta.json")
    name = meta.get("model")
    if not is_model(str(name)):
        raise BonedistError(f"{best} holds a {name!r} model, which this bonedist does not know "
                            f"(known: {', '.join(list_models())})")
    options = meta.get("model_options")
    if options is None:  # a run of bonedist before 0.2: one model_cfg for model and input settings
        from bonedist.train.config import migrate_legacy

        options = migrate_legacy({"model": name, "model_cfg": meta.get("model_cfg", {})})["model_options"]
    info = model_info(name)
    try:
        spec = InputSpec.from_dict(meta["spec"])
        model = create_model(name, spec=spec, **info.without_weights(options))
    except (KeyError, TypeError, ValueError, BonedistError) as exc:
        raise BonedistError(f"{best / 'meta.json'} does not describe a model this bonedist can build ({exc}); "
                            f"re-train it, or evaluate it with the bonedist version that trained it "
                            f"({meta.get('bonedist_version', 'unknown')})") from exc
    try:
        model.load_state_dict(load_file(str(best / "model.safetensors")))
    except Exception as exc:
        raise BonedistError(f"checkpoint {best / 'model.safetensors'} does not load into {name}: {exc}") from exc
    model.to(device).eval()
    run = name or meta.get("run") or meta["model"]
    return TrainedModel(str(run), model, meta, InputPipeline(model.spec), Path(run_dir))


def check_meta(data, path: Path) -> dict:
    """A run's ``best/meta.json`` (or a checkpoint's), every value evaluation and prediction compute with checked:
    a finite normalisation with sigma above 0, finite calibration lines, the pack's image size and resize mode, a
    model name and options, a config. Returns the dict; raises one line naming the file and the field."""
    from bonedist.data.images import RESIZE_MODES

    meta = Fields(data, path)
    meta.text("model")
    meta.number("mu")
    meta.number("sigma", minimum=0, inclusive=False)
    if meta.has("train_mean_months"):
        meta.number("train_mean_months")
    if meta.has("calibration_z"):
        lines = meta.mapping("calibration_z")
        for key in lines.data:
            lines.numbers(key, length=2)
    if meta.has("views") and not valid_views(meta.get("views")):
        meta.fail("views", f"must be {VIEWS_RULE}")
    if meta.has("offsets_z"):
        offsets = meta.mapping("offsets_z")
        for key in offsets.data:
            offsets.number(key)
    meta.mapping("spec")
    if meta.has("pack"):
        pack = meta.mapping("pack")
        pack.number("image_size", minimum=1, integer=True)
        pack.text("resize_mode", RESIZE_MODES)
    else:
        meta.fail("pack", "is missing (the pack's image size and resize mode)")
    if meta.has("model_options") and not isinstance(meta.get("model_options"), dict):
        meta.fail("model_options", "must be an object")
    if not isinstance(meta.get("config", {}), dict):
        meta.fail("config", "must be an object")
    return meta.data


def paper_weights(available: dict[str, TrainedModel]) -> dict[str, float] | None:
    """The paper's ensemble (VI-D) over the models at hand (each model's own run, not its other seeds), its weights
    normalised; None without any of them."""
    weights = {n: tm.info.paper_weight for n, tm in available.items()
               if n == tm.model_name and tm.info.paper_weight > 0}
    total = sum(weights.values())
    return {n: w / total for n, w in weights.items()} if weights else None
