"""A bundle written by ``bonedist export``, loaded and checked, predicting with onnxruntime: no torch.

    BUNDLE/
      bundle.json          format and version, the pack's size and resize mode, each member (ONNX file, opset, input
                           specification, test-time flip, patch aggregation, z → months line), the ensemble weights,
                           the conformal calibration
      members/NAME.onnx    one network per member: image (N, C, P, P) float32 and male (N,) float32 → pred (N,) z
      MODEL_CARD.md, model_card.json
      manifest.json        sha256 and size of every file above

Loading verifies every checksum and every field, and refuses with one line naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from bonedist import BonedistError
from bonedist.data.images import MAX_PIXELS, RESIZE_MODES
from bonedist.eval.intervals import METHODS, IntervalCalibration
from bonedist.files import Fields, read_json, sha256_file
from bonedist.serving.preprocess import model_inputs
from bonedist.spec import VIEWS_RULE, valid_views

FORMAT = "bonedist-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DESCRIPTION = "bundle.json"
AGGREGATES = ("mean", "median")


def finite(value):
    """``value`` with every NaN or infinity replaced by None: JSON for clients that reject non-standard numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def verify_manifest(root: Path) -> dict[str, str]:
    """Every file the manifest lists exists inside the bundle with its size and sha256; returns name → sha256."""
    path = root / MANIFEST
    if not root.is_dir():
        raise BonedistError(f"{root}: no such bundle folder (write one with bonedist export RUNS --out {root})")
    manifest = Fields(read_json(path, "the bundle's checksum manifest"), path)
    files = manifest.mapping("files")
    out = {}
    for name in files.data:
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or name in (MANIFEST, ""):
            files.fail(name, "is not a file name inside the bundle")
        entry = files.mapping(name)
        digest, size = entry.text("sha256"), entry.number("bytes", minimum=0, integer=True)
        target = root / pure
        if not target.is_file():
            raise BonedistError(f"{target}: missing from the bundle (listed in {path}); export it again")
        if target.stat().st_size != size or sha256_file(target) != digest:
            raise BonedistError(f"{target}: its checksum does not match {path}: the file was changed or damaged; "
                                f"export the bundle again")
        out[name] = digest
    return out


@dataclass
class Member:
    name: str
    model: str
    file: str
    spec: dict
    flip: bool
    views: tuple[tuple[float, float], ...]
    aggregate: str
    mu: float
    sigma: float
    line: tuple[float, float]
    session: object = None

    def months(self, z: np.ndarray) -> np.ndarray:
        return self.mu + self.sigma * (self.line[0] * z + self.line[1])


def _member(entry: Fields, files: dict[str, str]) -> Member:
    name = entry.text("name")
    file = entry.text("file")
    if file not in files or not file.endswith(".onnx"):
        entry.fail("file", f"{file!r} is not an ONNX file of the bundle's manifest")
    spec = entry.mapping("input")
    size = spec.number("image_size", minimum=8, integer=True)
    spec.number("input_size", minimum=8, maximum=size, integer=True)
    channels = spec.number("channels", integer=True)
    if channels not in (1, 3):
        spec.fail("channels", f"must be 1 or 3, got {channels}")
    spec.numbers("mean", length=channels)
    spec.numbers("std", length=channels, minimum=1e-6)
    spec.number("grid", minimum=1, integer=True)
    spec.text("contrast", ("none", "stretch"))
    if not isinstance(spec.get("hand_mask"), bool):
        spec.fail("hand_mask", "must be true or false")
    if spec.get("hand_mask_config") is not None:
        spec.mapping("hand_mask_config")
    flip = entry.get("flip")
    if not isinstance(flip, bool):
        entry.fail("flip", "must be true or false")
    views = entry.get("views", [[0.0, 1.0]])  # bundles before test-time views: the radiograph alone
    if not valid_views(views):
        entry.fail("views", f"must be {VIEWS_RULE}")
    scale = entry.mapping("scale")
    return Member(name, entry.text("model"), file, spec.data, flip, tuple((float(d), float(z)) for d, z in views),
                  entry.text("aggregate", AGGREGATES),
                  scale.number("mu"), scale.number("sigma", minimum=0, inclusive=False),
                  tuple(scale.numbers("line", length=2)))


class Bundle:
    """The exported ensemble as one predictor, like ``bonedist.eval.predict.Ensemble`` (the same attributes that
    ``result_row`` reads: ``weights``, ``source``, ``coverage``, ``calibration``) on numpy arrays."""

    def __init__(self, path: str | Path, coverage: float = 0.9, threads: int | None = None,
                 providers: list[str] | None = None):
        if not 0.05 <= coverage <= 0.99:
            raise BonedistError(f"--coverage must be between 0.05 and 0.99, got {coverage}")
        self.path, self.coverage = Path(path), coverage
        files = verify_manifest(self.path)
        if DESCRIPTION not in files:
            raise BonedistError(f"{self.path / MANIFEST}: does not list {DESCRIPTION}")
        where = self.path / DESCRIPTION
        data = Fields(read_json(where, "the bundle's description"), where)
        if data.text("format") != FORMAT:
            data.fail("format", f"must be {FORMAT!r}")
        version = data.number("format_version", minimum=1, integer=True)
        if version > FORMAT_VERSION:
            data.fail("format_version", f"is {version}; this bonedist reads bundles up to version {FORMAT_VERSION}: "
                                        f"upgrade bonedist")
        self.description = data.data
        # which model answered: kept with every result, so a report can be traced back to its bundle
        self.identity = {"digest": files[DESCRIPTION][:16], "created": data.get("created"),
                         "bonedist_version": data.get("bonedist_version")}
        pack = data.mapping("pack")
        self.pack = {"image_size": pack.number("image_size", minimum=8, integer=True),
                     "resize_mode": pack.text("resize_mode", RESIZE_MODES)}
        members = data.value("members")
        if not isinstance(members, list) or not members:
            data.fail("members", "must be a non-empty list")
        self.members = [_member(Fields(m, where, f"members[{i}].") if isinstance(m, dict) else data.fail(
            f"members[{i}]", "must be an object"), files) for i, m in enumerate(members)]
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            data.fail("members", "names a member twice")
        ensemble = data.mapping("ensemble")
        weights = ensemble.mapping("weights")
        unknown = [n for n in weights.data if n not in names]
        if unknown:
            weights.fail(unknown[0], f"is not a member ({', '.join(names)})")
        self.weights = {n: weights.number(n, minimum=0) for n in weights.data}
        if not self.weights or abs(sum(self.weights.values()) - 1.0) > 1e-3:
            weights.fail(next(iter(self.weights), "weights"), "the weights must sum to 1")
        self.source = ensemble.text("source")
        self.column = ensemble.text("column")
        self.calibration = None
        if data.get("intervals") is not None:
            cal = data.mapping("intervals")
            predicted = cal.numbers("predicted")
            truth = cal.numbers("truth", length=len(predicted))
            male = cal.value("male")
            if not isinstance(male, list) or len(male) != len(predicted) or not all(isinstance(m, bool) for m in male):
                cal.fail("male", f"must be {len(predicted)} true/false values")
            if len(predicted) < 20:
                cal.fail("predicted", f"holds {len(predicted)} calibration radiographs; at least 20 are needed")
            self.calibration = IntervalCalibration(cal.text("method", METHODS), predicted, truth, male)
        card = self.path / "model_card.json"
        self.card = finite(read_json(card, "the model card")) if "model_card.json" in files else {}
        self._open_sessions(threads, providers)

    def _open_sessions(self, threads: int | None, providers: list[str] | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # warnings about unused initialisers are not the user's concern
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in available]
        for member in self.members:
            try:
                member.session = ort.InferenceSession(str(self.path / member.file), options, providers=chosen)
            except Exception as exc:  # noqa: BLE001 - a file onnxruntime cannot load is the bundle's error
                raise BonedistError(f"{self.path / member.file}: onnxruntime cannot load it ({str(exc)[:200]})") \
                    from None
        self.providers = chosen

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def member_z(self, member: Member, images: np.ndarray, male: np.ndarray) -> np.ndarray:
        """One member's z prediction per radiograph: its mean over the test-time views and mirrors and its patch
        aggregation, as ``Predictor``."""
        total, count = None, 0
        for view, flip in ((v, f) for v in member.views for f in ((False, True) if member.flip else (False,))):
            count += 1
            x, repeats = model_inputs(images, member.spec, flip, view)
            sexes = np.repeat(male.astype(np.float32), repeats)
            z = member.session.run(["pred"], {"image": x, "male": sexes})[0].astype(np.float32)
            if repeats > 1:
                grouped = z.reshape(-1, repeats)
                z = (np.sort(grouped, axis=1)[:, (repeats - 1) // 2] if member.aggregate == "median"
                     else grouped.mean(axis=1))
            total = z if total is None else total + z
        return total if count == 1 else total / np.float32(count)

    def predict(self, images: np.ndarray, male: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 radiographs (B, S, S) or (B, 1, S, S) at the pack's size and their sexes → months per member
        (``model/NAME``), ``bone_age`` and, with a calibration, ``low`` and ``high`` (as ``Ensemble.predict``)."""
        images = np.asarray(images, np.uint8)
        images = images[:, 0] if images.ndim == 4 else images
        male = np.asarray(male, bool)
        out = {f"model/{m.name}": m.months(self.member_z(m, images, male)).astype(np.float64) for m in self.members}
        out["bone_age"] = sum(w * out[f"model/{n}"] for n, w in self.weights.items())
        if self.calibration is not None:
            bounds = self.calibration.intervals(out["bone_age"], male, self.coverage)
            out["low"], out["high"] = bounds[:, 0], bounds[:, 1]
        return out


def prepare(data: bytes, name: str, pack: dict, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """The bytes of one PNG, JPEG or DICOM radiograph → (uint8 image at the pack's size, DICOM header facts), as
    ``bonedist predict`` reads a file; a bad one raises one line naming ``name``."""
    from bonedist.data.dicom import read_radiograph
    from bonedist.data.images import resize_square

    original, facts = read_radiograph(data, name, max_pixels)
    resized, _ = resize_square(original, pack["image_size"], pack["resize_mode"])
    return resized, facts


def predict_files(bundle: Bundle, images: list[str], sex: str | None, chronological_age: str | None = None,
                  max_pixels: int = MAX_PIXELS, batch_size: int = 16) -> list[dict]:
    """``bonedist predict --bundle``: image files (or one folder of them), each with its result or its error; sex
    and age from the flags, else each DICOM header's."""
    from bonedist.data.images import IMAGE_SUFFIXES
    from bonedist.eval.predict import parse_age, parse_sex, result_row

    default_male = parse_sex(sex) if sex else None
    chrono = parse_age(chronological_age) if chronological_age else None
    paths = [Path(p) for p in images]
    if len(paths) == 1 and paths[0].is_dir():
        paths = sorted(p for p in paths[0].rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise BonedistError(f"{images[0]}: no PNG, JPEG or DICOM files in it")
    if not paths:
        raise BonedistError("nothing to predict: give image files or a folder")
    rows: list[dict | None] = [None] * len(paths)
    ready = []  # (index, image, male, chronological age)
    for i, path in enumerate(paths):
        try:
            if path.is_dir() or not path.is_file():
                raise BonedistError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}")
            image, facts = prepare(path.read_bytes(), str(path), bundle.pack, max_pixels)
            male = default_male if default_male is not None else facts.get("male")
            if male is None:
                raise BonedistError(f"{path}: no sex given (--sex F or M) and no DICOM PatientSex")
            age = chrono if chrono is not None else facts.get("age_months")
            ready.append((i, image, bool(male), age))
        except (BonedistError, OSError) as exc:
            rows[i] = {"image": str(path), "error": str(exc)}
    for start in range(0, len(ready), batch_size):
        part = ready[start:start + batch_size]
        values = bundle.predict(np.stack([p[1] for p in part]), np.array([p[2] for p in part]))
        for k, (i, _, male, age) in enumerate(part):
            rows[i] = {**result_row(str(paths[i]), male, age, values, bundle, index=k), "bundle": bundle.identity}
    return rows


def bundle_summary(bundle: Bundle) -> str:
    members = ", ".join(f"{m.name} ({m.model})" for m in bundle.members)
    return (f"{bundle.path}: {len(bundle.members)} member(s) {members}; {bundle.source} ensemble; "
            f"intervals {bundle.calibration.method if bundle.calibration else 'none'}; "
            f"onnxruntime {'/'.join(bundle.providers)}; {os.cpu_count()} CPU(s)")


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=False)
