"""``bonedist bench attention``: AG-CNN attention crops/s, bonedist's (batched on a GPU, OpenCV per image on a CPU)
vs the per-image OpenCV/NumPy loop of the paper's Keras code, on the same inputs in the same run."""

from __future__ import annotations

import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from bonedist.models.attention import attention_boxes, crop_boxes


def opencv_attention_crops(features: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The baseline, one image at a time: sum → 0-255 → resize → Otsu → components → largest by sum → crop."""
    batch, height, width = images.shape
    crops, boxes = np.empty_like(images), np.zeros((batch, 4), np.int64)
    for i in range(batch):
        heat = features[i].sum(axis=0)
        heat = (heat - heat.min()) * (255.0 / max(float(heat.max() - heat.min()), 1e-12))
        heat = cv2.resize(heat.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        _, mask = cv2.threshold(heat.astype(np.uint8), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if n > 1:
            sums = np.bincount(labels.ravel(), weights=heat.ravel(), minlength=n)
            best = 1 + int(np.argmax(sums[1:]))
            x, y, w, h = stats[best, :4]
        else:
            x, y, w, h = 0, 0, width, height
        boxes[i] = (x, y, x + w - 1, y + h - 1)
        crops[i] = cv2.resize(images[i, y : y + h, x : x + w], (width, height), interpolation=cv2.INTER_LINEAR)
    return crops, boxes


def _inputs(batch: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    fmap = size // 32 + (size % 32 > 0)
    features = F.avg_pool2d(torch.randn(batch, 2048, fmap + 2, fmap + 2, generator=g).relu(), 3, 1)  # smooth blobs
    images = torch.rand(batch, 1, size, size, generator=g) * 2 - 1
    return features.to(device), images.to(device)


def _time(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def bench_attention(batch: int = 32, size: int = 500, repeats: int = 5, device: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    features, images = _inputs(batch, size, device)

    def ours():
        boxes, _ = attention_boxes(features, (size, size))
        return crop_boxes(images, boxes, (size, size))

    def baseline():  # the Keras code pulls the tensors to the host and loops in NumPy/OpenCV
        return opencv_attention_crops(features.float().cpu().numpy(), images[:, 0].float().cpu().numpy())

    t_ours = _time(ours, repeats, sync)
    t_base = _time(baseline, repeats, sync)
    boxes_ours, _ = attention_boxes(features, (size, size))
    _, boxes_base = baseline()
    # the loop upsamples the heat with OpenCV, bonedist with torch: box edges may move by a pixel
    agree = float((np.abs(boxes_ours.cpu().numpy() - boxes_base) <= 2).all(axis=1).mean())
    ours_name = "bonedist: batched (cuda)" if device.type == "cuda" else "bonedist: OpenCV per image (cpu)"
    rows = {"baseline: OpenCV/NumPy per image (host)": batch / t_base, ours_name: batch / t_ours}
    print(f"\nattention crops, batch {batch} at {size}x{size}, feature map {tuple(features.shape[1:])}, "
          f"device {_device_name(device)}")
    print(f"{'method':<44}{'crops/s':>10}{'ratio':>8}")
    base = rows["baseline: OpenCV/NumPy per image (host)"]
    for name, rate in rows.items():
        print(f"{name:<44}{rate:>10.1f}{rate / base:>7.2f}x")
    print(f"boxes within 2 px of the OpenCV loop's for {agree:.0%} of images")
    return {"ours": batch / t_ours, "baseline": base, "ratio": (batch / t_ours) / base, "agree": agree}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
