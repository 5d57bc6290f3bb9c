"""Decoding every supported image kind to 8-bit grayscale, and the two resize modes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from bonedist.data.images import ImageError, decode_gray8, encode_png, resize_square


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def test_8bit_png_round_trips_exactly():
    image = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    assert np.array_equal(decode_gray8(_png(image)), image)
    assert np.array_equal(decode_gray8(encode_png(image)), image)


def test_16bit_png_is_stretched_to_full_range():
    image = np.linspace(1000, 3000, 50 * 20).reshape(50, 20).astype(np.uint16)
    out = decode_gray8(_png(image))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    # monotone mapping: order of pixel values is kept
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)


def test_palette_png_decodes_to_gray(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (10, 1))
    path = tmp_path / "p.png"
    Image.fromarray(gray).convert("P").save(path)
    assert Image.open(path).mode == "P"
    out = decode_gray8(path.read_bytes())
    assert out.shape == gray.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - gray.astype(int)).max() <= 8


def test_rgb_jpeg_decodes_to_gray():
    image = np.full((32, 48, 3), 128, np.uint8)
    ok, buf = cv2.imencode(".jpg", image)
    out = decode_gray8(buf.tobytes())
    assert out.shape == (32, 48) and abs(int(out.mean()) - 128) <= 2


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"this is a text file, not an image", "not a PNG or JPEG"),
        (None, "truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10 + b"IEND\xaeB`\x82", "corrupt"),
    ],
)
def test_bad_bytes_raise_image_error_with_reason(data, reason):
    if data is None:
        full = _png(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8))
        data = full[: len(full) // 2]
    with pytest.raises(ImageError, match=reason):
        decode_gray8(data)


def test_resize_stretch_and_pad_geometry():
    image = np.full((200, 100), 200, np.uint8)
    stretched, geo = resize_square(image, 50, "stretch")
    assert stretched.shape == (50, 50) and stretched.min() == 200
    assert geo["scale_x"] == 0.5 and geo["scale_y"] == 0.25
    padded, geo = resize_square(image, 50, "pad")
    assert padded.shape == (50, 50)
    # aspect kept: the 2:1 image fills 25 columns in the middle, black on both sides
    assert geo["pad_left"] == 12 and geo["pad_top"] == 0
    assert padded[:, :12].max() == 0 and padded[:, 37:].max() == 0 and padded[:, 12:37].min() == 200


def test_unknown_resize_mode_raises():
    with pytest.raises(ValueError, match="resize mode"):
        resize_square(np.zeros((10, 10), np.uint8), 8, "crop")
