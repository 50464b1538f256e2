import io

import numpy as np
import pydicom
import pytest
from PIL import Image

from medclf.config import PreprocessConfig
from medclf.imaging.decode import DecodeError, decode
from medclf.data.phantoms import generate
from medclf.imaging.preprocess import preprocess


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


# ---------------------------------------------------------------- real DICOM encodings (pydicom's test files)


def _frames(name: str, frames: str = "all") -> np.ndarray:
    from pydicom.data import get_testdata_file

    from medclf.imaging.decode import open_images

    images = open_images(open(get_testdata_file(name), "rb").read(), name, frames)
    return np.stack([images.image(f).image for f in images.frames])


# (uncompressed original, the same pixels in another encoding, largest allowed difference in [0, 1])
LOSSLESS_TWINS = [
    ("MR_small.dcm", "MR_small_RLE.dcm", 0),
    ("MR_small.dcm", "MR_small_bigendian.dcm", 0),
    ("MR_small.dcm", "MR_small_implicit.dcm", 0),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm", 0),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", 0),
    ("emri_small.dcm", "emri_small_RLE.dcm", 0),  # 10 frames each
    ("emri_small.dcm", "emri_small_big_endian.dcm", 0),
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", 0),
    ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm", 0),
    ("US1_UNCR.dcm", "US1_J2KR.dcm", 0),  # colour JPEG 2000, YBR_RCT
    ("SC_rgb.dcm", "SC_rgb_rle.dcm", 0),
    ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm", 0),  # JPEG Lossless process 14 SV1, colour
    ("SC_rgb.dcm", "SC_rgb_gdcm_KY.dcm", 0),  # JPEG 2000, RGB
    ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm", 0),  # palette colour
    ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm", 0),
    ("JPEG2000_UNC.dcm", "JPEG2000.dcm", 0),
    ("RG1_UNCR.dcm", "RG1_J2KR.dcm", 0),
    ("693_UNCR.dcm", "693_J2KR.dcm", 1e-6),
    ("SC_rgb.dcm", "SC_rgb_jpeg_dcmtk.dcm", 0.01),  # JPEG baseline, YBR_FULL: lossy
    ("SC_rgb.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm", 0.01),  # JPEG baseline, YBR_FULL_422
    ("SC_rgb.dcm", "SC_rgb_jls_lossy_line.dcm", 0.01),  # JPEG-LS near-lossless
]


@pytest.mark.parametrize("original,twin,tolerance", LOSSLESS_TWINS)
def test_every_encoding_decodes_to_the_same_image(original, twin, tolerance):
    a, b = _frames(original), _frames(twin)
    assert a.shape == b.shape and a.std() > 0.01
    assert np.abs(a - b).max() <= tolerance + 1e-7


def test_colour_jpeg2000_ict_is_converted_by_pydicom():
    rgb, ict = _frames("US1_UNCR.dcm"), _frames("US1_J2KI.dcm")  # lossy YBR_ICT
    assert np.abs(rgb - ict).mean() < 0.01  # the same picture, not YBR read as RGB


@pytest.mark.parametrize("name", ["JPGLosslessP14SV1_1s_1f_8b.dcm", "JPGExtended.dcm", "JPEG-LL.dcm",
                                  "image_dfl.dcm", "JPEGLSNearLossless_16.dcm", "color3d_jpeg_baseline.dcm"])
def test_encodings_without_a_twin_decode(name):
    images = _frames(name, "middle")
    assert images.shape[0] == 1 and images.std() > 0.01 and 0 <= images.min() and images.max() <= 1


def test_frame_policies():
    from pydicom.data import get_testdata_file

    from medclf.imaging.decode import DecodeError, open_images

    data = open(get_testdata_file("emri_small.dcm"), "rb").read()
    assert open_images(data, "e.dcm", "all").frames == list(range(1, 11))
    assert open_images(data, "e.dcm", "middle").frames == [5]
    np.testing.assert_array_equal(decode(data, "e.dcm").image, _frames("emri_small.dcm")[4])
    with pytest.raises(DecodeError, match=r"e.dcm: multi-frame DICOM \(10 frames\) refused"):
        open_images(data, "e.dcm", "refuse")
    single = open(get_testdata_file("MR_small.dcm"), "rb").read()
    assert open_images(single, "m.dcm", "refuse").frames == [None]


def _with(name: str, **attrs) -> bytes:
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(name))
    for key, value in attrs.items():
        if value is None:
            del ds[key]
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_voi_window_functions_follow_the_standard():
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    c, w = 40.0, 400.0
    linear = decode(_with("CT_small.dcm", WindowCenter=c, WindowWidth=w), "w.dcm").image
    expected = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1
    np.testing.assert_allclose(linear, expected, atol=1e-5)
    sigmoid = decode(_with("CT_small.dcm", WindowCenter=c, WindowWidth=w, VOILUTFunction="SIGMOID"), "s.dcm").image
    np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-4 * (hu - c) / w)), atol=1e-5)  # C.11.2.1.3.1
    assert np.abs(linear - sigmoid).max() > 0.05  # the function named in the header is the one applied


def test_voi_lut_sequence_is_applied():
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_voi_lut

    ds = pydicom.dcmread(get_testdata_file("vlut_04.dcm"))
    assert "VOILUTSequence" in ds
    lut = apply_voi_lut(ds.pixel_array, ds).astype(np.float64)
    depth = ds.VOILUTSequence[0].LUTDescriptor[2]
    np.testing.assert_allclose(decode(open(get_testdata_file("vlut_04.dcm"), "rb").read(), "v.dcm").image,
                               lut / (2**depth - 1), atol=1e-6)


def test_enhanced_multiframe_uses_each_frames_own_window():
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    assert "PerFrameFunctionalGroupsSequence" in ds and int(ds.NumberOfFrames) == 2
    for item in ds.PerFrameFunctionalGroupsSequence:
        if "FrameVOILUTSequence" not in item:
            item.FrameVOILUTSequence = [pydicom.Dataset()]
    ds.PerFrameFunctionalGroupsSequence[0].FrameVOILUTSequence[0].WindowCenter = 40
    ds.PerFrameFunctionalGroupsSequence[0].FrameVOILUTSequence[0].WindowWidth = 400
    ds.PerFrameFunctionalGroupsSequence[1].FrameVOILUTSequence[0].WindowCenter = 40
    ds.PerFrameFunctionalGroupsSequence[1].FrameVOILUTSequence[0].WindowWidth = 4000
    buf = io.BytesIO()
    ds.save_as(buf)
    narrow, wide = (decode(buf.getvalue(), "e.dcm", frame=f).image for f in (1, 2))
    assert narrow.std() > wide.std() * 1.5  # a narrow window stretches contrast


def test_pixel_less_dicom_is_not_an_image_but_a_stripped_image_is_an_error():
    from pydicom.data import get_testdata_file

    from medclf.imaging.decode import DecodeError, NotAnImage

    for name, modality in [("test-SR.dcm", "SR"), ("rtplan.dcm", "RTPLAN"), ("rtstruct.dcm", "RTSTRUCT"),
                           ("waveform_ecg.dcm", "ECG")]:
        with pytest.raises(NotAnImage, match=f"{name}: not an image: DICOM object without pixel data "
                                             f"\\(modality {modality}\\)"):
            decode(open(get_testdata_file(name), "rb").read(), name)
    with pytest.raises(DecodeError) as err:
        decode(_with("MR_small.dcm", PixelData=None), "stripped.dcm")
    assert not isinstance(err.value, NotAnImage) and "no pixel data" in str(err.value)


def test_header_claiming_a_huge_image_is_refused_before_decoding():
    import time

    from medclf.imaging.decode import DecodeError

    start = time.time()
    with pytest.raises(DecodeError, match="60000x60000.*decompression-bomb guard"):
        decode(_with("MR_small.dcm", Rows=60000, Columns=60000), "bomb.dcm")
    # 64 Mpx per frame passes the pixel guard, but its decoded bytes do not fit a decode task.
    with pytest.raises(DecodeError, match=r"8000x8000 frame with 1 sample\(s\) per pixel needs 610 MiB"):
        decode(_with("MR_small.dcm", Rows=8000, Columns=8000), "big.dcm")
    with pytest.raises(DecodeError, match=r"5000 frames of 1000x1000 .* decode to 9.3 GiB"):
        decode(_with("MR_small.dcm", Rows=1000, Columns=1000, NumberOfFrames=5000), "long.dcm")
    assert time.time() - start < 5


def test_errors_do_not_echo_file_bytes():
    secret = b"DOE^JANE^Q 19610412 and more text"
    with pytest.raises(Exception) as err:
        decode(secret, "note.txt")
    assert "DOE" not in str(err.value) and "1961" not in str(err.value)


@pytest.mark.parametrize("attrs", [
    {"WindowCenter": 40.0, "WindowWidth": 400.0},                                  # LINEAR (the default)
    {"WindowCenter": 40.0, "WindowWidth": 400.0, "VOILUTFunction": "LINEAR_EXACT"},
    {"WindowCenter": [40.0, 300.0], "WindowWidth": [400.0, 1500.0]},               # several views: the first
    {"WindowCenter": 40.0, "WindowWidth": 400.0, "RescaleSlope": -2.0, "RescaleIntercept": 100.0},
    {"WindowCenter": 40.0, "WindowWidth": 1.0},                                    # a step: pydicom's path
])
def test_the_one_pass_window_gives_pydicoms_image(attrs):
    """medclf.imaging.decode._linear_window folds the rescale and the window into one float32 pass; the
    image must be pydicom's apply_modality_lut + apply_voi_lut, mapped to [0, 1] by the window's range."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from medclf.imaging.decode import _linear_window

    data = _with("CT_small.dcm", **attrs)
    ds = pydicom.dcmread(io.BytesIO(data))
    values = apply_modality_lut(ds.pixel_array, ds)
    lo, hi = apply_voi_lut(np.array([-(2**31), 2**31 - 1], np.int64), ds)
    expected = (apply_voi_lut(values, ds) - lo) / (hi - lo)
    fast = _linear_window(ds.pixel_array, ds)
    assert (fast is None) == (attrs["WindowWidth"] == 1.0)  # width 1: no ramp to fold, pydicom decides
    np.testing.assert_allclose(decode(data, "w.dcm").image, expected, atol=1e-6)
