"""From a trained ensemble to a service: the exported bundle agrees with ``bonedist predict``, runs where torch is not
installed, and the HTTP service answers concurrent clients correctly and bad requests with problem details."""

from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from bonedist import BonedistError
from tests.conftest import REPO, RSNA_SAMPLE, run_cli

SAMPLE_DIR = RSNA_SAMPLE / "boneage-training-dataset"


def _samples(n: int | None = None) -> list[Path]:
    files = sorted(SAMPLE_DIR.glob("*.png"))
    return files[:n] if n else files


# ---------------------------------------------------------------------------------------------- fast: the numpy parts

def test_split_conformal_gives_crepes_intervals():
    import warnings

    from crepes import ConformalRegressor

    from bonedist.eval.intervals import SplitConformal

    rng = np.random.default_rng(0)
    for n in (19, 60, 300):
        residuals, sigmas, bins = rng.normal(0, 10, n), rng.uniform(0.5, 2, n), rng.integers(0, 4, n)
        pred, test_sigmas, test_bins = rng.uniform(0, 240, 50), rng.uniform(0.5, 2, 50), rng.integers(0, 4, 50)
        for s, b in [(None, None), (sigmas, None), (None, bins), (sigmas, bins)]:
            for coverage in (0.5, 0.8, 0.9, 0.95, 0.99):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ref = ConformalRegressor().fit(residuals, sigmas=s, bins=b).predict_int(
                        pred, sigmas=None if s is None else test_sigmas, bins=None if b is None else test_bins,
                        confidence=coverage)
                ours = SplitConformal(residuals, s, b).intervals(pred, coverage, None if s is None else test_sigmas,
                                                                 None if b is None else test_bins)
                assert np.array_equal(ref, ours), (n, s is None, b is None, coverage)
    # a bin the calibration never saw: the whole range (crepes leaves [0, 0]), not a zero-width interval
    out = SplitConformal(residuals, None, np.zeros(n, int)).intervals(np.array([100.0]), 0.9, None, np.array([5]))
    assert np.isinf(out).all()


def test_the_saved_api_description_is_current():
    from bonedist.serving.service import openapi_text

    saved = (REPO / "docs" / "openapi.json").read_text()
    assert saved == openapi_text(), "docs/openapi.json is stale: bonedist serve --write-openapi docs/openapi.json"
    paths = json.loads(saved)["paths"]
    assert {"/v1/predictions", "/v1/predictions/batch", "/v1/model", "/health", "/ready"} <= set(paths)


@pytest.mark.realdata
def test_numpy_preprocessing_gives_the_torch_pipelines_inputs():
    """Resize (antialiased), contrast stretch, hand mask, patch grid and flip in numpy/OpenCV match InputPipeline
    on real radiographs, markers and letters included."""
    import torch

    from bonedist.data.augment import InputPipeline, eval_grid_size
    from bonedist.serving.bundle import prepare
    from bonedist.serving.preprocess import model_inputs
    from bonedist.spec import InputSpec

    files = _samples()
    for pack, size, patch in [(100, 100, None), (128, 96, None), (100, 100, 32), (320, 299, None)]:
        images = np.stack([prepare(f.read_bytes(), f.name, {"image_size": pack, "resize_mode": "pad"})[0]
                           for f in files])
        for mask, contrast in [(True, "stretch"), (True, "none"), (False, "stretch")]:
            spec = InputSpec(image_size=size, input_size=patch or size, channels=3, mean=(0.485, 0.456, 0.406),
                             std=(0.229, 0.224, 0.225), num_patches=4 if patch else None, eval_grid=None,
                             hand_mask=mask, contrast=contrast)
            described = {"image_size": size, "input_size": patch or size, "channels": 3, "mean": spec.mean,
                         "std": spec.std, "hand_mask": mask, "contrast": contrast, "grid": eval_grid_size(spec)}
            # the mirror and test-time views (rotated, zoomed: Kornia's warp against OpenCV's)
            for flip, view in [(False, None), (True, None), (False, (-8.0, 1.0)), (True, (0.0, 1.1))]:
                ref = InputPipeline(spec).model_batch({"image": torch.from_numpy(images)[:, None],
                                                       "male": torch.zeros(len(files))}, flip=flip, view=view)
                ours, repeats = model_inputs(images, described, flip, view)
                assert repeats == ref.repeats and ours.shape == tuple(ref.image.shape)
                differ = np.abs(ours - ref.image.numpy()) > 1e-3
                if pack == size or not mask:
                    assert not differ.any(), (pack, size, patch, mask, contrast, flip, view)
                else:  # a resize's last-bit differences may move a mask pixel on an Otsu boundary, no more
                    assert differ.mean() < 1e-4, (pack, size, patch, mask, contrast, flip, view)


# ------------------------------------------------------------------------------------------------- the bundle itself

@pytest.fixture(scope="module")
def bundle_dir(evaluated_pair, tmp_path_factory) -> Path:
    """xception + resnet50_patch (a patch model) of the shared evaluated pair, exported."""
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    result = run_cli("export", str(evaluated_pair), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 member(s)" in result.stdout
    return out


@pytest.mark.slow
@pytest.mark.realdata
def test_the_bundle_predicts_as_bonedist_predict_on_real_radiographs(bundle_dir, evaluated_pair):
    import torch

    from bonedist.eval.predict import Ensemble
    from bonedist.serving.bundle import Bundle, prepare

    bundle, ensemble = Bundle(bundle_dir), Ensemble(evaluated_pair)
    assert bundle.weights == ensemble.weights and bundle.source == ensemble.source
    assert bundle.calibration.to_dict() == ensemble.calibration.to_dict()
    files = _samples()
    images = np.stack([prepare(f.read_bytes(), f.name, bundle.pack)[0] for f in files])
    male = np.arange(len(files)) % 2 == 0
    ours = bundle.predict(images, male)
    ref = ensemble.predict(torch.from_numpy(images)[:, None], torch.from_numpy(male))
    for key in ("model/xception", "model/resnet50_patch", "bone_age", "low", "high"):
        assert np.abs(ours[key] - ref[key]).max() < 0.1, key
    # the same calibration: the bundle's interval of a bone age is the runs folder's, exactly
    same = ensemble.calibration.intervals(ref["bone_age"], male, 0.9)
    assert np.array_equal(bundle.calibration.intervals(ref["bone_age"], male, 0.9), same)
    # test-time views (rotations and zooms, each mirrored): the bundle's numpy views give Predictor's
    from bonedist.spec import tta_views

    views = tta_views(8.0, 0.1)
    assert json.loads((bundle_dir / "bundle.json").read_text())["members"][0]["views"] == [[0.0, 1.0]]
    for member in bundle.members:
        member.views = views
    for predictor in ensemble.predictors.values():
        predictor.views = views
    ours, viewed = bundle.predict(images, male), ensemble.predict(torch.from_numpy(images)[:, None],
                                                                  torch.from_numpy(male))
    for key in ("model/xception", "model/resnet50_patch", "bone_age"):
        assert np.abs(ours[key] - viewed[key]).max() < 0.1, key
    assert np.abs(viewed["model/xception"] - ref["model/xception"]).max() > 1e-3  # the views changed something
    card = json.loads((bundle_dir / "model_card.json").read_text())
    assert card["evaluation"]["metrics"]["ensemble_fitted"]["mae_ci95_months"]
    assert "age_bands" in card["intervals"]["coverage_on_evaluation"]
    assert "## Prediction intervals" in (bundle_dir / "MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_a_changed_or_damaged_bundle_is_refused_with_one_line(bundle_dir, tmp_path):
    from bonedist.serving.bundle import Bundle

    for damage, expected in [
        (lambda b: (b / "members" / "xception.onnx").write_bytes(b"\0" * 10), "checksum does not match"),
        (lambda b: (b / "bundle.json").write_text((b / "bundle.json").read_text().replace('"flip": false',
                                                                                          '"flip": 0', 1)),
         "checksum does not match"),
        (lambda b: (b / "manifest.json").unlink(), "manifest.json"),
        (lambda b: (b / "manifest.json").write_text('{"files": {"../x": {"sha256": "0", "bytes": 1}}}'),
         "not a file name inside the bundle"),
        (lambda b: _reseal(b, lambda d: d["members"][0].update(views=[[0.0, 1.0], [90, 1.0]])),  # checksums agree
         "views.*must be a list of"),
    ]:
        copy = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(bundle_dir, copy)
        damage(copy)
        with pytest.raises(BonedistError, match=expected):
            Bundle(copy)
        result = run_cli("predict", "--bundle", str(copy), str(REPO / "README.md"), "--sex", "F")
        assert result.returncode != 0 and "Traceback" not in result.stderr
    result = run_cli("export", str(REPO / "no-such-runs"), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "no such folder" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("export", str(bundle_dir), "--out", str(bundle_dir))  # exists
    assert result.returncode == 2 and "--overwrite" in result.stderr


def _reseal(bundle: Path, edit) -> None:
    """bundle.json edited by ``edit`` and its manifest entry made to agree: only the field checks can refuse it."""
    from bonedist.files import sha256_file

    description = json.loads((bundle / "bundle.json").read_text())
    edit(description)
    (bundle / "bundle.json").write_text(json.dumps(description))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["bundle.json"] = {"sha256": sha256_file(bundle / "bundle.json"),
                                        "bytes": (bundle / "bundle.json").stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _entrypoint(dockerfile: Path) -> list[str]:
    line = next(x for x in dockerfile.read_text().splitlines() if x.startswith("ENTRYPOINT"))
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.slow
@pytest.mark.realdata
def test_the_bundle_runs_in_a_fresh_environment_without_torch(bundle_dir, evaluated_pair, tmp_path):
    """The container's lock file and entry command, in a fresh virtual environment: no torch, the same answers."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run(pip + ["--require-hashes", "-r", str(REPO / "deploy" / "requirements.txt")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(pip + ["--no-deps", str(REPO)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    python = str(venv / "bin" / "python")
    gone = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert gone.returncode != 0 and "No module named 'torch'" in gone.stderr
    files = [str(f) for f in _samples(6)]
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    cmd = [str(venv / "bin" / "bonedist"), "predict", "--bundle", str(bundle_dir), *files, "--sex", "F",
           "--chronological-age", "10y", "--json"]
    fresh = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    ref = run_cli("predict", *files, "--sex", "F", "--chronological-age", "10y", "--json", "--runs",
                  str(evaluated_pair))
    assert ref.returncode == 0, ref.stderr[-2000:]
    for ours, theirs in zip(json.loads(fresh.stdout), json.loads(ref.stdout), strict=True):
        assert abs(ours["bone_age_months"] - theirs["bone_age_months"]) < 0.1
        for name, value in theirs["models"].items():
            assert abs(ours["models"][name] - value) < 0.1, name
        for bound in ("low_months", "high_months"):
            assert abs(ours["interval"][bound] - theirs["interval"][bound]) < 0.1
        assert ours["chronological_outside_interval"] == theirs["chronological_outside_interval"]
    # the image's entry command (Dockerfile ENTRYPOINT), with the bundle where the container mounts it
    from bonedist.bench.serve import free_port

    port = free_port()
    entry = [a if a != "/bundle" else str(bundle_dir) for a in _entrypoint(REPO / "deploy" / "Dockerfile")]
    assert entry[:2] == ["bonedist", "serve"] and "0.0.0.0" in entry
    proc = subprocess.Popen([*entry, "--port", str(port)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_ready(port, proc)
        status, body, _ = _post(port, "/v1/predictions", {"sex": "F"}, [(Path(files[0]).name,
                                                                         Path(files[0]).read_bytes())])
        assert status == 200 and abs(body["bone_age_months"] - json.loads(fresh.stdout)[0]["bone_age_months"]) < 1e-6
        health = next(x for x in (REPO / "deploy" / "Dockerfile").read_text().splitlines() if "CMD python" in x)
        probe = shlex.split(health.split("CMD ", 1)[1].replace("8000", str(port)))
        assert subprocess.run([str(venv / "bin" / "python"), *probe[1:]], timeout=30).returncode == 0
    finally:
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------------------------------------------------------- the service

def _post(port: int, path: str, fields: dict, files: list[tuple[str, bytes]], headers: dict | None = None):
    from bonedist.bench.serve import multipart

    body, kind = multipart(fields, files)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, body, {"Content-Type": kind, **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload), response.getheader("Content-Type")


def _wait_ready(port: int, proc: subprocess.Popen, seconds: float = 120) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the service exited: {proc.stdout.read()[-3000:] if proc.stdout else ''}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ready")
            if conn.getresponse().status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels (its data does not matter: it is never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.slow
@pytest.mark.realdata
def test_the_service_answers_sixteen_concurrent_clients_and_every_bad_request_with_a_problem(bundle_dir, tmp_path):
    import cv2

    from bonedist.bench.serve import free_port
    from bonedist.serving.bundle import Bundle, prepare
    from tests.test_clinical import write_dicom

    token = "s3cret-token"
    (tmp_path / "token").write_text(token + "\n")
    files = _samples(8)
    gray = cv2.imread(str(files[0]), cv2.IMREAD_GRAYSCALE)
    write_dicom(tmp_path / "hand.dcm", gray.astype(np.uint16) * 16, bits=12, sex="M", age="011Y")
    dicom = (tmp_path / "hand.dcm").read_bytes()
    bundle = Bundle(bundle_dir)
    expected = {}
    for i, f in enumerate(files):
        image = prepare(f.read_bytes(), f.name, bundle.pack)[0]
        expected[f.name] = bundle.predict(image[None], np.array([i % 2 == 0]))["bone_age"][0]
    dicom_image = prepare(dicom, "hand.dcm", bundle.pack)[0]
    expected["hand.dcm"] = bundle.predict(dicom_image[None], np.array([True]))["bone_age"][0]

    auth = {"Authorization": f"Bearer {token}"}
    cases = []  # (fields, files, headers, expected status, problem kind or None)
    for i, f in enumerate(files):
        cases.append(({"sex": "M" if i % 2 == 0 else "F"}, [(f.name, f.read_bytes())], auth, 200, None))
    cases.append(({}, [("hand.dcm", dicom)], auth, 200, None))  # the header gives sex and age
    cases.append(({"sex": "F"}, [("notes.txt", b"bone age please\n" * 20)], auth, 422, "bad-image"))
    cases.append(({"sex": "F"}, [("huge.png", _png_declaring(60000, 60000))], auth, 413, "too-large"))
    cases.append(({}, [(files[0].name, files[0].read_bytes())], auth, 422, "missing-field"))
    cases.append(({"sex": "F"}, [(files[1].name, files[1].read_bytes())], {"Authorization": "Bearer wrong"}, 401,
                  "unauthorized"))
    cases.append(({"sex": "X"}, [(files[1].name, files[1].read_bytes())], auth, 422, "bad-field"))

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bonedist", "serve", str(bundle_dir), "--port", str(port),
                             "--token-file", str(tmp_path / "token"), "--max-upload-mb", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[tuple[int, int, dict, str]] = []
    lock = threading.Lock()
    order = iter(range(200))

    def client():
        while (i := next(order, None)) is not None:
            fields, upload, headers, _, _ = cases[i % len(cases)]
            status, body, kind = _post(port, "/v1/predictions", fields, upload, headers)
            with lock:
                seen.append((i % len(cases), status, body, kind))

    try:
        assert _wait_ready(port, proc)
        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(seen) == 200
        for case, status, body, kind in seen:
            fields, upload, _, want, problem = cases[case]
            assert status == want, (upload[0][0], status, body)
            if want == 200:
                assert abs(body["bone_age_months"] - expected[upload[0][0]]) < 0.01
                assert body["interval"]["low_months"] <= body["bone_age_months"] <= body["interval"]["high_months"]
                assert body["bundle"] == bundle.identity
                if upload[0][0] == "hand.dcm":
                    assert body["sex"] == "M" and body["chronological_age_months"] == 132.0
                    assert body["sex_source"] == "dicom"
            else:
                assert kind == "application/problem+json"
                assert body["status"] == want and body["type"] == "/problems/" + problem and body["detail"]
                assert "Traceback" not in json.dumps(body)
        # more bad requests: an oversized body, a batch with a bad file among good ones, an unknown path
        status, body, _ = _post(port, "/v1/predictions", {"sex": "F"}, [("big.png", b"\0" * (17 * 2**20))], auth)
        assert status == 413 and body["type"] == "/problems/too-large"
        status, body, _ = _post(port, "/v1/predictions/batch", {"sex": "F"},
                                [(files[2].name, files[2].read_bytes()), ("notes.txt", b"text")], auth)
        assert status == 200 and body["failed"] == 1 and "bone_age_months" in body["results"][0]
        assert body["results"][1]["problem"]["status"] == 422
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/model", headers=auth)
        model = json.loads(conn.getresponse().read())
        assert model["members"] == ["xception", "resnet50_patch"] and model["card"]["evaluation"]["metrics"]
        conn.request("GET", "/v1/nothing", headers=auth)
        response = conn.getresponse()
        assert response.status == 404 and response.getheader("Content-Type") == "application/problem+json"
        response.read()
        conn.request("GET", "/ready")
        served = json.loads(conn.getresponse().read())["served"]
        assert served["batches"] < served["radiographs"]  # concurrent requests shared batches
        conn.request("GET", "/problems/bad-image")
        assert "PNG, JPEG or DICOM" in json.loads(conn.getresponse().read())["meaning"]
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200 and proc.poll() is None  # never crashed
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert "Traceback" not in log
    ids = [line for line in log.splitlines() if "POST /v1/predictions" in line]
    assert len(ids) >= 200 and all(line.split()[-1] == "ms" for line in ids)  # id, status and latency each


@pytest.mark.slow
@pytest.mark.realdata
def test_bench_serve_prints_each_path_and_the_latency_at_eight_clients(bundle_dir, evaluated_pair):
    result = run_cli("bench", "serve", str(bundle_dir), "--runs", str(evaluated_pair), "--requests", "24",
                     "--clients", "1,8", "--single", "1", "--batch-size", "8", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for row in ("HTTP service, 1 client(s)", "HTTP service, 8 client(s)", "predict --table (worklist)",
                "one call per image (baseline)", "onnxruntime", "torch eager", "service at 8 clients: p99"):
        assert row in out, row
    service_rows = [line for line in out.splitlines() if line.startswith("| HTTP service")]
    assert all(line.split("|")[6].strip() == "0" for line in service_rows)  # every request answered 200
