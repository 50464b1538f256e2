"""Bytes -> grayscale pixel array in [0, 1] plus non-identifying metadata.

JPEG/PNG go through Pillow, DICOM through pydicom (rescale slope/intercept, VOI window,
MONOCHROME1 inversion). Every failure is a `DecodeError` naming the file and the problem,
so a batch job can record it as a row and move on.

All three target modalities (X-ray, CT, ultrasound) are grayscale in nature; colour inputs
(RGB exports, RGBA PNGs) are reduced to luminance so one model sees one kind of image.

No patient-identifying DICOM tag is ever read into the metadata or an error message: only the
UIDs in `DICOM_META_TAGS` leave this module.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# Larger images are refused before their pixels are decoded (decompression-bomb guard).
MAX_PIXELS = 64_000_000

DICOM_META_TAGS = {
    "modality": "Modality",
    "sop_instance_uid": "SOPInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
}


class DecodeError(ValueError):
    """A file that cannot be turned into an image; `str()` names the file and the problem.

    `transient`: the file may decode later (a decoder not installed here), as opposed to content
    that is corrupt or unsupported for good.
    """

    def __init__(self, path: str, problem: str, transient: bool = False):
        self.path = path
        self.problem = problem
        self.transient = transient
        super().__init__(f"{path}: {problem}")


@dataclass
class Decoded:
    image: np.ndarray  # float32, HxW, values in [0, 1]
    meta: dict = field(default_factory=dict)  # format, original size, DICOM UIDs/modality


def sniff_format(data: bytes, path: str = "") -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if path.lower().endswith((".dcm", ".dicom")):
        return "dicom"  # DICOM without the 128-byte preamble: pydicom may still read it
    return "unknown"


def decode(data: bytes, path: str, max_pixels: int = MAX_PIXELS) -> Decoded:
    if len(data) == 0:
        raise DecodeError(path, "empty file (0 bytes)")
    kind = sniff_format(data, path)
    if kind in ("png", "jpeg"):
        return _decode_pil(data, path, kind, max_pixels)
    if kind == "dicom":
        return _decode_dicom(data, path, max_pixels)
    head = data[:16]
    raise DecodeError(path, f"not a PNG, JPEG or DICOM file (starts with {head!r})")


def _check_size(path: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(path, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise DecodeError(
            path,
            f"image is {width}x{height} ({width * height / 1e6:.0f} Mpx), over the "
            f"{max_pixels / 1e6:.0f} Mpx limit (decompression-bomb guard)",
        )


def _decode_pil(data: bytes, path: str, kind: str, max_pixels: int) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Image.open reads only the header. Pillow's own bomb check is switched off for it
            # because ours, just below, is stricter and names the size and the limit.
            pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
            _check_size(path, img.width, img.height, max_pixels)  # before any pixel is decoded
            img.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(path, f"decompression-bomb guard: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(path, f"corrupt or truncated {kind.upper()}: {exc}") from None

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif mode == "I":
        raw = np.asarray(img, dtype=np.float32)
        # Pillow opens 16-bit grayscale PNGs as 32-bit "I"; scale by the bit depth actually used.
        arr = raw / (65535.0 if raw.max() > 255 else 255.0)
    elif mode == "F":
        raw = np.asarray(img, dtype=np.float32)
        arr = _minmax(raw)
    else:
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            # Composite on black: transparent margins read as background, not as bright tissue.
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            img = Image.alpha_composite(bg, rgba)
        arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return Decoded(
        np.clip(arr, 0.0, 1.0).astype(np.float32, copy=False),
        {"format": kind, "width": img.width, "height": img.height, "mode": mode},
    )


def _minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _first(value):
    # Multi-valued DICOM elements (several windows) come as sequences: use the first.
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _decode_dicom(data: bytes, path: str, max_pixels: int) -> Decoded:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        raise DecodeError(path, f"not a readable DICOM file: {type(exc).__name__}") from None
    meta: dict = {"format": "dicom"}
    for key, tag in DICOM_META_TAGS.items():
        value = ds.get(tag)
        meta[key] = str(value) if value not in (None, "") else None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError(path, "DICOM has no pixel data (no PixelData element)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DecodeError(path, f"multi-frame DICOM ({frames} frames) is not supported; split it into frames")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_size(path, cols, rows, max_pixels)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for missing/failed decoders
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        ts_name = f"{ts.name} ({ts})" if ts is not None else "unknown transfer syntax"
        raise DecodeError(  # typically a decoder plugin missing here: worth retrying once one is installed
            path, f"cannot decode pixel data with transfer syntax {ts_name}: {_first_line(exc)}", transient=True
        ) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    meta.update(
        photometric=photometric,
        bits_stored=int(ds.get("BitsStored", 0) or 0),
        width=cols,
        height=rows,
    )
    if pixels.ndim == 3:  # colour (SamplesPerPixel == 3)
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        rgb = pixels.astype(np.float32)
        gray = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        return Decoded(_minmax(gray), meta)

    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)  # slope/intercept
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        image = _window_linear(values, center, width)
    elif "VOILUTSequence" in ds:
        image = _minmax(np.asarray(apply_voi_lut(values, ds), dtype=np.float64))
    else:
        image = _minmax(values)
    if photometric == "MONOCHROME1":
        image = 1.0 - image  # MONOCHROME1: low values are bright; make air dark as in MONOCHROME2
    return Decoded(np.clip(image, 0.0, 1.0).astype(np.float32), meta)


def _window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 LINEAR window, mapped to [0, 1]."""
    if width < 1:
        return _minmax(values)
    y = (values - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def _first_line(exc: Exception) -> str:
    # pydicom lists the decoder packages that would work on the following lines: keep them,
    # on one line, so the error row says what to install.
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return "; ".join(lines)[:400] if lines else type(exc).__name__
