"""``bonedist export RUNS --out BUNDLE``: an evaluated runs folder as a self-contained bundle
(``bonedist.serving.bundle``): each member's network in ONNX, its input specification, the ensemble weights and
interval calibration that ``bonedist predict`` would use, a model card and a checksum manifest.

Only the network crosses to ONNX; the input pipeline (resize, contrast, hand mask, patch grid, flip) is described in
``bundle.json`` and rebuilt in numpy/OpenCV by the runtime (``bonedist.serving.preprocess``). Each exported network
is run once by onnxruntime beside torch before the bundle is written, and a difference above ``TOLERANCE_MONTHS``
refuses the export.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from bonedist import BonedistError, __version__
from bonedist.files import read_json, sha256_file, write_atomic, write_json_atomic
from bonedist.serving.bundle import DESCRIPTION, FORMAT, FORMAT_VERSION, MANIFEST, finite

OPSET = 18
TOLERANCE_MONTHS = 0.05  # onnxruntime vs torch on the export's check batch


def _network(model):
    """The member's network with one output, ``pred`` in z units (the branches stay in torch)."""
    import torch

    class Network(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, image, male):
            return self.inner(image, male)["pred"].float()

    return Network(model).eval()


def export_onnx(model, spec, path: Path) -> str:
    """``model`` (fp32, eval) to ONNX at ``path`` with a dynamic batch; returns the exporter used: torch.export's
    (``dynamo``), else TorchScript tracing where torch.export cannot take the model."""
    import torch

    network = _network(model)
    image = torch.randn(2, spec.channels, spec.input_size, spec.input_size)
    male = torch.tensor([0.0, 1.0])
    names = {"input_names": ["image", "male"], "output_names": ["pred"], "opset_version": OPSET}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(network, (image, male), str(path), dynamo=True, verbose=False,
                              dynamic_shapes=({0: batch}, {0: batch}), external_data=False, **names)
            return "dynamo"
        except Exception:  # noqa: BLE001 - a model torch.export cannot trace goes through TorchScript
            axes = {"image": {0: "batch"}, "male": {0: "batch"}, "pred": {0: "batch"}}
            torch.onnx.export(network, (image, male), str(path), dynamo=False, dynamic_axes=axes, **names)
            return "torchscript"


def _check(tm, path: Path, spec) -> float:
    """Largest difference (months) between onnxruntime and torch on a fixed random batch of 3."""
    import onnxruntime as ort
    import torch

    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, spec.channels, spec.input_size, spec.input_size, generator=generator)
    male = torch.tensor([0.0, 1.0, 1.0])
    with torch.no_grad():
        ref = _network(tm.model)(image, male).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["pred"], {"image": image.numpy(), "male": male.numpy()})[0]
    return float(np.abs(got - ref).max() * tm.sigma)


def _member_entry(name: str, tm, file: str, exporter: str) -> dict:
    from bonedist.data.augment import eval_grid_size
    from bonedist.data.handmask import HandMaskConfig

    spec = tm.model.spec
    flip, aggregate = tm.settings()
    line = tm.meta.get("calibration_z", {}).get("pred")
    if line is None:
        line = (1.0, -float(tm.meta.get("offsets_z", {}).get("pred", 0.0)))
    return {"name": name, "model": tm.model_name, "file": file, "opset": OPSET, "exporter": exporter,
            "dynamic_axes": {"image": {"0": "batch"}, "male": {"0": "batch"}, "pred": {"0": "batch"}},
            "input": {"image_size": spec.image_size, "input_size": spec.input_size, "channels": spec.channels,
                      "mean": list(spec.mean), "std": list(spec.std), "grid": eval_grid_size(spec),
                      "contrast": spec.contrast, "hand_mask": spec.hand_mask,
                      "hand_mask_config": HandMaskConfig().to_dict() if spec.hand_mask else None},
            "flip": flip, "views": [list(v) for v in tm.views()], "aggregate": aggregate,
            "scale": {"mu": tm.mu, "sigma": tm.sigma, "line": [float(line[0]), float(line[1])]},
            "trained": {"bonedist_version": tm.meta.get("bonedist_version"), "git": tm.meta.get("git"),
                        "epoch": tm.meta.get("epoch"), "global_step": tm.meta.get("global_step"),
                        "pack_identity": tm.meta.get("pack_identity"), "config": tm.meta.get("config", {})}}


def _calibration(runs: Path, column: str) -> dict | None:
    from bonedist.eval.predict import load_interval_calibration

    saved = runs / "report" / "intervals.json"
    if not saved.exists():
        return None
    cal = load_interval_calibration(saved, column)
    if cal is None:
        return None
    return {"column": column, "method": cal.method, "predicted": list(map(float, cal.predicted)),
            "truth": list(map(float, cal.truth)), "male": list(map(bool, cal.male))}


def _model_card(runs: Path, description: dict, ensemble) -> dict:
    """What a reader of the bundle needs to judge it: data and split, metrics with their confidence intervals,
    interval coverage per age band, intended use and limitations, versions."""
    metrics_path = runs / "report" / "metrics.json"
    report = read_json(metrics_path, "the evaluation report") if metrics_path.is_file() else {}
    report = report if isinstance(report, dict) else {}
    rows = report.get("metrics", {}) if isinstance(report.get("metrics"), dict) else {}
    keep = ("n", "mae_months", "mae_ci95_months", "rmse_months", "bias_months", "within_12_months", "pearson_r",
            "mae_by_age_band")
    metrics = {name: {k: row.get(k) for k in keep if k in row} for name, row in rows.items() if isinstance(row, dict)}
    intervals = report.get("intervals", {}) if isinstance(report.get("intervals"), dict) else {}
    column = description["ensemble"]["column"]
    first = next(iter(ensemble.trained.values()))
    config = first.meta.get("config", {})
    return {
        "name": f"bonedist bone-age ensemble ({', '.join(m['name'] for m in description['members'])})",
        "bonedist_version": __version__,
        "created": description["created"],
        "intended_use": ("Research and decision support: estimating the skeletal (bone) age of a child from a "
                         "left-hand radiograph (0-19 years), with a prediction interval, for a radiologist who "
                         "reads the image. Not a medical device; not for use without a reader."),
        "limitations": [
            "Trained and evaluated on the data named below only; radiographs from other scanners, populations or "
            "processing can be predicted worse than the metrics say. Validate locally before use.",
            "The intervals are calibrated on the validation split; their coverage holds on radiographs like those.",
            f"Inputs are resized to {description['pack']['image_size']} px ({description['pack']['resize_mode']}); "
            "fine detail below that resolution is not seen.",
            "A radiograph of something other than a hand is not detected reliably beyond blank or flat images.",
        ],
        "training_data": {"shards": config.get("shards"), "pack": first.meta.get("pack_identity"),
                          "preset": config.get("preset")},
        "evaluation": {"split": report.get("split"), "n": report.get("n"), "metrics": metrics,
                       "ensemble_fit": report.get("ensemble_fit")},
        "ensemble": {"weights": description["ensemble"]["weights"], "source": description["ensemble"]["source"]},
        "intervals": {"column": column, "method": (description.get("intervals") or {}).get("method"),
                      "coverage_on_evaluation": intervals.get(column)},
        "members": [{k: m[k] for k in ("name", "model", "opset", "exporter", "input", "flip", "views",
                                       "aggregate")}
                    | {"trained": m["trained"]} for m in description["members"]],
        "runtime": "numpy, OpenCV, onnxruntime, pydicom (deploy/requirements.txt)",
    }


def _fmt(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def card_markdown(card: dict) -> str:
    ev = card["evaluation"]
    lines = [f"# Model card: {card['name']}", "", f"bonedist {card['bonedist_version']}, exported {card['created']}.",
             "", "## Intended use", "", card["intended_use"], "", "## Limitations", ""]
    lines += [f"- {item}" for item in card["limitations"]]
    data = card["training_data"]
    lines += ["", "## Training data", "", f"- shards: `{data.get('shards')}`; preset `{data.get('preset')}`",
              f"- pack: {json.dumps(data.get('pack'))}", "",
              f"## Evaluation ({ev.get('split')} split, {ev.get('n')} radiographs)", "",
              "| model | MAE (months) | 95 % CI | bias | within 12 months | r |", "|---|---|---|---|---|---|"]
    for name, row in ev.get("metrics", {}).items():
        ci = row.get("mae_ci95_months")
        ci_text = f"{ci[0]:.2f}–{ci[1]:.2f}" if isinstance(ci, list) and len(ci) == 2 else "—"
        within = row.get("within_12_months")
        lines.append(f"| {name} | {_fmt(row.get('mae_months'))} | {ci_text} | {_fmt(row.get('bias_months'))} | "
                     f"{_fmt(within * 100 if isinstance(within, float) else None, 0)} % | "
                     f"{_fmt(row.get('pearson_r'), 3)} |")
    iv = card["intervals"]
    cov = iv.get("coverage_on_evaluation") or {}
    lines += ["", f"## Prediction intervals ({iv.get('method')}, calibrated on validation)", ""]
    if cov:
        lines += [f"Nominal {cov.get('nominal')}: coverage {_fmt(cov.get('coverage'), 3)} on {cov.get('n')} "
                  f"radiographs, mean width {_fmt(cov.get('mean_width_months'), 1)} months.", "",
                  "| age band | n | coverage | mean width (months) |", "|---|---|---|---|"]
        for band, row in (cov.get("age_bands") or {}).items():
            lines.append(f"| {band} | {row.get('n')} | {_fmt(row.get('coverage'), 3)} | "
                         f"{_fmt(row.get('mean_width_months'), 1)} |")
    else:
        lines.append("No interval coverage was reported for this ensemble.")
    lines += ["", "## Members", "", "| member | model | input | flip (test-time views) | exporter (opset) | weight |",
              "|---|---|---|---|---|---|"]
    for m in card["members"]:
        spec = m["input"]
        what = (f"{spec['image_size']} px, {spec['channels']} ch" + (", hand mask" if spec["hand_mask"] else "")
                + (", contrast stretch" if spec["contrast"] == "stretch" else "")
                + (f", {spec['grid']}x{spec['grid']} patches of {spec['input_size']} px"
                   if spec["input_size"] < spec["image_size"] else ""))
        views = ", ".join(f"{d:+g} deg x{z:g}" for d, z in m.get("views", [])[1:])
        lines.append(f"| {m['name']} | {m['model']} | {what} | {m['flip']}{f' + {views}' if views else ''} | "
                     f"{m['exporter']} ({m['opset']}) | "
                     f"{card['ensemble']['weights'].get(m['name'], 0):.3f} |")
    lines += ["", f"Ensemble weights: {card['ensemble']['source']}.", "", f"Runtime: {card['runtime']}.", ""]
    return "\n".join(lines)


def export_bundle(runs: str | Path, out: str | Path, overwrite: bool = False, quiet: bool = False) -> dict:
    """Write the bundle of ``runs`` to ``out`` (atomically: a temporary folder beside it, renamed when complete)."""
    import torch

    from bonedist.eval.predict import Ensemble

    runs, out = Path(runs), Path(out)
    if out.exists() and not overwrite:
        raise BonedistError(f"--out {out}: exists; choose another folder or pass --overwrite")
    ensemble = Ensemble(runs)
    attention = [n for n, tm in ensemble.trained.items() if tm.model.task.attention]
    if attention:
        raise BonedistError(
            f"{', '.join(attention)}: the AG-CNN's attention crop (a box chosen from its own feature map, then a "
            f"second network on the crop) has no ONNX form in this bonedist; export an experiment without it "
            f"(evaluate a runs folder that holds the other models, then export that)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (work / "members").mkdir()
        members = []
        for name, tm in ensemble.trained.items():
            model = copy.deepcopy(tm.model).float().to(memory_format=torch.contiguous_format).eval()
            file = f"members/{name.replace('/', '_')}.onnx"
            exporter = export_onnx(model, tm.model.spec, work / file)
            diff = _check(tm, work / file, tm.model.spec)
            if diff > TOLERANCE_MONTHS:
                raise BonedistError(f"{name}: onnxruntime differs from torch by {diff:.3f} months on the export's "
                                    f"check batch (allowed {TOLERANCE_MONTHS}); not exported")
            if not quiet:
                print(f"exported {name} ({exporter}, opset {OPSET}): onnxruntime within {diff:.2g} months of torch",
                      file=sys.stderr)
            members.append(_member_entry(name, tm, file, exporter))
        created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
        description = {"format": FORMAT, "format_version": FORMAT_VERSION, "bonedist_version": __version__,
                       "created": created, "source_runs": str(runs.resolve()),
                       "exported_with": {"torch": torch.__version__, "python": platform.python_version()},
                       "pack": dict(ensemble.pack), "members": members,
                       "ensemble": {"weights": ensemble.weights, "source": ensemble.source,
                                    "column": _column(ensemble)},
                       "intervals": _calibration(runs, _column(ensemble)), "default_coverage": 0.9}
        card = finite(_model_card(runs, description, ensemble))  # strict JSON: no NaN for a client to choke on
        write_json_atomic(work / DESCRIPTION, description)
        write_json_atomic(work / "model_card.json", card)
        write_atomic(work / "MODEL_CARD.md", card_markdown(card))
        files = {p.relative_to(work).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(work.rglob("*")) if p.is_file()}
        write_json_atomic(work / MANIFEST, {"format": FORMAT, "files": files})
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return description


def _column(ensemble) -> str:
    """The report column whose calibration ``Ensemble`` reads (``ensemble_fitted``, one model's, ...)."""
    return ensemble.column
