"""Packing: bad input is skipped and listed, packs are byte-identical, shards round-trip, interrupted packs resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from bonedist.data.images import decode_gray8, resize_square
from bonedist.data.layouts import read_source, read_table
from bonedist.data.manifest import load_manifest, verify_shards
from bonedist.data.pack import PackOptions, pack_dataset
from tests.conftest import RSNA_SAMPLE, run_cli

OPTS = dict(size=64, samples_per_shard=8, workers=1, progress=False)


def _tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_bad_inputs_are_skipped_listed_and_the_rest_packed(phantom_copy, tmp_path):
    train = phantom_copy / "boneage-training-dataset" / "boneage-training-dataset"
    csv = phantom_copy / "boneage-training-dataset.csv"
    good = sorted(train.glob("*.png"))
    (train / good[0].name).unlink()                                   # missing file
    data = good[1].read_bytes()
    good[1].write_bytes(data[: len(data) // 2])                       # truncated PNG
    good[2].write_bytes(b"")                                          # zero bytes
    good[3].write_bytes(b"id,boneage\n1,2\n")                         # not an image
    good[4].write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300) + b"IEND\xaeB`\x82")  # corrupt
    lines = csv.read_text().splitlines()
    ids = [line.split(",")[0] for line in lines[1:]]
    lines.append(f"{ids[5]},100,True")                                # duplicate id
    lines[7] = f"{ids[6]},,True"                                      # missing age
    lines[8] = f"{ids[7]},ten,True"                                   # invalid age
    lines[9] = f"{ids[8]},100,maybe"                                  # invalid sex
    lines[10] = f"{ids[9]},300,False"                                 # age out of range
    csv.write_text("\n".join(lines) + "\n")

    manifest, code = pack_dataset(phantom_copy, tmp_path / "out", PackOptions(**OPTS))
    assert code == 0
    reasons = {entry["source"].split("/")[-1]: entry["reason"] for entry in manifest["skipped"]}
    text = "\n".join(f"{k}: {v}" for k, v in reasons.items())
    for expected in ("not found", "truncated PNG", "empty file", "not a PNG or JPEG", "corrupt image",
                     "duplicate id", "missing bone age", "invalid bone age 'ten'", "invalid sex 'maybe'",
                     "outside 0-240"):
        assert expected in text, f"{expected!r} missing from skipped:\n{text}"
    assert manifest["splits"]["train"]["count"] == 24 - 9
    assert manifest["totals"] == {"packed": 15 + 8 + 8, "skipped": 10}
    # rows are named by file and line
    assert any(s["source"] == "boneage-training-dataset.csv row 8" for s in manifest["skipped"])


def test_nothing_valid_or_strict_fails_without_manifest(phantom_copy, tmp_path):
    manifest, code = pack_dataset(phantom_copy, tmp_path / "ok", PackOptions(**OPTS, strict=True))
    assert code == 0  # strict with nothing skipped is fine
    first = sorted((phantom_copy / "boneage-training-dataset" / "boneage-training-dataset").glob("*.png"))[0]
    first.write_bytes(b"")
    _, code = pack_dataset(phantom_copy, tmp_path / "strict", PackOptions(**OPTS, strict=True))
    assert code == 1 and not (tmp_path / "strict" / "manifest.json").exists()
    for png in phantom_copy.rglob("*.png"):
        png.write_bytes(b"junk")
    (phantom_copy / "boneage-validation-dataset-1.zip").unlink()
    (phantom_copy / "boneage-validation-dataset-2.zip").unlink()
    _, code = pack_dataset(phantom_copy, tmp_path / "none", PackOptions(**OPTS))
    assert code == 1 and not (tmp_path / "none" / "manifest.json").exists()


def test_repeat_packs_are_byte_identical_whatever_the_workers(phantom_root, tmp_path):
    pack_dataset(phantom_root, tmp_path / "a", PackOptions(**OPTS))
    pack_dataset(phantom_root, tmp_path / "b", PackOptions(**{**OPTS, "workers": 2}))
    a, b = _tar_bytes(tmp_path / "a"), _tar_bytes(tmp_path / "b")
    assert a and a == b
    # equal-sized shards named {split}-{000000}.tar
    assert sorted(a) == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar",
                         "validation-000000.tar"]
    # a re-run into the same folder keeps the same bytes (and does not duplicate samples)
    manifest, _ = pack_dataset(phantom_root, tmp_path / "a", PackOptions(**OPTS))
    assert _tar_bytes(tmp_path / "a") == b and manifest["splits"]["train"]["count"] == 24


def test_round_trip_through_webdataset(phantom_root, phantom_shards):
    manifest = load_manifest(phantom_shards)
    records = {r["key"]: r for r in read_table(phantom_root).records.to_dict("records")}
    urls = [str(phantom_shards / s["name"]) for s in manifest["splits"]["validation"]["shards"]]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):  # raw bytes, no pickle decoding
        meta = json.loads(sample["json"])
        record = records[sample["__key__"]]
        pixels = cv2.imdecode(np.frombuffer(sample["png"], np.uint8), cv2.IMREAD_UNCHANGED)
        expected, _ = resize_square(decode_gray8(read_source(phantom_root, record["source"])), 96, "pad")
        assert pixels.dtype == np.uint8 and pixels.ndim == 2 and np.array_equal(pixels, expected)
        assert meta["boneage_months"] == record["boneage_months"] and meta["male"] == record["male"]
        assert meta["split"] == "validation" and meta["resize_mode"] == "pad" and meta["id"] == record["id"]
        seen += 1
    assert seen == manifest["splits"]["validation"]["count"] == 8


def test_manifest_counts_checksums_and_stats(phantom_shards):
    manifest = load_manifest(phantom_shards)
    assert manifest["image_size"] == 96 and manifest["resize_mode"] == "pad"
    for info in manifest["splits"].values():
        assert info["count"] == sum(s["count"] for s in info["shards"])
        age = info["age"]
        assert age["male"]["n"] + age["female"]["n"] == info["count"]
        assert sum(age["all"]["hist"]["counts"]) == info["count"]
        assert 0 < age["all"]["mean"] < 240
    assert verify_shards(phantom_shards, manifest) == []
    assert {"bonedist_version", "source_root", "created", "skipped"} <= set(manifest)


def test_inspect_detects_a_damaged_shard(phantom_root, tmp_path):
    out = tmp_path / "out"
    pack_dataset(phantom_root, out, PackOptions(**OPTS))
    result = run_cli("inspect", str(out), "--grid", str(tmp_path / "grid.png"))
    assert result.returncode == 0, result.stderr
    assert "verified 5/5 shards" in result.stdout
    grid = cv2.imread(str(tmp_path / "grid.png"), cv2.IMREAD_GRAYSCALE)
    assert grid is not None and grid.shape[1] > 500
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run_cli("inspect", str(out))
    assert result.returncode == 1 and "train-000001.tar: sha256 mismatch" in result.stderr


def test_cli_errors_are_one_clear_line(tmp_path):
    result = run_cli("pack", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("pack", str(tmp_path), "--image-size", "5")
    assert result.returncode == 2 and "--image-size" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 2 and "manifest.json not found" in result.stderr
    result = run_cli("pack", str(tmp_path), "--splits", "train,holdout")
    assert result.returncode == 2 and "holdout" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_pack_resumes_to_the_same_bytes(tmp_path, sig):
    from bonedist.data.synth import synth_dataset

    root = tmp_path / "data"
    synth_dataset(root, n=160, n_val=4, n_test=4, seed=2, size=768, workers=2, progress=False)
    reference = tmp_path / "reference"
    pack_dataset(root, reference, PackOptions(size=128, samples_per_shard=10, workers=1, progress=False))

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bonedist", "pack", str(root), "--out", str(out), "--image-size", "128",
           "--samples-per-shard", "10", "--workers", "1", "--quiet"]
    # a suite started in the background (`make test &`) inherits SIGINT ignored, and so would the pack: give it the
    # disposition of a foreground command, where Ctrl-C reaches it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = out / ".pack-state.json"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until at least three shards are complete, then interrupt
        try:
            if len(json.loads(state.read_text())["splits"].get("train", [])) >= 3:
                break
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the pack finished before it could be interrupted"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "re-run the same command to resume" in stderr
        assert "Traceback" not in stderr
    assert not (out / "manifest.json").exists()
    done = json.loads(state.read_text())["splits"]["train"]
    assert 3 <= len(done) < 16

    result = run_cli("pack", str(root), "--out", str(out), "--image-size", "128", "--samples-per-shard", "10",
                     "--workers", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert _tar_bytes(out) == _tar_bytes(reference)
    manifest = load_manifest(out)
    assert manifest["splits"]["train"]["count"] == 160
    with tarfile.open(out / "train-000000.tar") as tar:
        assert len(tar.getnames()) == 20  # 10 samples x (png, json), nothing duplicated
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_a_full_disk_stops_the_pack_with_one_line_and_a_rerun_finishes_it(tmp_path):
    from bonedist.data.synth import synth_dataset

    root = tmp_path / "data"
    synth_dataset(root, n=30, n_val=4, n_test=4, seed=3, size=256, workers=1, progress=False)
    reference = tmp_path / "reference"
    pack_dataset(root, reference, PackOptions(size=128, samples_per_shard=10, workers=1, progress=False))
    smallest = min(p.stat().st_size for p in reference.glob("*.tar"))
    out = tmp_path / "out"
    args = ["pack", str(root), "--out", str(out), "--image-size", "128", "--samples-per-shard", "10", "--workers", "2",
            "--quiet"]
    full = run_cli(*args, max_file_bytes=smallest // 2)  # no shard fits: the write fails as on a full disk
    assert full.returncode == 2, full.stderr
    assert "cannot write" in full.stderr and "train-000000.tar.tmp" in full.stderr and "GiB free" in full.stderr
    assert "re-run the same command" in full.stderr and "Traceback" not in full.stderr
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert _tar_bytes(out) == _tar_bytes(reference)


@pytest.mark.realdata
def test_real_rsna_sample_packs_completely(tmp_path):
    manifest, code = pack_dataset(RSNA_SAMPLE, tmp_path / "rsna", PackOptions(size=256, workers=2, progress=False))
    assert code == 0 and manifest["skipped"] == []
    train = manifest["splits"]["train"]
    assert train["count"] == 26 and train["age"]["male"]["n"] == 13 and train["age"]["female"]["n"] == 13
    assert train["age"]["all"]["min"] == 15 and train["age"]["all"]["max"] == 204
    urls = [str(tmp_path / "rsna" / s["name"]) for s in train["shards"]]
    sample = next(iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False)))
    meta = json.loads(sample["json"])
    assert meta["orig_height"] > 300 and meta["size"] == 256


def _rsna_official_layout(root: Path) -> dict[str, list[str]]:
    """The real sample radiographs laid out as RSNA distributes them: 20 in `Bone Age Training Set` (train.csv),
    6 in `Bone Age Test Set/Test Set Images` with `Bone age ground truth.xlsx`."""
    import pandas as pd

    table = pd.read_csv(RSNA_SAMPLE / "boneage-training-dataset.csv", dtype=str)
    train, test = table.iloc[:20], table.iloc[20:]
    folders = {"train": root / "Bone Age Training Set" / "boneage-training-dataset",
               "test": root / "Bone Age Test Set" / "Test Set Images"}
    for split, rows in (("train", train), ("test", test)):
        folders[split].mkdir(parents=True)
        for image_id in rows["id"]:
            (folders[split] / f"{image_id}.png").write_bytes(
                (RSNA_SAMPLE / "boneage-training-dataset" / f"{image_id}.png").read_bytes())
    train.to_csv(root / "Bone Age Training Set" / "train.csv", index=False)
    pd.DataFrame({"Case ID": test["id"].astype(int), "Sex": ["M" if m == "True" else "F" for m in test["male"]],
                  "Ground truth bone age (months)": test["boneage"].astype(float) + 0.25}).to_excel(
        root / "Bone Age Test Set" / "Bone age ground truth.xlsx", index=False)
    return {"train": list(train["id"]), "test": list(test["id"])}


@pytest.mark.realdata
def test_the_official_rsna_test_layout_packs_its_labelled_test_split(tmp_path):
    ids = _rsna_official_layout(tmp_path / "rsna")
    manifest, code = pack_dataset(tmp_path / "rsna", tmp_path / "out", PackOptions(size=128, workers=2,
                                                                                    progress=False))
    assert code == 0 and manifest["skipped"] == []
    test = manifest["splits"]["test"]
    assert test["count"] == test["labeled"] == 6
    assert sorted(s[0] for shard in test["shards"] for s in shard["samples"]) == sorted(ids["test"])
    assert manifest["splits"]["train"]["count"] == 20
    # the same table without its images: an error naming the table, not a silently missing split
    for png in (tmp_path / "rsna" / "Bone Age Test Set" / "Test Set Images").glob("*.png"):
        png.unlink()
    result = run_cli("pack", str(tmp_path / "rsna"), "--out", str(tmp_path / "out2"), "--image-size", "64", "--quiet")
    assert result.returncode == 1 and not (tmp_path / "out2" / "manifest.json").exists()
    assert "Bone age ground truth.xlsx: none of its 6 images was found" in result.stderr


def test_hostile_inputs_pack_exactly_the_valid_images(tmp_path):
    """16-bit, palette, RGB and gray+alpha PNGs pack; a 1x1, a blank and an all-white image, a duplicate id and
    a row of a BOM-prefixed CSV with extra columns are handled, every rejection listed with its reason."""
    from PIL import Image

    root = tmp_path / "root"
    folder = root / "boneage-training-dataset"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    hand = (rng.random((120, 100)) * 200 + 20).astype(np.uint8)  # textured: anything but a flat tone
    cv2.imwrite(str(folder / "1.png"), hand.astype(np.uint16) * 257)                    # 16-bit
    Image.fromarray(hand).convert("P").save(folder / "2.png")                          # palette
    cv2.imwrite(str(folder / "3.png"), np.dstack([hand, hand // 2, hand]))             # RGB
    Image.fromarray(np.dstack([hand, np.full_like(hand, 255)]), "LA").save(folder / "4.png")  # gray + alpha
    cv2.imwrite(str(folder / "5.png"), np.zeros((1, 1), np.uint8))                     # 1x1
    cv2.imwrite(str(folder / "6.png"), np.zeros((500, 600), np.uint8))                 # blank
    cv2.imwrite(str(folder / "7.png"), np.full((500, 600), 255, np.uint8))             # all white
    rows = ["id,boneage,male,site,notes", "1,100,True,a,x", "2,110,False,b,", "3,120,True,c,y", "4,130,False,d,",
            "5,140,True,e,", "6,150,False,f,", "7,160,True,g,", "2,111,True,h,dup"]
    (root / "boneage-training-dataset.csv").write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n")
    manifest, code = pack_dataset(root, tmp_path / "out", PackOptions(**OPTS))
    assert code == 0
    samples = manifest["splits"]["train"]["shards"][0]["samples"]
    assert sorted(s[0] for s in samples) == ["1", "2", "3", "4"]
    reasons = {entry["source"]: entry["reason"] for entry in manifest["skipped"]}
    assert len(reasons) == 4, reasons
    assert "too small (1x1" in reasons[f"{folder.name}/5.png"]
    assert "blank or near-constant" in reasons[f"{folder.name}/6.png"]
    assert "blank or near-constant" in reasons[f"{folder.name}/7.png"]
    assert "duplicate id 2" in reasons["boneage-training-dataset.csv row 9"]
