"""The evaluation input pipeline (``bonedist.data.augment.InputPipeline.eval`` and ``bonedist.data.handmask``) in
numpy and OpenCV, for the bundle runtime, which has no torch.

Each step follows the torch version's arithmetic, so that a member's inputs, and with them its prediction, agree with
``bonedist predict`` on the runs folder (``tests/test_serving.py`` checks both ways on real radiographs):

- resizes are the same sampling matrices: ``area`` (adaptive average pooling), bilinear with half-pixel centres and
  antialiasing (PyTorch's and Pillow's triangle filter widened by the scale) and plain bilinear for the mask;
- the contrast stretch takes numpy's linear quantiles, as ``torch.quantile``;
- the hand mask repeats Kornia's Otsu histogram (256 bins, the split of largest between-class variance, the threshold
  between the two classes' extreme values), its geodesic morphology (OpenCV's default borders) and the largest
  8-connected component of OpenCV, as the torch version does on a CPU.
"""

from __future__ import annotations

import cv2
import numpy as np

# bonedist.data.handmask.HandMaskConfig's defaults (a bundle stores the ones its members were trained with)
HAND_MASK_DEFAULTS = {"work_size": 128, "blur_sigma": 1.0, "open_size": 3, "close_size": 5, "margin": 11,
                      "max_levels": 3, "plate_solidity": 0.93, "plate_area": 0.45, "plate_area_solidity": 0.8,
                      "plate_min_area": 0.2, "samples": 4096}


def _area_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(out, in) weights of adaptive average pooling (``F.interpolate(mode="area")``) along one axis."""
    m = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


def _bilinear_matrix(size_in: int, size_out: int, antialias: bool) -> np.ndarray:
    """(out, in) weights of bilinear interpolation with half-pixel centres (``align_corners=False``); with
    ``antialias``, downscaling widens the triangle filter by the scale, as PyTorch's ``antialias=True``."""
    scale = size_in / size_out
    m = np.zeros((size_out, size_in), np.float64)
    if antialias:
        support = scale if scale >= 1.0 else 1.0
        inv = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(size_out):
            centre = scale * (i + 0.5)
            lo = max(int(centre - support + 0.5), 0)
            hi = min(int(centre + support + 0.5), size_in)
            j = np.arange(lo, hi)
            w = np.clip(1.0 - np.abs((j - centre + 0.5) * inv), 0.0, None)
            total = w.sum()
            m[i, lo:hi] = w / total if total > 0 else 0.0
        return m.astype(np.float32)
    # plain bilinear in float32 as PyTorch computes it (scale, source index and weights), so that a mask value of
    # exactly 0.5 falls on the same side of the threshold
    scale32 = np.float32(size_in) / np.float32(size_out)
    for i in range(size_out):
        src = max(scale32 * (np.float32(i) + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
        i0 = min(int(src), size_in - 1)
        i1 = min(i0 + 1, size_in - 1)
        frac = np.float32(src - np.float32(i0))
        m[i, i0] += np.float32(1.0) - frac
        m[i, i1] += frac
    return m.astype(np.float32)


def _apply(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``rows @ x @ cols.T`` for each image of ``x`` (B, H, W)."""
    return np.einsum("oh,bhw,pw->bop", rows, x, cols, optimize=True).astype(np.float32)


def area_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    return _apply(x, _area_matrix(x.shape[1], height), _area_matrix(x.shape[2], width))


def bilinear_resize(x: np.ndarray, height: int, width: int, antialias: bool) -> np.ndarray:
    return _apply(x, _bilinear_matrix(x.shape[1], height, antialias), _bilinear_matrix(x.shape[2], width, antialias))


def stretch_contrast(x: np.ndarray, low: float = 0.01, high: float = 0.99, work_size: int = 64) -> np.ndarray:
    """Each image's ``low``-``high`` quantile range (of an area-downsampled copy) stretched to [0, 1], clipped."""
    small = area_resize(x, work_size, work_size).reshape(len(x), -1)
    bounds = np.quantile(small, [low, high], axis=1).astype(np.float32)  # (2, B), linear as torch.quantile
    lo, hi = bounds[0].reshape(-1, 1, 1), bounds[1].reshape(-1, 1, 1)
    return np.clip((x - lo) / np.maximum(hi - lo, np.float32(1.0 / 255.0)), 0.0, 1.0).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Kornia's default Otsu threshold of a float32 sample: the split of largest between-class variance over a
    ``bins``-bin histogram, placed between the two classes' extreme values."""
    v = values.astype(np.float32).ravel()
    lo, hi = np.float32(v.min()), np.float32(v.max())
    if lo == hi:
        return float(lo)
    width = np.float32(hi - lo)
    index = np.clip(((v - lo) * np.float32(bins) / width).astype(np.int64), 0, bins - 1)
    hist = np.bincount(index, minlength=bins).astype(np.float32)
    hist /= hist.sum(dtype=np.float32)
    levels = np.arange(bins, dtype=np.float32)
    weight_bg = np.cumsum(hist, dtype=np.float32)[:-1]
    sum_bg = np.cumsum(hist * levels, dtype=np.float32)[:-1]
    weight_fg = hist.sum(dtype=np.float32) - weight_bg
    sum_fg = (hist * levels).sum(dtype=np.float32) - sum_bg
    valid = (weight_bg > 0) & (weight_fg > 0) & (hist[:-1] > 0)
    mean_bg = sum_bg / np.where(weight_bg > 0, weight_bg, 1)
    mean_fg = sum_fg / np.where(weight_fg > 0, weight_fg, 1)
    variance = np.where(valid, weight_bg * weight_fg * (mean_bg - mean_fg) ** 2, -1.0).astype(np.float32)
    best = int(np.argmax(variance))
    if variance[best] <= 0:
        return float(lo)
    step = width / np.float32(bins)
    k = best + 1
    edge = lo + np.float32(k) * step if k < (bins + 1) // 2 else hi + np.float32(k - bins) * step
    foreground = index > best
    background_max = v[~foreground].max()
    boundary = v[foreground].min()
    threshold = max(np.float32(edge), background_max)
    return float(min(threshold, np.nextafter(boundary, np.float32(-np.inf))))


def _region_threshold(small: np.ndarray, region: np.ndarray, samples: int) -> float:
    """Otsu threshold of the pixels inside ``region``, from ``samples`` evenly spaced quantiles of them."""
    flat = small.ravel()
    inside = region.ravel()
    count = int(inside.sum())
    values = np.where(inside, flat, np.float32(np.inf)) if count else flat
    count = count or flat.size
    ordered = np.sort(values)
    side = int(samples ** 0.5)
    steps = (np.arange(side * side, dtype=np.float64) + 0.5) / (side * side)
    idx = np.minimum((steps * count).astype(np.int64), flat.size - 1)
    return otsu_threshold(ordered[idx])


def _morph(x: np.ndarray, op: int, size: int) -> np.ndarray:
    """Geodesic grey morphology with a square ``size`` kernel (Kornia's default border: outside pixels ignored)."""
    return cv2.morphologyEx(x, op, np.ones((size, size), np.uint8))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    if count <= 1:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(labels.ravel(), minlength=count).astype(np.float64)
    sizes[0] = -1.0
    return labels == int(np.argmax(sizes))


def _solidity(component: np.ndarray, coarse: int = 32, close: int = 7) -> float:
    small = area_resize(component.astype(np.float32)[None], coarse, coarse)[0]
    closed = _morph(small, cv2.MORPH_CLOSE, close)
    return float(small.sum(dtype=np.float32) / max(closed.sum(dtype=np.float32), 1e-6))


def _gaussian_kernel(sigma: float) -> np.ndarray:
    size = 2 * round(2 * sigma) + 1
    x = np.arange(size, dtype=np.float32) - size // 2
    k = np.exp(-(x ** 2) / np.float32(2.0 * sigma ** 2)).astype(np.float32)
    return k / k.sum()


def hand_mask_small(x: np.ndarray, cfg: dict | None = None) -> np.ndarray:
    """Hand masks (B, W, W) bool at the work size of images ``x`` (B, H, W) in [0, 1]."""
    c = {**HAND_MASK_DEFAULTS, **(cfg or {})}
    work = c["work_size"]
    small = area_resize(x, work, work)
    out = np.zeros((len(x), work, work), bool)
    kernel = _gaussian_kernel(c["blur_sigma"]) if c["blur_sigma"] else None
    for b in range(len(x)):
        image = small[b]
        if kernel is not None:
            image = cv2.sepFilter2D(image, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)
        region = np.ones(image.shape, bool)
        chosen = np.zeros(image.shape, bool)
        for _ in range(c["max_levels"]):
            foreground = ((image > np.float32(_region_threshold(image, region, c["samples"]))) & region)
            opened = _morph(foreground.astype(np.float32), cv2.MORPH_OPEN, c["open_size"])
            foreground = _morph(opened, cv2.MORPH_CLOSE, c["close_size"]) > 0.5
            component = _largest_component(foreground)
            area = float(component.sum())
            region_area = float(region.sum())
            found = area > 0.01 * region_area
            if found:
                chosen = component
            solidity = _solidity(component)
            share = area / max(region_area, 1.0)
            plate = solidity > c["plate_solidity"] or (share > c["plate_area"]
                                                       and solidity > c["plate_area_solidity"])
            plate = plate and area > c["plate_min_area"] * work * work
            if not (plate and found):
                break
            region = component
        if c["margin"]:
            chosen = cv2.dilate(chosen.astype(np.float32), np.ones((c["margin"], c["margin"]), np.uint8)) > 0.5
        out[b] = chosen if chosen.any() else True
    return out


def _linear_taps(size_in: int, size_out: int):
    """PyTorch's bilinear taps along one axis in float32: first and second source index and their weights."""
    scale = np.float64(np.float32(size_in) / np.float32(size_out))
    # scale * (i + 0.5) - 0.5 rounded once, as the fused multiply-add of PyTorch's CPU build computes it
    src = np.maximum(scale * (np.arange(size_out) + 0.5) - 0.5, 0.0).astype(np.float32)
    i0 = np.minimum(src.astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def upsample_mask(small: np.ndarray, height: int, width: int) -> np.ndarray:
    """Masks (B, w, w) at the image's size (B, H, W): bilinear in PyTorch's order of float32 operations (each
    source column's two rows first), so that a value within rounding of 0.5 falls on the same side of the threshold."""
    x = small.astype(np.float32)
    y0, y1, h0, h1 = _linear_taps(x.shape[1], height)
    x0, x1, w0, w1 = _linear_taps(x.shape[2], width)
    h0, h1 = h0[None, :, None], h1[None, :, None]
    left = h0 * x[:, y0][:, :, x0] + h1 * x[:, y1][:, :, x0]
    right = h0 * x[:, y0][:, :, x1] + h1 * x[:, y1][:, :, x1]
    return (left * w0 + right * w1) > 0.5


def view_transform(x: np.ndarray, degrees: float, zoom: float) -> np.ndarray:
    """Images (B, H, W) float32 rotated by ``degrees`` (counter-clockwise) and zoomed by ``zoom`` about their centre,
    bilinear, zeros outside (``bonedist.data.augment.view_transform``: Kornia's warp with OpenCV's matrix)."""
    if degrees == 0.0 and zoom == 1.0:
        return x
    h, w = x.shape[1:]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), float(degrees), float(zoom))
    return np.stack([cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                    borderValue=0.0) for image in x])


def model_inputs(images: np.ndarray, spec: dict, flip: bool = False,
                 view: tuple[float, float] | None = None) -> tuple[np.ndarray, int]:
    """uint8 images (B, S, S) at the pack's size → one member's network inputs (B*R, C, P, P) float32 and R, the
    inputs per radiograph (the G x G patch grid of a patch model, else 1); ``flip``: of the mirror images; ``view``:
    (degrees, zoom) of a test-time view."""
    x = images.astype(np.float32) / np.float32(255.0)
    if flip:
        x = np.ascontiguousarray(x[:, :, ::-1])
    size = int(spec["image_size"])
    if x.shape[1] != size or x.shape[2] != size:
        x = bilinear_resize(x, size, size, antialias=True)
    if spec.get("contrast") == "stretch":
        x = stretch_contrast(x)
    if spec.get("hand_mask"):
        mask = upsample_mask(hand_mask_small(x, spec.get("hand_mask_config")), size, size)
        x = x * mask.astype(np.float32)
    if view is not None:
        x = view_transform(x, *view)
    repeats = 1
    if spec["input_size"] < size:
        grid, p = int(spec["grid"]), int(spec["input_size"])
        starts = np.round(np.linspace(0, size - p, grid)).astype(np.int64)
        x = np.stack([x[:, y:y + p, s:s + p] for y in starts for s in starts], axis=1).reshape(-1, p, p)
        repeats = grid * grid
    channels = int(spec["channels"])
    x = np.repeat(x[:, None], channels, axis=1)
    mean = np.asarray(spec["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32), repeats
