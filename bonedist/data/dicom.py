"""DICOM radiographs: pixels as a radiologist's viewer shows them, and the header's sex, age and pixel spacing.

Read with pydicom (the pylibjpeg handlers decode JPEG lossless, JPEG-LS and JPEG 2000; pydicom itself RLE): the
modality LUT (rescale slope and intercept) and the first VOI window (or VOI LUT) of the header are applied,
MONOCHROME1 is inverted so that bone is bright as in MONOCHROME2, and the result is stretched to 8 bits. The size the
header declares (Rows x Columns) is checked before the pixel data is decoded. A DICOM that is not a usable radiograph
(no pixel data, several frames, colour, a structured report or other non-image object) is refused with its reason.
"""

from __future__ import annotations

import io
import re
from datetime import date

import numpy as np

from bonedist import BonedistError
from bonedist.data.images import MAX_PIXELS, ImageError, check_pixels, not_a_radiograph, robust_window, stretch_to_uint8
from bonedist.files import reason

DICM_OFFSET = 128  # the 128-byte preamble, then "DICM"


def is_dicom(data: bytes) -> bool:
    return data[DICM_OFFSET:DICM_OFFSET + 4] == b"DICM"


def read_dicom(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """8-bit grayscale (H, W) pixels and header facts: ``male`` (or None), ``age_months`` (or None),
    ``pixel_spacing_mm`` (row, column) or None, ``photometric``, ``bits_stored``, ``window`` (center, width) or None,
    ``transfer_syntax``. Whatever is wrong with the file, decoding it raises this file's ``ImageError`` only."""
    try:
        return _read_dicom(data, max_pixels)
    except (ImageError, MemoryError):
        raise
    except Exception as exc:  # a malformed element pydicom only trips over when it is used
        raise ImageError(f"malformed DICOM ({reason(exc)})") from None


def _read_dicom(data: bytes, max_pixels: int) -> tuple[np.ndarray, dict]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not is_dicom(data))
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError) as exc:
        raise ImageError(f"not a readable DICOM file ({exc.__class__.__name__}: {str(exc)[:120]})") from None
    if "PixelData" not in ds:
        kind = str(ds.get("Modality", "")) or "no modality"
        raise ImageError(f"DICOM without pixel data ({kind}: a structured report or other non-image object)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames): not a single radiograph")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImageError(f"colour DICOM ({ds.get('PhotometricInterpretation', '?')}): not a radiograph")
    check_pixels(int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), max_pixels)
    try:
        raw = ds.pixel_array
    except Exception as exc:  # a missing handler, a corrupt stream: this file's own error
        raise ImageError(f"cannot decode the DICOM pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}: "
                         f"{str(exc).splitlines()[0][:160]})") from None
    try:  # header values that break the LUTs (a window width of 0, an unknown VOI LUT function...) are this file's
        values = apply_modality_lut(raw, ds)
        window = _window(ds)
        if window is not None and not window[1] > 0:
            raise ImageError(f"the header's window width is {window[1]:g} (must be above 0)")
        if "VOILUTSequence" in ds and window is None:
            lut = ds.VOILUTSequence[0] if len(ds.VOILUTSequence) else None
            if lut is None or not lut.get("LUTData"):
                raise ImageError("the header's VOI LUT holds no data")
        if window is not None or "VOILUTSequence" in ds:
            values = np.asarray(apply_voi_lut(values, ds, index=0))
            image = stretch_to_uint8(values)
        else:  # no window in the header: a robust one, so a burned-in marker does not flatten the hand
            values = np.asarray(values)
            image = stretch_to_uint8(values, robust_window(values))
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"cannot apply the header's modality or VOI LUT ({reason(exc)})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "MONOCHROME1":  # high values are dark: invert so that bone is bright, as in MONOCHROME2
        image = 255 - image
    facts = {"male": _header_value(_sex, ds), "age_months": _header_value(_age_months, ds),
             "pixel_spacing_mm": _header_value(_spacing, ds),
             "photometric": photometric, "bits_stored": int(ds.get("BitsStored", 0) or 0), "window": window,
             "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", ""))}
    return np.ascontiguousarray(image), facts


def _window(ds) -> list[float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    first = lambda v: float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)  # noqa: E731
    try:
        window = [first(center), first(width)]
    except (TypeError, ValueError, IndexError) as exc:
        raise ImageError(f"the header's window ({center!r}, {width!r}) is not two numbers ({exc})") from None
    if not all(np.isfinite(window)):
        raise ImageError(f"the header's window ({window[0]}, {window[1]}) is not finite")
    return window


def _sex(ds) -> bool | None:
    sex = str(ds.get("PatientSex", "")).strip().upper()
    return {"M": True, "F": False}.get(sex)


def _age_months(ds) -> float | None:
    """PatientAge (``010Y``, ``030M``, ``012W``, ``100D``), else StudyDate − PatientBirthDate."""
    text = str(ds.get("PatientAge", "")).strip().upper()
    match = re.fullmatch(r"(\d{1,3})([YMWD])", text)
    if match:
        value, unit = int(match.group(1)), match.group(2)
        return float(value * {"Y": 12.0, "M": 1.0, "W": 12.0 / 52.1775, "D": 12.0 / 365.25}[unit])
    birth, study = _date(ds.get("PatientBirthDate")), _date(ds.get("StudyDate") or ds.get("AcquisitionDate"))
    if birth and study and study >= birth:
        return (study - birth).days / 365.25 * 12.0
    return None


def _date(value) -> date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _header_value(read, ds):
    """A header fact that a malformed element leaves unknown (None) rather than failing the radiograph."""
    try:
        return read(ds)
    except Exception:
        return None


def _spacing(ds) -> list[float] | None:
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        if value is not None and len(value) == 2:
            return [float(value[0]), float(value[1])]
    return None


def decode_radiograph(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """Any radiograph bonedist reads: PNG or JPEG (``decode_gray8``, no header facts) or DICOM (``read_dicom``,
    with or without the 128-byte preamble and whatever the file is called)."""
    from bonedist.data.images import PNG_SIGNATURE, decode_gray8

    if data[:8] == PNG_SIGNATURE or data[:3] == b"\xff\xd8\xff" or len(data) == 0:
        return decode_gray8(data, max_pixels), {}
    if is_dicom(data) or looks_like_dicom(data):
        return read_dicom(data, max_pixels)
    return decode_gray8(data, max_pixels), {}  # its own error: not a PNG, JPEG or DICOM


def read_radiograph(data: bytes, name: str, max_pixels: int = MAX_PIXELS,
                    memory_hint: str = "") -> tuple[np.ndarray, dict]:
    """``decode_radiograph`` for one file a user hands in (``predict``, a worklist, the bundle, the service): a file
    that cannot be decoded, or holds no radiograph, raises one ``BonedistError`` line naming ``name`` and why;
    ``memory_hint`` follows an out-of-memory error (the flag that lowers it, where there is one)."""
    try:
        original, facts = decode_radiograph(data, max_pixels)
    except ImageError as exc:
        raise BonedistError(f"{name}: cannot read the image: {exc}") from None
    except MemoryError:
        raise BonedistError(f"{name}: out of memory while decoding it{memory_hint}") from None
    except Exception as exc:  # noqa: BLE001 - whatever breaks on one file is that file's error
        raise BonedistError(f"{name}: cannot read the image ({reason(exc)})") from None
    if (why := not_a_radiograph(original)) is not None:
        raise BonedistError(f"{name}: {why}")
    return original, facts


def looks_like_dicom(data: bytes) -> bool:
    """A DICOM stream without its preamble starts with a group-0002 or group-0008 element (little endian)."""
    return data[:2] in (b"\x02\x00", b"\x08\x00") and data[2:4] in (b"\x00\x00", b"\x01\x00", b"\x05\x00",
                                                                    b"\x10\x00", b"\x16\x00", b"\x18\x00")


def header_facts(path) -> dict | None:
    """Sex and chronological age from a DICOM file's header only (no pixel data read); None if not a DICOM."""
    import pydicom

    try:
        with open(path, "rb") as f:
            head = f.read(132)
        if not (is_dicom(head) or looks_like_dicom(head)):
            return None
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # unreadable files are reported when packed, with the decoder's reason
        return None
    if "SOPClassUID" not in ds and "PatientSex" not in ds and "Modality" not in ds:
        return None
    return {"male": _sex(ds), "age_months": _age_months(ds), "modality": str(ds.get("Modality", ""))}
