"""Decoding radiographs to 8-bit grayscale and resizing them to the packed square size.

The same functions serve packing and single-image prediction, so a radiograph is preprocessed identically in both.
"""

from __future__ import annotations

import cv2
import numpy as np

from bonedist.data.options import MAX_PIXELS, RESIZE_MODES  # noqa: F401  (re-exported; their home is the options)

# libpng/libjpeg warnings about corrupt input would otherwise be printed once per bad file by every worker.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PNG_COMPRESSION = 3  # lossless either way; 3 packs smaller than OpenCV's default 1 and still decodes fast


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class ImageError(ValueError):
    """The bytes are not a decodable radiograph; the message says why."""


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as a PNG's IHDR or a JPEG's start-of-frame declares it, read before any pixel is decoded;
    None when the header does not say (the decoder then decides)."""
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:  # no length field
                i += 2 if marker != 0xFF else 1
                continue
            if marker in _JPEG_SOF:
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def png_problem(data: bytes) -> str | None:
    """Whether the chunks of a PNG lead, length by length, to its IEND chunk within ``data``: None, or why not."""
    i = len(PNG_SIGNATURE)
    while i + 12 <= len(data):
        length, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        if kind == b"IEND":
            return None
        if not kind.isalpha() or (i == len(PNG_SIGNATURE) and kind != b"IHDR"):
            return f"corrupt image data (no PNG chunk at byte {i})"
        i += 12 + length
    return "truncated PNG (it ends before its IEND chunk)"


def check_pixels(width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    if width * height > max_pixels:
        raise ImageError(f"image of {width}x{height} pixels ({width * height / 1e6:.0f} megapixels) is over the "
                         f"{max_pixels / 1e6:.0f}-megapixel limit (--max-pixels); not decoded")
    if width == 0 or height == 0:
        raise ImageError(f"the header declares an empty image ({width}x{height})")


def decode_gray8(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode PNG (8/16-bit, gray, RGB, palette) or JPEG bytes to an 8-bit grayscale (H, W) array.

    The size the header declares is checked against ``max_pixels`` before anything is decoded, and every decoder
    error becomes this image's ``ImageError``. 16-bit and floating-point images are stretched to 0-255 over a robust
    window (``robust_window``), so their dynamic range survives the conversion instead of being cut to the top 8
    bits, and a burned-in marker at full white does not flatten the hand.
    """
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    if data[:8] == PNG_SIGNATURE:
        # A PNG cut short can still decode its first rows; reaching the IEND chunk proves the file is whole
        # (bytes after it, which some archive exports append, are ignored as every decoder ignores them).
        if (problem := png_problem(data)) is not None:
            raise ImageError(problem)
    elif data[:3] != b"\xff\xd8\xff":
        raise ImageError("not a PNG or JPEG file (unknown signature)")
    declared = header_size(data)
    if declared is not None:
        check_pixels(*declared, max_pixels)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV's own limits and decoder failures
        raise ImageError(f"the decoder refused it ({str(exc).strip().splitlines()[-1][:160]})") from None
    if image is None or image.size == 0:
        raise ImageError("corrupt image data (the decoder failed)")
    check_pixels(image.shape[1], image.shape[0], max_pixels)
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
        elif channels == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        elif channels == 1:
            image = image[:, :, 0]
        else:
            raise ImageError(f"unsupported number of channels: {channels}")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    return stretch_to_uint8(image, robust_window(image))


WINDOW_PERCENTILES = (0.5, 99.5)  # a robust window: burned-in markers and dead pixels are far under 0.5 %
OUTLIER_GAP = 0.1  # ... used where the pixels beyond it lie over a tenth of the range away


def robust_window(image: np.ndarray) -> tuple[float, float]:
    """The (low, high) gray levels between which a radiograph without a window of its own is shown: its minimum
    and maximum, except where a few pixels lie far beyond the rest (a burned-in marker at full white, a dead
    pixel): then the 0.5th or 99.5th percentile, so that they do not squeeze the hand into a few gray levels. An
    integer image's top level is left out of the percentiles where it is far above all others and holds under 5 %
    of the pixels (a marker larger than 0.5 % of the image). Falls back to the full range where the percentiles
    coincide (a two-tone image)."""
    first, last = float(image.min()), float(image.max())
    integral = np.issubdtype(image.dtype, np.integer) or bool(np.all(image == np.floor(image)))
    if integral and last - first < 1 << 22:  # a histogram of the levels (DICOM's rescaled ones too): no sort
        shifted = image.astype(np.int32) - np.int32(first) if np.issubdtype(image.dtype, np.integer) \
            else (image - first).astype(np.int32)
        counts = np.bincount(shifted.ravel())
        used = np.flatnonzero(counts)
        if len(used) > 2:  # a burned-in marker at one top level far above the rest is no part of the hand
            top, below = used[-1], used[-2]
            if counts[top] < 0.05 * image.size and top - below > 0.1 * (top - used[0]):
                counts[top] = 0
        cumulative = np.cumsum(counts)
        need = np.ceil(np.array(WINDOW_PERCENTILES) / 100.0 * cumulative[-1])
        lo, hi = (float(np.searchsorted(cumulative, max(n, 1))) + first for n in need)
    else:  # the same definition: the smallest value with at least that share of pixels at or below it
        lo, hi = (float(v) for v in np.percentile(image, WINDOW_PERCENTILES, method="inverted_cdf"))
    # a percentile replaces the extreme only where the pixels beyond it are sparse outliers far from the rest
    # (beyond a tenth of the range): an ordinary radiograph keeps its full range, as an 8-bit one does
    span = last - first
    lo = lo if lo - first > OUTLIER_GAP * span else first
    hi = hi if last - hi > OUTLIER_GAP * span else last
    if hi <= lo:
        lo, hi = first, last
    return lo, hi


def stretch_to_uint8(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Map ``window`` (default: the image's own minimum and maximum) linearly to [0, 255], values outside it clipped
    (a constant image becomes all zeros). Integer images go through a lookup table (no float copy of the whole
    image); float ones are converted in float32."""
    lo, hi = float(image.min()), float(image.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ImageError("image contains non-finite values")
    if window is not None:
        lo, hi = window
    if hi <= lo:
        return np.zeros(image.shape, np.uint8)
    if image.dtype in (np.uint16, np.int16):
        first, last = int(image.min()), int(image.max())
        levels = np.arange(first, last + 1, dtype=np.float64)
        table = np.round(np.clip((levels - lo) * (255.0 / (hi - lo)), 0, 255)).astype(np.uint8)
        return table[(image.astype(np.int32) - first) if image.dtype == np.int16 else image - np.uint16(first)]
    return np.round(np.clip((image.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255)).astype(np.uint8)


def resize_square(image: np.ndarray, size: int, mode: str = "pad") -> tuple[np.ndarray, dict]:
    """Resize a (H, W) uint8 image to (size, size).

    Args:
        image: 8-bit grayscale radiograph.
        size: output side in pixels.
        mode: ``stretch`` distorts the aspect ratio (the paper); ``pad`` scales the longer side to ``size`` and
            letterboxes the shorter one with black, centred.

    Returns:
        The resized image and the geometry needed to map a point back to the original: ``scale_x``, ``scale_y``
        (output pixels per input pixel) and the ``pad_top``/``pad_left`` offsets.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    h, w = image.shape
    if mode == "stretch":
        out = _resize(image, size, size)
        return out, {"scale_x": size / w, "scale_y": size / h, "pad_top": 0, "pad_left": 0}
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = _resize(image, new_w, new_h)
    out = np.zeros((size, size), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out, {"scale_x": new_w / w, "scale_y": new_h / h, "pad_top": top, "pad_left": left}


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width * height < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(image, (width, height), interpolation=interpolation)


def encode_png(image: np.ndarray) -> bytes:
    """Lossless 8-bit grayscale PNG bytes (deterministic for the same pixels and OpenCV build)."""
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise ImageError("PNG encoding failed")
    return buf.tobytes()


def decode_png_gray8(data: bytes) -> np.ndarray:
    """Fast path for packed shards: they hold 8-bit grayscale PNGs only."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ImageError("corrupt PNG in shard")
    return image


MIN_CONTRAST = 8  # gray levels between the 1st and 99th percentile; real radiographs span well over a hundred


def not_a_radiograph(image: np.ndarray) -> str | None:
    """Why an 8-bit image cannot be a radiograph (too small; blank, all white, one flat tone), or None."""
    height, width = image.shape
    if min(height, width) < 16:
        return f"image too small ({width}x{height} pixels)"
    small = image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)]  # percentiles on a sample
    low, high = np.percentile(small, [1, 99])
    if high - low < MIN_CONTRAST:
        return (f"blank or near-constant image (98% of its pixels between {low:.0f} and {high:.0f} of 255): "
                f"not a radiograph")
    return None
