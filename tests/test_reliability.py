"""Nothing lost to one bad file, a second job or changed data: bounded decoding, run locks, data-checked resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest

from bonedist.data.images import ImageError, decode_gray8, header_size
from tests.conftest import RSNA_SAMPLE, epoch_records, run_train


def bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\0" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_the_header_is_read_before_any_pixel_is_decoded():
    import cv2
    import numpy as np

    assert header_size(bomb_png(40000, 40000)) == (40000, 40000)
    ok, jpeg = cv2.imencode(".jpg", np.zeros((30, 50), np.uint8))
    assert header_size(jpeg.tobytes()) == (50, 30)
    with pytest.raises(ImageError, match="40000x40000 pixels \\(1600 megapixels\\) is over the 64-megapixel limit"):
        decode_gray8(bomb_png(40000, 40000))
    with pytest.raises(ImageError, match="over the 64-megapixel limit"):
        decode_gray8(bomb_png(32000, 32000))  # just under OpenCV's own limit: refused without a 1 GB decode


@pytest.mark.slow
@pytest.mark.realdata
def test_a_decompression_bomb_beside_real_radiographs_is_skipped_with_its_size(tmp_path):
    root = tmp_path / "data"
    (root / "boneage-training-dataset").mkdir(parents=True)
    images = sorted((RSNA_SAMPLE / "boneage-training-dataset").glob("*.png"))[:5]
    rows = ["id,boneage,male"]
    for i, image in enumerate(images):
        shutil.copy(image, root / "boneage-training-dataset" / f"{i + 1}.png")
        rows.append(f"{i + 1},{60 + 20 * i},{'True' if i % 2 else 'False'}")
    (root / "boneage-training-dataset" / "99.png").write_bytes(bomb_png(40000, 40000))
    (root / "boneage-training-dataset" / "98.png").write_bytes(bomb_png(32000, 32000))
    rows += ["99,100,True", "98,100,False"]
    (root / "boneage-training-dataset.csv").write_text("\n".join(rows) + "\n")
    # the pack's peak memory (it and its 2 workers: the largest of them) from a wrapper that waits for it
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    exe = os.path.join(os.path.dirname(sys.executable), "bonedist")
    result = subprocess.run([sys.executable, "-c", wrapper, exe, "pack", str(root), "--out", str(tmp_path / "shards"),
                             "--image-size", "64", "--workers", "2", "--quiet"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 5
    skipped = {s["source"].rsplit("/", 1)[-1]: s["reason"] for s in manifest["skipped"]}
    assert "40000x40000 pixels" in skipped["99.png"] and "32000x32000 pixels" in skipped["98.png"], skipped
    peak_gb = int(result.stdout.split("PEAK_KB")[1].split()[0]) / 2**20
    assert peak_gb < 1.0, peak_gb


@pytest.mark.slow
def test_a_second_training_into_the_same_run_folder_is_refused_and_a_killed_ones_lock_is_taken_over(
        train_shards, tmp_path):
    args = ["--model", "xception", "--shards", str(train_shards), "--preset", "tiny", "--steps-per-epoch", "6",
            "--log-every", "1"]
    cmd = [sys.executable, "-m", "bonedist.train", "--runs-dir", str(tmp_path), "--wandb", "off", *args,
           "--epochs", "2"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run = tmp_path / "default" / "xception"
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and first.poll() is None):
        time.sleep(0.2)
    second = run_train(*args, "--epochs", "2", runs=tmp_path)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert "is being trained by another process (pid" in second.stderr and str(first.pid) in second.stderr
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"kind": "step"' in line]
    assert steps == sorted(set(steps)) and len(steps) == 12  # each step once: the second run wrote nothing
    # a run killed outright leaves its lock file behind; the next run takes it over and says so
    killed = subprocess.Popen(cmd[:-1] + ["4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and max(json.loads(line)["step"] for line in
                                         (run / "metrics.jsonl").read_text().splitlines()) < 14:
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    again = run_train(*args, "--epochs", "4", runs=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"took over the lock of {run} left by pid {killed.pid}" in again.stdout + again.stderr
    assert [r["epoch"] for r in epoch_records(run)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_refuses_a_repacked_folder_and_another_models_checkpoint(phantom_root, tmp_path):
    from bonedist.data.pack import PackOptions, pack_dataset

    shards = tmp_path / "shards"
    assert pack_dataset(phantom_root, shards, PackOptions(size=64, samples_per_shard=8, progress=False))[1] == 0
    args = ["--model", "xception", "--shards", str(shards), "--preset", "tiny", "--steps-per-epoch", "2"]
    first = run_train(*args, "--epochs", "1", runs=tmp_path / "runs")
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "runs" / "default" / "xception"
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    shutil.rmtree(shards)  # re-packed at another size into the same folder
    assert pack_dataset(phantom_root, shards, PackOptions(size=48, samples_per_shard=8, progress=False))[1] == 0
    again = run_train(*args, "--epochs", "2", runs=tmp_path / "runs")
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert "cannot resume" in again.stderr and "image size 64 → 48" in again.stderr
    assert "--allow-changed-data" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file() and p.name != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}  # nothing written
    allowed = run_train(*args, "--epochs", "2", "--allow-changed-data", runs=tmp_path / "runs")
    assert allowed.returncode == 0 and "resuming although image size 64 → 48" in allowed.stdout + allowed.stderr
    notes = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"note"' in line]
    assert notes and notes[0]["resumed_on_changed_data"] == ["image size 64 → 48"]
    foreign = run_train("--model", "resnet50_patch", "--shards", str(shards), "--preset", "tiny", "--epochs", "1",
                        "--resume", str(run / "checkpoints" / "step-00000004"), runs=tmp_path / "runs")
    assert foreign.returncode == 2 and "Traceback" not in foreign.stderr, foreign.stderr[-2000:]
    assert "cannot resume resnet50_patch from" in foreign.stderr and "checkpoint of xception" in foreign.stderr


@pytest.mark.parametrize("outcome", ["ok", "user error"])
def test_a_command_leaves_no_process_group_alive_however_it_ends(tmp_path, outcome):
    """A gloo group left alive at exit can abort the process in teardown (SIGABRT, "terminate called without an
    active exception") after its work is done, failing the whole launch: every CLI command destroys it."""
    import torch.distributed as dist

    from bonedist import BonedistError, run_command

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    def command():
        dist.barrier()
        if outcome != "ok":
            raise BonedistError("bad flag")
        return 0

    assert run_command("evaluate", command) == (0 if outcome == "ok" else 2)
    assert not dist.is_initialized()
