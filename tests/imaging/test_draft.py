"""Issue 35: the decode shortcuts (JPEG draft mode, DICOM decoded in place) hand the model the same pixels,
within medclf.imaging.draft.DRAFT_TOLERANCE, as a plain full decode of the same large file."""

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_voi_lut, pixel_array

from medclf.config import PreprocessConfig
from medclf.imaging.decode import open_images
from medclf.imaging.draft import DRAFT_TOLERANCE
from medclf.imaging.preprocess import preprocess_gray

SPEC = PreprocessConfig(image_size=224, mean=0.5, std=0.25)


def _film(size: int, seed: int = 0) -> np.ndarray:
    """A radiograph-like 8-bit image: dark background, two bright 'lungs' with texture, grain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((xx - 0.5) / 0.35) ** 2 + ((yy - 0.5) / 0.45) ** 2) ** 2)
    lungs = sum(np.exp(-(((xx - cx) / 0.12) ** 2 + ((yy - 0.45) / 0.25) ** 2)) for cx in (0.33, 0.67))
    ribs = 0.15 * (np.sin(yy * 60) > 0.6)
    img = 200 * body - 90 * lungs + 40 * ribs * body + rng.normal(0, 6, (size, size))
    return np.clip(img + 20, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "L").convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _model_input_gap(full: np.ndarray, fast: np.ndarray) -> tuple[float, float]:
    """Mean and worst absolute difference of the model's inputs, in [0, 1] grey levels."""
    a, b = preprocess_gray(full, SPEC), preprocess_gray(fast, SPEC)
    gap = np.abs(a - b) * SPEC.std  # undo the normalisation's division
    return float(gap.mean()), float(gap.max())


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_draft_matches_full_decode_within_tolerance(mode):
    data = _jpeg(_film(2048, seed=1), mode)
    full = open_images(data, "film.jpeg").image(None)
    fast = open_images(data, "film.jpeg", min_side=SPEC.image_size).image(None)
    assert full.image.shape == (2048, 2048) and full.meta["decode_scale"] == 1.0
    # 2,048 / 4 = 512 >= 2 x 224: libjpeg decoded a quarter of each side, and no less
    assert fast.image.shape == (512, 512) and fast.meta["decode_scale"] == 0.25
    assert (fast.meta["width"], fast.meta["height"]) == (2048, 2048)  # stored size, for the size gate
    mean_abs, max_abs = _model_input_gap(full.image, fast.image)
    assert mean_abs <= DRAFT_TOLERANCE["mean_abs"], mean_abs
    assert max_abs <= DRAFT_TOLERANCE["max_abs"], max_abs
    # the check can fail: a cruder shortcut (nearest-neighbour 1/8) is outside the tolerance
    crude = full.image[::8, ::8]
    assert _model_input_gap(full.image, crude)[1] > DRAFT_TOLERANCE["max_abs"]


def test_no_draft_for_small_images_or_png():
    small = _jpeg(_film(600), "L")  # 600 < 2 x 2 x 224: scaling would drop below 448
    assert open_images(small, "s.jpeg", min_side=224).image(None).image.shape == (600, 600)
    buf = io.BytesIO()
    Image.fromarray(_film(1024)).save(buf, "PNG")
    assert open_images(buf.getvalue(), "p.png", min_side=224).image(None).image.shape == (1024, 1024)


def _reference_dicom(ds) -> np.ndarray:
    """The plain pipeline, written out: pixels -> VOI window -> [0, 1] -> MONOCHROME1 inverted (float64)."""
    raw = pixel_array(ds).astype(np.float64)
    probe = apply_voi_lut(np.array([-(2**31), 2**31 - 1], np.int64), ds)
    out = (np.asarray(apply_voi_lut(raw, ds), np.float64) - probe[0]) / (probe[1] - probe[0])
    return 1.0 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_large_dicom_decoded_in_place_matches_the_plain_pipeline(name):
    path = get_testdata_file(name)  # real chest CR, 1841 x 1955, 15-bit, MONOCHROME1 (pydicom-data)
    data = open(path, "rb").read()
    got = open_images(data, name).image(None)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert got.image.dtype == np.float32 and got.image.shape == (ds.Rows, ds.Columns) == (1955, 1841)
    assert got.meta["bits_stored"] == 15  # the 16-bit path: 15 bits in, no 8-bit step in between
    assert len(np.unique(got.image[::4, ::4])) > 256
    np.testing.assert_allclose(got.image, np.clip(_reference_dicom(ds), 0, 1), atol=2e-6)


def test_large_generated_dicom_without_window_is_min_max_scaled():
    rng = np.random.default_rng(3)
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    for kw in ("WindowCenter", "WindowWidth"):
        delattr(ds, kw)
    pixels = rng.integers(100, 4000, (2000, 2000), dtype=np.uint16)
    ds.Rows, ds.Columns, ds.PhotometricInterpretation = 2000, 2000, "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    got = open_images(buf.getvalue(), "gen.dcm").image(None).image
    want = (pixels - pixels.min()) / float(pixels.max() - pixels.min())
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
