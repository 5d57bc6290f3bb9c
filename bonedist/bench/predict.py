"""``bonedist bench predict``: radiographs per second of a worklist (``bonedist predict --table``: the models loaded
once, decoding workers, batches) beside one ``bonedist predict IMAGE`` call per radiograph (what a shell loop over
an archive does), measured in the same run on the same images and ensemble.

Both are timed as a user runs them, from the command's start to its exit: the worklist pays its start and model
loading once, each single call pays them every time. The images are a folder's PNG, JPEG and DICOM files
(``--images``; default: the real sample radiographs next to the repository, else synthetic phantoms at 512 px),
cycled to ``--n`` worklist rows.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bonedist import BonedistError
from bonedist.data.images import IMAGE_SUFFIXES

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "rsna-sample" / "boneage-training-dataset"


def _images(folder: Path | None, scratch: Path) -> list[Path]:
    if folder is None and SAMPLE.is_dir():
        folder = SAMPLE
    if folder is None:
        from bonedist.data.synth import synth_dataset

        synth_dataset(scratch / "phantoms", n=24, n_val=0, n_test=0, seed=0, size=512, workers=1, progress=False)
        folder = scratch / "phantoms"
    images = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise BonedistError(f"--images {folder}: no PNG, JPEG or DICOM files in it")
    return images


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bonedist", "predict", *args]


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise BonedistError(f"{' '.join(cmd[2:6])} ... failed (exit {done.returncode}): "
                            f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    return seconds


def bench_predict(runs: str | Path, images: str | Path | None = None, n: int = 1000, single: int = 20,
                  batch_size: int = 32, workers: int = 2) -> dict:
    """Time ``n`` worklist rows in one ``predict --table`` call and ``single`` one-image calls; print both rates
    and the ratio."""
    from bonedist.eval.runs import find_runs

    found, _ = find_runs(runs)  # a clear error before anything is timed
    if n < 1 or single < 1:
        raise BonedistError(f"--n and --single must be positive, got {n} and {single}")
    with tempfile.TemporaryDirectory(prefix="bonedist-bench-predict-") as tmp:
        scratch = Path(tmp)
        files = _images(Path(images) if images else None, scratch)
        table = scratch / "worklist.csv"
        folder = Path(os.path.commonpath([f.resolve().parent for f in files]))  # the table's paths stay inside it
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "sex"])
            for i in range(n):
                writer.writerow([files[i % len(files)].resolve().relative_to(folder).as_posix(), "MF"[i % 2]])
        print(f"predict with {', '.join(found)} from {runs}: {n} worklist rows of {len(files)} images vs "
              f"{single} single calls")
        worklist_s = _run(_command("--table", str(table), "--image-dir", str(folder), "--runs", str(runs),
                                   "--out", str(scratch / "out.csv"),
                                   "--batch-size", str(batch_size), "--workers", str(workers)))
        single_s = 0.0
        for i in range(single):
            single_s += _run(_command(str(files[i % len(files)]), "--sex", "MF"[i % 2], "--runs", str(runs)))
    result = {"models": list(found), "n": n, "single_calls": single, "worklist_s": worklist_s,
              "worklist_per_s": n / worklist_s, "single_s": single_s, "single_per_s": single / single_s}
    result["ratio"] = result["worklist_per_s"] / result["single_per_s"]
    print(f"worklist (predict --table, batch {batch_size}, {workers} decoding workers): {n} radiographs in "
          f"{worklist_s:.1f} s = {result['worklist_per_s']:.2f}/s")
    print(f"one call per image (predict IMAGE): {single} radiographs in {single_s:.1f} s = "
          f"{result['single_per_s']:.2f}/s")
    print(f"worklist / one call per image: {result['ratio']:.1f}x")
    return result
