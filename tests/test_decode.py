import io

import numpy as np
import pydicom
import pytest
from PIL import Image

from medclf.config import PreprocessConfig
from medclf.decode import DecodeError, decode
from medclf.phantoms import generate
from medclf.preprocess import preprocess


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph")
    return root, generate(str(root), n_train=6, n_test=2, image_size=40, seed=5)


def test_png_and_dicom_give_the_same_model_input(phantoms):
    root, m = phantoms
    spec = PreprocessConfig(image_size=64, mean=0.4, std=0.25)
    for _, pair in m.groupby("image_index"):
        png = pair[pair.format == "png"].path.item()
        dcm = pair[pair.format == "dcm"].path.item()
        a = preprocess(decode((root / png).read_bytes(), png).image, spec)
        b = preprocess(decode((root / dcm).read_bytes(), dcm).image, spec)
        assert a.shape == (3, 64, 64) and a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert a.std() > 0.1  # not a blank image


def test_dicom_headers_are_real_and_metadata_is_uid_only(phantoms):
    root, m = phantoms
    path = m[m.format == "dcm"].path.iloc[0]
    ds = pydicom.dcmread(root / path)
    assert ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.Rows, ds.Columns, ds.BitsStored) == (40, 40, 12)
    assert float(ds.RescaleIntercept) == -1024 and ds.StudyInstanceUID and ds.SeriesInstanceUID
    meta = decode((root / path).read_bytes(), path).meta
    assert meta["study_instance_uid"] == ds.StudyInstanceUID and meta["modality"] == "DX"
    flat = repr(meta)
    assert ds.PatientID not in flat and str(ds.PatientName) not in flat and ds.PatientBirthDate not in flat


def test_monochrome1_is_inverted(phantoms):
    root, m = phantoms
    path = m[m.format == "dcm"].path.iloc[0]
    ds = pydicom.dcmread(root / path)
    mono2 = decode((root / path).read_bytes(), path).image
    ds.PhotometricInterpretation = "MONOCHROME1"
    buf = io.BytesIO()
    ds.save_as(buf)
    mono1 = decode(buf.getvalue(), "x.dcm").image
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # uint16 -> 16-bit grayscale, HxWx4 -> RGBA
    return buf.getvalue()


def test_bit_depths_and_colour():
    ramp16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    img16 = decode(_png(ramp16), "a16.png").image
    np.testing.assert_allclose(img16, ramp16 / 65535.0, atol=1e-6)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:4, :, 3] = 0  # transparent top half reads as background (black)
    img = decode(_png(rgba), "rgba.png").image
    assert img.shape == (8, 8) and img[:4].max() == 0 and abs(img[4:].mean() - 200 / 255) < 1e-6


@pytest.mark.parametrize(
    "data,problem",
    [
        (b"", "empty file"),
        (b"hello, I am text", "not a PNG, JPEG or DICOM"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt or truncated PNG"),
    ],
)
def test_bad_files_raise_named_errors(data, problem):
    with pytest.raises(DecodeError) as err:
        decode(data, "dir/bad.png")
    assert str(err.value).startswith("dir/bad.png: ") and problem in str(err.value)


def test_truncated_jpeg_and_size_guard():
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(buf, format="JPEG")
    with pytest.raises(DecodeError, match="truncated JPEG"):
        decode(buf.getvalue()[: len(buf.getvalue()) // 2], "cut.jpg")
    with pytest.raises(DecodeError, match="decompression-bomb guard"):
        decode(buf.getvalue(), "big.jpg", max_pixels=1000)


def test_dicom_without_pixels(phantoms):
    root, m = phantoms
    path = m[m.format == "dcm"].path.iloc[0]
    ds = pydicom.dcmread(root / path)
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DecodeError, match="no pixel data"):
        decode(buf.getvalue(), "nopix.dcm")
