"""``bonedist bench pack``: packing throughput vs the naive single-process PIL loop, same inputs, same run."""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from bonedist.data.layouts import read_source, read_table
from bonedist.data.pack import PackOptions, default_workers, pack_dataset


def naive_pack(root: Path, out: Path, size: int) -> int:
    """The baseline: one process, PIL open → grayscale → resize → save PNG into a folder."""
    out.mkdir(parents=True, exist_ok=True)
    records = read_table(root).records
    for image_id, source in zip(records["id"], records["source"]):
        image = Image.open(io.BytesIO(read_source(root, source))).convert("L")
        image.resize((size, size), Image.Resampling.BICUBIC).save(out / f"{image_id}.png")
    return len(records)


def bench_pack(root: Path | None, n: int = 240, source_size: int = 1600, size: int = 500, workers: int = 0) -> dict:
    workers = workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="bonedist-bench-") as tmp:
        tmp = Path(tmp)
        if root is None:
            from bonedist.data.synth import synth_dataset

            root = tmp / "phantoms"
            print(f"synthesising {n} + {n // 4} + {n // 4} phantoms at {source_size} px in {root} ...")
            synth_dataset(root, n=n, seed=0, size=source_size, workers=workers, progress=False)
        timings = {}
        start = time.perf_counter()
        count = naive_pack(root, tmp / "naive", size)
        timings["baseline: PIL loop, 1 process"] = time.perf_counter() - start
        for w in sorted({1, workers}):
            shutil.rmtree(tmp / "ours", ignore_errors=True)
            start = time.perf_counter()
            manifest, _ = pack_dataset(root, tmp / "ours", PackOptions(size=size, resize="stretch", workers=w,
                                                                        progress=False))
            timings[f"bonedist pack, {w} worker{'s' if w > 1 else ''}"] = time.perf_counter() - start
            assert manifest["totals"]["packed"] == count, "both must pack the same images"
    base = count / timings["baseline: PIL loop, 1 process"]
    print(f"\npacking {count} images from {root} to {size}x{size} (stretch), {default_workers()} cores")
    print(f"{'method':<36}{'images/s':>10}{'ratio':>8}")
    results = {}
    for name, seconds in timings.items():
        rate = count / seconds
        results[name] = rate
        print(f"{name:<36}{rate:>10.1f}{rate / base:>7.2f}x")
    return results
