"""``bonedist bench all``: every benchmark, one markdown table (ours, baseline, ratio) with machine and versions."""

from __future__ import annotations

import contextlib
import io
import os
import platform
from datetime import datetime, timezone

import torch


def _versions() -> str:
    import accelerate
    import cv2
    import kornia
    import timm
    import torchvision
    import webdataset

    from bonedist import __version__

    return (f"bonedist {__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"timm {timm.__version__}, kornia {kornia.__version__}, webdataset {webdataset.__version__}, "
            f"accelerate {accelerate.__version__}, opencv {cv2.__version__}")


def _device() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return "CPU only"


def bench_all(quick: bool | None = None, verbose: bool = False) -> str:
    from bonedist.bench.attention import bench_attention
    from bonedist.bench.loader import bench_augment, bench_loader
    from bonedist.bench.pack import bench_pack
    from bonedist.bench.train_step import bench_train_step

    quick = (not torch.cuda.is_available()) if quick is None else quick
    rows: list[tuple[str, str, str, float, float, str]] = []
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())

    with sink:
        pack = bench_pack(None, n=60 if quick else 240, source_size=1600)
    base = pack["baseline: PIL loop, 1 process"]
    best = max((v, k) for k, v in pack.items() if k.startswith("bonedist"))
    rows.append(("pack", best[1], "PIL loop, 1 process", best[0], base, "images/s"))
    with sink:
        att = bench_attention(batch=32, size=500, repeats=2 if quick else 5)
    rows.append(("attention crops (batch 32, 500 px)", "batched on a GPU, OpenCV per image on a CPU",
                 "OpenCV/NumPy loop", att["ours"],
                 att["baseline"], "crops/s"))
    with sink:
        aug = bench_augment(batch_size=32, size=500, repeats=2 if quick else 5)
    rows.append(("augmentation (500 px)", "Kornia batch", "torchvision v2 per image",
                 aug["bonedist: Kornia, whole batch"], aug["baseline: torchvision v2, image by image"], "images/s"))
    with sink:
        loader = bench_loader(n=96 if quick else 512, batches=4 if quick else 24)
    base_name = "baseline: PIL + torchvision v2 in workers"
    for name, value in loader.items():
        if name != base_name:
            rows.append((f"loader, augmented 500 px ({name.split()[1]})", name, "PIL + torchvision v2 in workers",
                         value["images_per_s"], loader[base_name]["images_per_s"], "images/s"))
    from bonedist.bench.train_loop import bench_train_loop
    from bonedist.models import list_models

    with sink:
        loop = bench_train_loop("xception", preset="improved", steps=8 if quick else 30)
    rows.append(("train loop xception (improved preset, cache)", "engine's loop", "bare model step",
                 loop["loop_images_per_s"], loop["bare_images_per_s"], "images/s"))
    for model in list_models("scratch"):
        with sink:
            step = bench_train_step(model, steps=2 if quick else 5, size=96 if quick else None,
                                    batch=4 if quick else None)
        rows.append((f"train step {model}", "engine defaults", "fp32 eager",
                     step["bonedist defaults"]["images_per_s"], step["baseline: fp32 eager"]["images_per_s"],
                     "images/s"))
    lines = [f"bonedist bench all{' (quick sizes)' if quick else ''}, "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs; device: {_device()}",
             f"versions: {_versions()}", "",
             "| benchmark | bonedist | baseline | ours | baseline | ratio | unit |",
             "|---|---|---|---|---|---|---|"]
    for bench, ours_name, base_name, ours, base, unit in rows:
        lines.append(f"| {bench} | {ours_name} | {base_name} | {ours:.1f} | {base:.1f} | {ours / base:.2f}x | {unit} |")
    return "\n".join(lines)
