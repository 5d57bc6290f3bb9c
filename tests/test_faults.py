"""Fault injection: damaged files bonedist wrote itself, kills and full disks at chosen points, hostile inputs.

Each class of fault gets several kinds of damage, written by the test; every one must end in one line naming the
file and the problem (no traceback), a non-zero exit where the command could not do its job, no number computed
from a damaged value, and the valid work of the same call kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bonedist import BonedistError
from tests.conftest import REPO, run_cli, run_train

pytestmark = pytest.mark.slow

TINY = ("--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "4")


def one_line_error(result, *needles: str) -> str:
    """The command failed with a user-facing line (exit 1 or 2) naming every needle, and no traceback."""
    err = result.stderr
    assert result.returncode in (1, 2), (result.returncode, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in err, (needle, err[-2000:])
    return err


@pytest.fixture
def evaluated(evaluated_pair) -> Path:
    """Two models trained briefly on the phantom pack and evaluated (report/ensemble.json, intervals.json); read
    only (``damaged`` is a copy to change)."""
    return evaluated_pair


@pytest.fixture
def damaged(evaluated, tmp_path) -> Path:
    """A private copy of the evaluated runs folder that a test may damage."""
    copy = tmp_path / "exp"
    shutil.copytree(evaluated, copy)
    return copy


def _image(train_shards: Path) -> Path:
    return next((train_shards.parent / "raw").rglob("*.png"))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- 1. run and report files: validated where they are read ---------------------------------------------------------

DAMAGES = {
    "weights sum to 7": ("report/ensemble.json", lambda p: _edit_json(
        p, lambda d: d["weights"]["fitted"].update({k: 3.5 for k in d["weights"]["fitted"]})), "sum to 7"),
    "a negative weight": ("report/ensemble.json", lambda p: _edit_json(
        p, lambda d: d["weights"].update(fitted={"xception": 1.5, "resnet50_patch": -0.5})), "at least 0"),
    "a weight of NaN": ("report/ensemble.json", lambda p: p.write_text(
        '{"weights": {"fitted": {"xception": NaN, "resnet50_patch": 0.5}}}'), "must be finite"),
    "an unknown member": ("report/ensemble.json", lambda p: _edit_json(
        p, lambda d: d["weights"].update(fitted={"xception": 0.5, "resnet18": 0.5})), "'weights.fitted.resnet18'"),
    "a cut ensemble.json": ("report/ensemble.json", _cut, "damaged JSON"),
    "an empty ensemble.json": ("report/ensemble.json", lambda p: p.write_text(""), "empty"),
    "a cut intervals.json": ("report/intervals.json", _cut, "damaged JSON"),
    "an unknown interval method": ("report/intervals.json", lambda p: _edit_json(
        p, lambda d: d["columns"]["ensemble_fitted"].update(method="magic")), "'magic'"),
    "a text among the calibration ages": ("report/intervals.json", lambda p: _edit_json(
        p, lambda d: d["columns"]["ensemble_fitted"]["truth"].__setitem__(3, "x")), "must be a number"),
    "sigma 0": ("xception/best/meta.json", lambda p: _edit_json(p, lambda d: d.update(sigma=0)), "'sigma'"),
    "a text for mu": ("xception/best/meta.json", lambda p: _edit_json(p, lambda d: d.update(mu="abc")), "'mu'"),
    "an input size of 0": ("xception/best/meta.json", lambda p: _edit_json(
        p, lambda d: d["spec"].update(input_size=0, image_size=0)), "image_size"),
    "a test-time view of 90 degrees": ("xception/best/meta.json", lambda p: _edit_json(
        p, lambda d: d.update(views=[[0.0, 1.0], [90.0, 1.0]])), "'views'"),
    "a cut meta.json": ("xception/best/meta.json", _cut, "damaged JSON"),
    "a cut model.safetensors": ("xception/best/model.safetensors", _cut, "does not load"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_run_or_report_file_is_refused_in_one_line(damaged, damage):
    from bonedist.eval.predict import Ensemble

    relative, apply, message = DAMAGES[damage]
    apply(damaged / relative)
    with pytest.raises(BonedistError, match=message) as caught:
        Ensemble(damaged)  # what predict builds before it reads an image
    assert relative.split("/")[-1] in str(caught.value) and "\n" not in str(caught.value)  # the file, one line


@pytest.mark.parametrize("damage", ["weights sum to 7", "a cut intervals.json", "sigma 0"])
def test_predict_refuses_a_damaged_file_with_no_answer_and_no_traceback(damaged, train_shards, damage):
    relative, apply, message = DAMAGES[damage]
    apply(damaged / relative)
    result = run_cli("predict", str(_image(train_shards)), "--sex", "F", "--runs", str(damaged), "--json")
    err = one_line_error(result, message)
    assert relative.split("/")[-1] in err  # the file is named
    assert "bone_age" not in result.stdout  # no answer from damaged numbers


def test_evaluate_keeps_the_good_model_when_another_best_is_damaged(damaged):
    _edit_json(damaged / "xception" / "best" / "meta.json", lambda d: d.update(sigma=0))
    result = run_cli("evaluate", "--runs", str(damaged), "--wandb", "off")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "xception left out" in result.stdout + result.stderr and "'sigma'" in result.stdout + result.stderr
    metrics = json.loads((damaged / "report" / "metrics.json").read_text())
    assert metrics["models"] == ["resnet50_patch"]


def test_report_files_are_replaced_atomically_while_a_reader_reads_them(tmp_path):
    from bonedist.files import read_json, write_json_atomic

    path = tmp_path / "intervals.json"
    write_json_atomic(path, {"n": 0, "values": list(range(20000))})
    torn, reads, stop = [], [0], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                read_json(path)
                reads[0] += 1
            except BonedistError as exc:
                torn.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(200):
        write_json_atomic(path, {"n": i, "values": list(range(20000 + i))})
    stop.set()
    thread.join()
    assert reads[0] > 0 and not torn, torn[:3]


# -- 2. shard contents verified where they are read ----------------------------------------------------------------


def _relabel_in_place(shards: Path, split: str = "test") -> tuple[Path, str]:
    """Change one digit of a sample's bone age inside a shard, keeping the file's size and modification time."""
    manifest = json.loads((shards / "manifest.json").read_text())
    shard = shards / manifest["splits"][split]["shards"][0]["name"]
    key, age, _ = manifest["splits"][split]["shards"][0]["samples"][0]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    needle = f'"boneage_months": {json.dumps(age)}'.encode()
    at = data.index(needle) + len(b'"boneage_months": ')
    data[at] = ord("1") if data[at] != ord("1") else ord("2")
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_size == stat.st_size and shard.stat().st_mtime_ns == stat.st_mtime_ns
    return shard, key


@pytest.mark.parametrize("mode", ["stream", "cache"])
def test_a_label_changed_inside_a_shard_is_caught_in_both_data_modes(evaluated, train_shards, tmp_path, mode):
    shards = tmp_path / "shards"
    shutil.copytree(train_shards, shards)
    cache_home = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = run_cli("evaluate", "--runs", str(evaluated), "--shards", str(shards), "--wandb", "off", "--out",
                    str(tmp_path / "before"), "--data-mode", mode, env=cache_home)
    assert first.returncode == 0, first.stderr[-2000:]  # the shards' checksums are now remembered
    shard, _ = _relabel_in_place(shards)
    result = run_cli("evaluate", "--runs", str(evaluated), "--shards", str(shards), "--wandb", "off", "--out",
                     str(tmp_path / "after"), "--data-mode", mode, env=cache_home)
    one_line_error(result, shard.name)
    assert not (tmp_path / "after" / "metrics.json").exists()


def test_the_stream_compares_each_label_with_the_manifest(train_shards, tmp_path):
    """Beneath the checksum: a shard whose label differs from the manifest fails as it is read."""
    from bonedist.data.manifest import load_manifest
    from bonedist.data.sampling import SplitIndex
    from bonedist.data.stream import EvalStream, ShardError, raise_shard_errors

    shards = tmp_path / "shards"
    shutil.copytree(train_shards, shards)
    shard, key = _relabel_in_place(shards)
    index = SplitIndex.from_manifest(load_manifest(shards), "test")
    with pytest.raises(ShardError, match=f"sample {key} is labelled .* in the shard but .* in manifest.json"):
        list(raise_shard_errors(iter(EvalStream(shards, index, batch_size=8))))


def test_a_hand_edited_manifest_is_refused_with_the_field(train_shards, tmp_path):
    from bonedist.data.manifest import load_manifest

    for edit, field in ((lambda m: m["splits"]["test"]["shards"][0].update(name="../../etc/passwd"), "name"),
                        (lambda m: m["splits"]["test"]["shards"][0]["samples"][0].__setitem__(1, -5), "bone age"),
                        (lambda m: m["splits"]["test"].update(count=999), "count"),
                        (lambda m: m.update(image_size=0), "image_size")):
        shards = tmp_path / f"shards-{field.replace(' ', '_')}"
        shutil.copytree(train_shards, shards)
        _edit_json(shards / "manifest.json", edit)
        with pytest.raises(BonedistError, match=field):
            load_manifest(shards)
    _cut(shards / "manifest.json")
    with pytest.raises(BonedistError, match="damaged JSON"):
        load_manifest(shards)


# -- 3. an experiment's runs evaluated on their own data -------------------------------------------------------------


def test_runs_trained_on_different_packs_are_not_mixed(evaluated, phantom_shards, train_shards, tmp_path):
    runs = tmp_path / "exp"
    shutil.copytree(evaluated / "xception", runs / "xception")
    result = run_train("--model", "resnet50_patch", "--shards", str(phantom_shards), "--preset", "tiny",
                       "--epochs", "1", "--steps-per-epoch", "2", "--experiment", "exp", runs=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli("evaluate", "--runs", str(runs), "--wandb", "off")
    one_line_error(result, "different packs", str(phantom_shards), str(train_shards))
    result = run_cli("predict", str(_image(train_shards)), "--sex", "M", "--runs", str(runs))
    one_line_error(result, "different packs")


# -- 4. every image's error is its own, DICOM included ----------------------------------------------------------------


def _hand() -> np.ndarray:
    from bonedist.data.synth import render_phantom

    return render_phantom(120.0, True, 320)


def _broken_dicoms(folder: Path) -> dict[str, str]:
    """Header defects real archives hold, each in its own file; returns file name → the kind of defect."""
    from tests.test_clinical import write_dicom

    pixels = np.full((200, 160), 1000, np.uint16)
    pixels[40:160, 40:120] = 3000
    kinds = {}
    write_dicom(folder / "width0.dcm", pixels, window=(2000.0, 0.0))
    kinds["width0.dcm"] = "window width"
    import pydicom

    write_dicom(folder / "window-text.dcm", pixels, window=(1234.5, 3000.0))
    data = (folder / "window-text.dcm").read_bytes()  # a text where the window centre's number belongs
    (folder / "window-text.dcm").write_bytes(data.replace(b"1234.5", b"abc.de"))
    kinds["window-text.dcm"] = "window"
    for name, edit in (("voi-function.dcm", lambda ds: setattr(ds, "VOILUTFunction", "MAGIC")),
                       ("bits.dcm", lambda ds: setattr(ds, "BitsStored", 40)),
                       ("rows.dcm", lambda ds: setattr(ds, "Rows", 4000)),
                       ("short-lut.dcm", _voi_lut([10, 0, 16], b"\x00\x01" * 2)),
                       ("empty-lut.dcm", _voi_lut([0, 0, 16], b""))):
        write_dicom(folder / name, pixels, window=(2000.0, 3000.0))
        ds = pydicom.dcmread(folder / name)
        edit(ds)
        ds.save_as(folder / name)
        kinds[name] = name
    write_dicom(folder / "slope-text.dcm", pixels, slope=1.25)
    data = (folder / "slope-text.dcm").read_bytes()  # a text where the rescale slope belongs
    (folder / "slope-text.dcm").write_bytes(data.replace(b"1.25", b"x.yz"))
    kinds["slope-text.dcm"] = "modality LUT"
    return kinds


def _voi_lut(descriptor: list[int], data: bytes):
    def edit(ds) -> None:
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        item = Dataset()
        item.LUTDescriptor, item.LUTData = descriptor, data
        ds.VOILUTSequence = Sequence([item])
        del ds.WindowCenter
        del ds.WindowWidth

    return edit


def test_malformed_dicoms_are_skipped_each_with_its_reason_and_the_rest_is_packed(phantom_copy, tmp_path):
    folder = phantom_copy / "boneage-training-dataset" / "boneage-training-dataset"
    assert folder.is_dir()
    kinds = _broken_dicoms(folder)
    import csv

    table = phantom_copy / "boneage-training-dataset.csv"
    rows = list(csv.reader(table.open()))
    header = rows[0]
    for i, name in enumerate(kinds):
        rows.append([str(9000 + i) if h.lower() == "id" else "120" if h.lower() == "boneage" else "True"
                     for h in header])
        (folder / name).rename(folder / f"{9000 + i}.dcm")
    with table.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "shards"
    result = run_cli("pack", str(phantom_copy), "--out", str(out), "--image-size", "64", "--workers", "1")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {Path(e["source"]).name: e["reason"] for e in manifest["skipped"]}
    assert {f"{9000 + i}.dcm" for i in range(len(kinds))} <= set(skipped), skipped
    assert "window width" in skipped["9000.dcm"]
    assert manifest["totals"]["packed"] == 40  # every phantom still packed


def test_predict_folder_gives_malformed_dicoms_their_line_and_the_radiographs_their_result(evaluated, train_shards,
                                                                                          tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    kinds = _broken_dicoms(folder)
    for i, image in enumerate(sorted((train_shards.parent / "raw").rglob("*.png"))[:3]):
        shutil.copy(image, folder / f"good-{i}.png")
    out = tmp_path / "results.csv"
    result = run_cli("predict", str(folder), "--sex", "F", "--runs", str(evaluated), "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{len(kinds)} of {len(kinds) + 3} image(s) failed" in result.stderr
    text = out.read_text()
    assert text.count("good-") == 3 and all(name in text for name in kinds)


def test_a_16_bit_radiograph_with_a_burned_in_marker_keeps_the_hands_gray_levels(tmp_path):
    from bonedist.data.dicom import decode_radiograph

    hand = _hand().astype(np.uint16) * 40  # 16-bit, the hand within 0-10200
    hand[5:25, 5:45] = 65535  # an "L" marker burned in at full white
    ok, png = cv2.imencode(".png", hand)
    image, _ = decode_radiograph(png.tobytes())
    assert len(np.unique(image[40:-40, 40:-40])) > 100  # min-max would leave about 40 levels
    from tests.test_clinical import write_dicom

    write_dicom(tmp_path / "marker.dcm", hand)
    image, _ = decode_radiograph((tmp_path / "marker.dcm").read_bytes())
    assert len(np.unique(image[40:-40, 40:-40])) > 100


def test_a_png_with_bytes_after_its_end_is_read(tmp_path):
    from bonedist.data.images import ImageError, decode_gray8

    ok, png = cv2.imencode(".png", _hand())
    image = decode_gray8(png.tobytes() + b"\x00trailer from an archive export" * 100)
    assert np.array_equal(image, _hand())
    with pytest.raises(ImageError, match="truncated"):
        decode_gray8(png.tobytes()[: len(png) - 20])


def test_every_reader_of_a_users_file_names_it_and_says_why(tmp_path):
    """`predict`, worklists, the bundle and the service share one checked decoder: one line, the name first."""
    from bonedist.data.dicom import read_radiograph
    from bonedist.eval.predict import load_radiograph
    from bonedist.serving.bundle import prepare

    ok, png = cv2.imencode(".png", _hand())
    image, facts = read_radiograph(png.tobytes(), "hand.png")
    assert np.array_equal(image, _hand()) and facts == {}
    blank = cv2.imencode(".png", np.full((64, 64), 128, np.uint8))[1].tobytes()
    cases = {"scan7": (b"not an image at all", "cannot read the image"),
             "cut.png": (png.tobytes()[: len(png) - 20], "cannot read the image: .*truncated"),
             "blank.png": (blank, "blank or near-constant image")}
    for name, (data, why) in cases.items():
        with pytest.raises(BonedistError, match=f"^{name}: {why}"):
            read_radiograph(data, name)
        with pytest.raises(BonedistError, match=f"^{name}: {why}"):
            prepare(data, name, {"image_size": 32, "resize_mode": "pad"})
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BonedistError, match=f"^{re.escape(str(tmp_path / name))}: {why}"):
            load_radiograph(tmp_path / name, 32, "pad")
    resized, _ = prepare(png.tobytes(), "hand.png", {"image_size": 32, "resize_mode": "pad"})
    assert resized.shape == (32, 32) and resized.dtype == np.uint8


# -- 5. faults leave the last good state and a log with each step once ---------------------------------------------


def _steps_and_epochs(run_dir: Path) -> tuple[list[int], list[int]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ([r["step"] for r in records if r["kind"] == "step"], [r["epoch"] for r in records if r["kind"] == "epoch"])


STEPPED = ("--model", "xception", "--preset", "tiny", "--steps-per-epoch", "4", "--log-every", "1",
           "--checkpoint-every", "2", "--keep-last", "5")


def test_a_kill_during_the_last_checkpoint_write_repeats_no_log_line(train_shards, tmp_path):
    args = (*STEPPED, "--epochs", "2", "--shards", str(train_shards))
    result = run_train(*args, runs=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "default" / "xception"
    # what a kill while the epoch's checkpoint was written leaves: its line logged, the folder still temporary
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    last.rename(last.with_name(f".tmp-{last.name}"))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "step", "epoch": 3, "st')  # and a torn line of what came after
    result = run_train(*args, runs=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torn" in result.stdout + result.stderr
    steps, epochs = _steps_and_epochs(run_dir)
    assert steps == list(range(1, 9)) and epochs == [1, 2]


def test_a_full_disk_at_a_checkpoint_then_a_rerun_logs_each_step_once(train_shards, tmp_path):
    args = (*STEPPED, "--epochs", "2", "--shards", str(train_shards))
    full = run_train(*args, runs=tmp_path, max_file_bytes=2_000_000)  # the optimizer state does not fit
    err = one_line_error(full, "cannot write")
    assert "re-run the same command" in err
    result = run_train(*args, runs=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    steps, epochs = _steps_and_epochs(tmp_path / "default" / "xception")
    assert steps == list(range(1, 9)) and epochs == [1, 2]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(train_shards, tmp_path):
    args = (*STEPPED, "--epochs", "1", "--shards", str(train_shards))
    result = run_train(*args, runs=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "default" / "xception"
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    _cut(newest / "model.safetensors")
    result = run_train(*STEPPED, "--epochs", "2", "--shards", str(train_shards), runs=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert f"checkpoint {newest} is damaged" in out and "resumed from" in out and "step-00000002" in out
    assert (run_dir / "checkpoints" / f"damaged-{newest.name}").is_dir()
    steps, epochs = _steps_and_epochs(run_dir)
    assert steps == list(range(1, 9)) and epochs == [1, 2]


def test_after_a_diverged_step_the_advice_printed_resumes_with_the_new_rate(train_shards, tmp_path):
    base = ("--model", "xception", "--preset", "tiny", "--steps-per-epoch", "4", "--log-every", "1",
            "--shards", str(train_shards), "--scheduler", "constant")
    good = run_train(*base, "--epochs", "1", runs=tmp_path)
    assert good.returncode == 0, good.stderr[-2000:]
    diverged = run_train(*base, "--epochs", "3", "--lr", "1e30", runs=tmp_path)
    err = one_line_error(diverged, "non-finite training loss", "step-00000004", "--lr 5e+29")
    assert "resuming with --lr 1e+30" in diverged.stdout + diverged.stderr
    resumed = run_train(*base, "--epochs", "2", "--lr", "1e-4", runs=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr and "step-00000004" in resumed.stdout + resumed.stderr
    records = [json.loads(line) for line in
               (tmp_path / "default" / "xception" / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in records if r["kind"] == "step" and r["step"] > 4]
    assert after and all(r["lr"] == pytest.approx(1e-4) for r in after), err
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]


def test_a_resumed_training_continues_its_one_wandb_run_and_logs_each_step_once(train_shards, tmp_path):
    from tests.wandb_reader import read_history

    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    base = (*STEPPED, "--shards", str(train_shards), "--wandb", "offline")
    for epochs in ("1", "2"):
        result = run_train(*base, "--epochs", epochs, runs=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "default" / "xception"
    run_id = (run_dir / "wandb-run-id").read_text().strip()
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(f"-{run_id}" in a.name for a in attempts), attempts
    rows = [row for attempt in attempts for row in read_history(attempt)]
    assert sorted(r["step"] for r in rows if "train_loss_step" in r) == list(range(1, 9))
    assert sorted(r["epoch"] for r in rows if "val_loss" in r) == [1, 2]
    fresh = run_train(*base, "--epochs", "1", "--resume", "never", runs=tmp_path, env=env)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert (run_dir / "wandb-run-id").read_text().strip() != run_id  # a new training, a new run
    assert _steps_and_epochs(run_dir) == (list(range(1, 5)), [1])  # and a log of its own


def test_a_torn_last_metrics_line_is_dropped_with_a_line_when_read(tmp_path):
    from bonedist.tracking import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "epoch", "epoch": 1, "step": 4}\n{"kind": "epoch", "epoch": 2, "st')
    said = []
    assert read_metrics(path, said.append) == [{"kind": "epoch", "epoch": 1, "step": 4}]
    assert said and "line 2 is torn" in said[0]
    path.write_text('{"kind": "epoch"\n{"kind": "epoch", "epoch": 2, "step": 8}\n')
    with pytest.raises(BonedistError, match="line 1 is not a JSON object"):
        read_metrics(path)


# -- 7. inputs as archives hold them -------------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [("", "is empty"), ("image,sex\n", "no rows")])
def test_an_empty_or_header_only_worklist_is_an_error(evaluated, tmp_path, content, message):
    table = tmp_path / "worklist.csv"
    table.write_text(content)
    one_line_error(run_cli("predict", "--table", str(table), "--runs", str(evaluated)), message, "worklist.csv")


def test_worklist_paths_outside_the_image_folder_are_refused_per_row(evaluated, train_shards, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(_image(train_shards), images / "inside.png")
    shutil.copy(_image(train_shards), tmp_path / "outside.png")
    table = tmp_path / "worklist.csv"
    table.write_text("image,sex\ninside.png,F\n../outside.png,F\n")
    result = run_cli("predict", "--table", str(table), "--image-dir", str(images), "--runs", str(evaluated),
                     "--out", str(tmp_path / "out.csv"))
    assert result.returncode == 1 and "leads outside" in result.stderr and "Traceback" not in result.stderr
    assert "1 of 2 image(s) failed" in result.stderr
    allowed = run_cli("predict", "--table", str(table), "--image-dir", str(images), "--runs", str(evaluated),
                      "--out", str(tmp_path / "out2.csv"), "--allow-outside-image-dir")
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def test_file_names_archives_hold_are_read_and_written_back(evaluated, train_shards, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    names = [b"hand-\xff\xfe.png", b"with space.png", b"bang!.png", b"#hash.png", b"-dash.png"]
    for name in names:
        shutil.copy(_image(train_shards), os.path.join(os.fsencode(folder), name))
    out = tmp_path / "results.csv"
    result = run_cli("predict", str(folder), "--sex", "F", "--runs", str(evaluated), "--out", str(out))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    written = out.read_bytes()
    for name in names:
        assert name in written, name
    rows = json.loads(out.with_suffix(".json").read_text())
    assert sorted(os.fsencode(r["image"]).rsplit(b"/", 1)[-1] for r in rows) == sorted(names)


def test_pack_reads_file_names_archives_hold(tmp_path):
    """A DICOM export whose names hold bytes that are not UTF-8, spaces, "!" (bonedist's zip-member separator),
    "#" or a leading dash: every file packed, and the shards read back in both data modes."""
    from bonedist.data.cache import DeviceCache
    from bonedist.data.manifest import load_manifest
    from bonedist.data.sampling import SplitIndex
    from bonedist.data.stream import EvalStream, raise_shard_errors
    from tests.test_clinical import write_dicom

    src = tmp_path / "export"
    src.mkdir()
    names = [b"hand-\xff\xfe.dcm", b"with space.dcm", b"bang!.dcm", b"#hash.dcm", b"-dash.dcm"]
    for i, name in enumerate(names):
        write_dicom(src / "x.dcm", _hand().astype(np.uint16) * (8 + i), bits=12, sex="MF"[i % 2], age="008Y")
        os.rename(os.fsencode(src / "x.dcm"), os.path.join(os.fsencode(src), name))
    result = run_cli("pack", str(src), "--out", str(tmp_path / "shards"), "--image-size", "64", "--workers", "1")
    assert result.returncode == 0 and "skipped 0" in result.stdout + result.stderr, result.stderr[-2000:]
    index = SplitIndex.from_manifest(load_manifest(tmp_path / "shards"), "test")
    batches = list(raise_shard_errors(iter(EvalStream(tmp_path / "shards", index, batch_size=8))))
    assert sum(len(b["key"]) for b in batches) == 5
    assert DeviceCache(tmp_path / "shards", index, "cpu", 64, progress=False).images.shape[0] == 5


def test_one_radiograph_in_two_splits_is_reported_at_pack_time(phantom_copy, tmp_path):
    train = sorted((phantom_copy / "boneage-training-dataset").rglob("*.png"))
    victim = sorted((phantom_copy / "boneage-test-dataset").glob("*.png"))[0]
    shutil.copy(train[0], victim)
    out = tmp_path / "shards"
    result = run_cli("pack", str(phantom_copy), "--out", str(out), "--image-size", "64", "--workers", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "one radiograph in several splits (identical file)" in result.stderr
    assert train[0].name in result.stderr and victim.name in result.stderr
    duplicates = json.loads((out / "manifest.json").read_text())["duplicates"]
    assert any(d["across_splits"] and d["kind"] == "identical file" for d in duplicates)


# -- 8. exact resume in both data modes ----------------------------------------------------------------------------


@pytest.mark.parametrize("workers, extra", [(0, []), (2, []), (0, ["--mixup", "0.4"])],
                         ids=["workers0", "workers2", "mixup"])
def test_a_stream_mode_run_stopped_mid_epoch_resumes_bit_identical(train_shards, tmp_path, workers, extra):
    args = ["--model", "xception", "--preset", "tiny", "--image-size", "64", "--epochs", "2",
            "--steps-per-epoch", "8", "--batch-size", "4", "--data-mode", "stream", "--workers", str(workers),
            "--log-every", "1", "--sync-every", "1", "--shards", str(train_shards), *extra]
    reference = run_train(*args, runs=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    runs = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "bonedist.train", "--runs-dir", str(runs), "--wandb", "off", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = runs / "default" / "xception" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 or "stopped by a signal" in stderr, stderr[-2000:]
    run_dir = runs / "default" / "xception"
    stopped_at = sorted((run_dir / "checkpoints").glob("step-*"))[-1].name
    assert stopped_at not in ("step-00000008", "step-00000016"), "stopped mid-epoch"
    resumed = run_train(*args, runs=runs)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    last = lambda d: load_file(str(sorted((d / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))  # noqa: E731
    expected, got = last(tmp_path / "reference" / "default" / "xception"), last(run_dir)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    steps, epochs = _steps_and_epochs(run_dir)
    assert steps == list(range(1, 17)) and epochs == [1, 2]
