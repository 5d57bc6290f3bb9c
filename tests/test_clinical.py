"""From a trained ensemble to an answer a clinic can use: conformal intervals, DICOM radiographs, worklists."""

from __future__ import annotations

import numpy as np
import pytest

from bonedist.data.images import decode_gray8
from bonedist.eval.intervals import METHODS, IntervalCalibration, choose_method, coverage_report
from tests.conftest import RSNA_SAMPLE

SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80")
# explicit VR little endian (uncompressed), RLE lossless, JPEG 2000 lossless, JPEG-LS lossless


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 16, syntax: str = SYNTAXES[0],
                sex: str | None = "F", age: str | None = "010Y", window: tuple[float, float] | None = None,
                slope: float = 1.0, intercept: float = 0.0, frames: int = 1, pixel_data: bool = True) -> None:
    """A radiograph as a DICOM file: ``pixels`` (uint16, already scaled to ``bits``) stored as the header says."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if sex:
        ds.PatientSex = sex
    if age:
        ds.PatientAge = age
    ds.PixelSpacing = [0.14, 0.14]
    if pixel_data:
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16 if bits > 8 else 8, bits, bits - 1, 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        data = pixels.astype(np.uint16 if bits > 8 else np.uint8)
        ds.PixelData = data.tobytes()
        if syntax != SYNTAXES[0]:
            ds.compress(UID(syntax), data)
    ds.save_as(path, enforce_file_format=True)


def _radiograph() -> np.ndarray:
    import cv2

    if not RSNA_SAMPLE.is_dir():
        pytest.skip("no real radiograph at hand")
    path = sorted((RSNA_SAMPLE / "boneage-training-dataset").glob("*.png"))[0]
    gray = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (256, 320), interpolation=cv2.INTER_AREA)
    gray[0, :2] = (0, 255)  # the full range: every bit depth stretches back to exactly these pixels
    return gray


@pytest.mark.realdata
@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("photometric, bits", [("MONOCHROME2", 8), ("MONOCHROME2", 12), ("MONOCHROME2", 16),
                                               ("MONOCHROME1", 12), ("MONOCHROME1", 16)])
def test_a_radiograph_as_dicom_decodes_to_the_pixels_of_its_png(tmp_path, syntax, photometric, bits):
    """MONOCHROME1 inverted, the modality LUT and the VOI window applied, any bit depth, each lossless syntax the
    installed handlers decode: the same 8-bit pixels as the PNG, so the same bone age."""
    from bonedist.data.dicom import decode_radiograph

    gray = _radiograph()
    top = (1 << bits) - 1
    stored = np.round(gray.astype(np.float64) * top / 255).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = top - stored
    # a modality LUT (slope 2) and a window over the whole stored range: linear, so the pixels survive exactly
    window = (float(top), float(2 * top + 1))
    write_dicom(tmp_path / "x.dcm", stored, photometric, bits, syntax, slope=2.0, window=window)
    image, facts = decode_radiograph((tmp_path / "x.dcm").read_bytes())
    assert np.array_equal(image, gray)
    assert facts["male"] is False and facts["age_months"] == 120 and facts["pixel_spacing_mm"] == [0.14, 0.14]
    assert facts["photometric"] == photometric and facts["bits_stored"] == bits and facts["window"] == list(window)


def test_dicoms_that_are_not_radiographs_are_refused_with_their_reason(tmp_path):
    from bonedist.data.dicom import decode_radiograph
    from bonedist.data.images import ImageError

    pixels = np.zeros((2, 40, 40), np.uint16)
    write_dicom(tmp_path / "sr.dcm", pixels[0], pixel_data=False)
    write_dicom(tmp_path / "multi.dcm", pixels, frames=2)
    write_dicom(tmp_path / "big.dcm", np.zeros((20, 20), np.uint16))
    with pytest.raises(ImageError, match="without pixel data"):
        decode_radiograph((tmp_path / "sr.dcm").read_bytes())
    with pytest.raises(ImageError, match="multi-frame DICOM \\(2 frames\\)"):
        decode_radiograph((tmp_path / "multi.dcm").read_bytes())
    with pytest.raises(ImageError, match="over the 0-megapixel limit"):
        decode_radiograph((tmp_path / "big.dcm").read_bytes(), max_pixels=100)
    with pytest.raises(ImageError, match="not a PNG or JPEG"):
        decode_gray8(b"GIF89a....")


@pytest.mark.realdata
def test_a_folder_of_dicoms_without_a_table_packs_with_the_headers_sex(tmp_path):
    import json

    from bonedist.data.pack import PackOptions, pack_dataset

    gray = _radiograph().astype(np.uint16) * 257
    root = tmp_path / "export"
    (root / "study1").mkdir(parents=True)
    write_dicom(root / "study1" / "a.dcm", gray, sex="M", age="012Y")
    write_dicom(root / "study1" / "b", 65535 - gray, "MONOCHROME1", sex="F", age=None)  # no extension, no age
    write_dicom(root / "c.dcm", gray, syntax=SYNTAXES[1], sex=None)  # no sex in the header: skipped
    write_dicom(root / "report.dcm", gray, pixel_data=False, sex="F")  # a structured report: skipped
    manifest, code = pack_dataset(root, tmp_path / "shards", PackOptions(size=64, workers=1, progress=False))
    assert code == 0
    test = manifest["splits"]["test"]
    assert test["count"] == 2 and test["labeled"] == 0
    assert sorted(s[2] for shard in test["shards"] for s in shard["samples"]) == [False, True]
    reasons = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert "no PatientSex" in reasons["c.dcm"] and "without pixel data" in reasons["report.dcm"]
    import tarfile

    with tarfile.open(tmp_path / "shards" / test["shards"][0]["name"]) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    by_source = {m["source"]: m for m in metas}
    assert by_source["study1/a.dcm"]["chronological_age_months"] == 144
    assert by_source["study1/a.dcm"]["dicom"]["pixel_spacing_mm"] == [0.14, 0.14]
    assert by_source["study1/b"]["dicom"]["photometric"] == "MONOCHROME1"


def _heteroscedastic(n: int, seed: int):
    rng = np.random.default_rng(seed)
    truth = rng.uniform(0, 228, n)
    male = rng.random(n) < 0.5
    pred = truth + rng.normal(0, 3 + truth / 20, n)  # errors grow with age, as on RSNA
    return pred, truth, male


def test_conformal_intervals_cover_what_they_promise_in_every_group():
    # 1,200 calibration radiographs (a validation split's size) and 4,000 to measure on, so that a band's coverage
    # is known to about 1 % and what is tested is the method, not the sampling
    pred, truth, male = _heteroscedastic(5200, 0)
    cal_part, test_part = slice(0, 1200), slice(1200, None)
    method, scores = choose_method(pred[cal_part], truth[cal_part], male[cal_part])
    assert set(scores) == set(METHODS) and method != "standard", scores  # not one width for all
    cal = IntervalCalibration(method, pred[cal_part].tolist(), truth[cal_part].tolist(), male[cal_part].tolist())
    report = coverage_report(cal, pred[test_part], truth[test_part], male[test_part], 0.9)
    assert 0.88 <= report["coverage"] <= 0.92
    assert report["male"]["coverage"] >= 0.87 and report["female"]["coverage"] >= 0.87
    assert all(b["coverage"] >= 0.86 for b in report["age_bands"].values() if b["n"] >= 50)
    widths = [b["mean_width_months"] for b in report["age_bands"].values() if b["n"]]
    assert widths[-1] > 2 * widths[0]  # wider where the errors are
    standard = coverage_report(IntervalCalibration("standard", pred[cal_part].tolist(), truth[cal_part].tolist(),
                                                   male[cal_part].tolist()),
                               pred[test_part], truth[test_part], male[test_part], 0.9)
    assert standard["age_bands"]["0-2y"]["coverage"] > 0.97  # one width is too wide for the young ...
    assert min(b["coverage"] for b in standard["age_bands"].values() if b["n"] >= 50) < 0.85  # ... too narrow later
    assert list(report["by_nominal"]) == ["0.5", "0.6", "0.7", "0.8", "0.9", "0.95"]
    bounds = cal.intervals([5.0, 230.0], [True, False], 0.9)
    assert bounds.min() >= 0 and bounds.max() <= 240  # a bone age stays a bone age


def _shrunk_to_the_mean(n: int, seed: int):
    """A model that pulls every child towards the mean age (as models trained briefly from scratch do on RSNA):
    the youngest are predicted older than they are, the oldest younger."""
    rng = np.random.default_rng(seed)
    truth = np.clip(rng.normal(127, 41, n), 1, 228)
    male = rng.random(n) < 0.54
    pred = 127 + 0.8 * (truth - 127) + rng.normal(0, 12 + 0.05 * truth, n)
    return pred, truth, male


def test_label_conditional_intervals_cover_every_true_age_band_of_a_model_that_shrinks_to_the_mean():
    # 600 calibration radiographs (the benchmark's validation split) and 4,000 to measure on
    pred, truth, male = _shrunk_to_the_mean(4600, 1)
    cal_part, test_part = slice(0, 600), slice(600, None)
    args = pred[cal_part].tolist(), truth[cal_part].tolist(), male[cal_part].tolist()
    reports = {m: coverage_report(IntervalCalibration(m, *args), pred[test_part], truth[test_part], male[test_part],
                                  0.9) for m in ("age", "true_age")}

    def worst_band(report):
        return min(b["coverage"] for b in report["age_bands"].values() if b["n"] >= 50)

    assert worst_band(reports["age"]) < 0.85  # bins by predicted age under-cover the youngest (or the oldest)
    assert worst_band(reports["true_age"]) >= 0.87  # bins by true age cover every band ...
    assert 0.88 <= reports["true_age"]["coverage"] <= 0.93  # ... without over-covering overall
    assert reports["true_age"]["male"]["coverage"] >= 0.87 and reports["true_age"]["female"]["coverage"] >= 0.87
    # not by being wide everywhere: its own bands' lower and upper quantiles make the intervals asymmetric
    assert reports["true_age"]["mean_width_months"] < 1.25 * reports["age"]["mean_width_months"]
    method, scores = choose_method(*map(np.asarray, args))
    assert method in ("true_age", "true_age_sex"), scores  # chosen by coverage in the true-age bands
    bounds = IntervalCalibration("true_age", *args).intervals([0.0, 60.0, 127.0, 250.0], [True] * 4, 0.9)
    assert (bounds[:, 0] <= bounds[:, 1]).all() and bounds.min() >= 0 and bounds.max() <= 240
    assert bounds[2, 0] < 127 < bounds[2, 1]


def _rsna_like_validation(n: int, seed: int):
    """A shrink-to-the-mean model on the RSNA age mix: about 10 % of children aged 2-6 y, so that a 600-radiograph
    validation split holds some 55-70 of them, and half of it fewer than a Mondrian band needs."""
    rng = np.random.default_rng(seed)
    young = rng.random(n) < 0.1
    truth = np.where(young, rng.uniform(24, 72, n), np.clip(rng.normal(145, 32, n), 72, 228))
    male = rng.random(n) < 0.54
    pred = 127 + 0.75 * (truth - 127) + rng.normal(0, 10 + 0.04 * truth, n)
    return pred, truth, male


@pytest.mark.parametrize("seed", range(6))
def test_the_method_is_chosen_out_of_fold_so_a_small_young_band_still_decides(seed):
    # choosing by calibrations on halves of 600 merged the 2-6 y band away and picked age or true_age_sex in three of
    # these six draws, whose 2-6 y coverage on 4,000 more radiographs was then 82-85 %
    pred, truth, male = _rsna_like_validation(4600, seed)
    method, scores = choose_method(pred[:600], truth[:600], male[:600])
    assert method == "true_age", scores
    cal = IntervalCalibration(method, pred[:600].tolist(), truth[:600].tolist(), male[:600].tolist())
    report = coverage_report(cal, pred[600:], truth[600:], male[600:], 0.9)
    assert report["age_bands"]["2-6y"]["coverage"] >= 0.85 and 0.87 <= report["coverage"] <= 0.93  # 600: +-1.2 %
