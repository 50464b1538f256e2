"""What real archives contain: broken files, odd bit depths, real DICOM, and identifying headers.

The job runs as a user would run it (`jobs/score.py` in a subprocess, joined to the test
session's Ray cluster) so its exit status and its whole log are checked too.
"""

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medclf.imaging.decode import decode
from medclf.data.predictions import read_predictions

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHI = ["DOE^JANE^Q", "MRN7734921", "19610412", "12 Elm Street Springfield", "ALT-ID-5551234"]


def run_score_job(input_dir, model, output, tmp_path, *extra):
    import ray

    cmd = [sys.executable, os.path.join(ROOT, "jobs", "score.py"), "--config", os.path.join(ROOT, "configs", "demo.yaml"),
           "--input", str(input_dir), "--model", model, "--output", str(output), "--run-root", str(tmp_path / "runs"),
           "--set", f"ray.address={ray.get_runtime_context().gcs_address}", "--set", "score.cpus_per_actor=0.5",
           "--set", "score.extensions=[.png, .jpg, .jpeg, .dcm, .txt]", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=500)


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_archive(phantom_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("messy")
    phantom_png = next(p for p in sorted(os.listdir(os.path.join(phantom_root, "test", "POSITIVE"))) if p.endswith(".png"))
    phantom_dcm = phantom_png.replace(".png", ".dcm")
    shutil.copy(os.path.join(phantom_root, "test", "POSITIVE", phantom_png), d / "good phantom (1).png")
    shutil.copy(os.path.join(phantom_root, "test", "POSITIVE", phantom_dcm), d / "good phantom (1).dcm")
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), d / "chest_cr.dcm")  # real CR, MONOCHROME1, 15-bit
    shutil.copy(get_testdata_file("CT_small.dcm"), d / "ct_small.dcm")  # real CT with rescale
    jpeg = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((96, 96)) * 255).astype(np.uint8)).save(jpeg, format="JPEG")
    (d / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("this is a note, not an image\n")
    (d / "deep16.png").write_bytes(_png((np.arange(96 * 96).reshape(96, 96) * 7 % 65535).astype(np.uint16)))
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 180, 255
    (d / "rgba.png").write_bytes(_png(rgba))
    ds = pydicom.dcmread(os.path.join(phantom_root, "test", "POSITIVE", phantom_dcm))
    del ds.PixelData
    ds.save_as(d / "no_pixels.dcm")
    shutil.copy(get_testdata_file("RG1_J2KR.dcm"), d / "chest_j2k.dcm")  # JPEG 2000: Pillow's OpenJPEG decodes it
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), d / "mr_jpegls.dcm")  # JPEG-LS: pylibjpeg-libjpeg
    Image.new("1", (30000, 30000)).save(d / "bomb.png")  # 900 Mpx, a few hundred KB on disk
    return d


EXPECTED_ERRORS = {
    "truncated.jpg": "corrupt or truncated JPEG",
    "zero.png": "empty file (0 bytes)",
    "text.png": "not a PNG, JPEG or DICOM file",
    "no_pixels.dcm": "DICOM has no pixel data",
    "bomb.png": "30000x30000 (900 Mpx), over the 64 Mpx limit (decompression-bomb guard)",
}
SCORED = ["good phantom (1).png", "good phantom (1).dcm", "chest_cr.dcm", "ct_small.dcm", "deep16.png", "rgba.png",
          "chest_j2k.dcm", "mr_jpegls.dcm"]


def test_bad_input_loses_nothing(ray_cluster, trained_model, messy_archive, tmp_path):
    out = tmp_path / "pred"
    job = run_score_job(messy_archive, trained_model.model_path, out, tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    assert f"failed {len(EXPECTED_ERRORS)}" in job.stdout and "5 file(s) failed" in job.stdout
    pred = read_predictions(str(out))
    by_name = pred.assign(name=pred.path.map(os.path.basename)).set_index("name")
    assert sorted(by_name.index) == sorted(os.listdir(messy_archive))  # one row per file
    for name, problem in EXPECTED_ERRORS.items():
        row = by_name.loc[name]
        assert row.status == "error" and problem in row.error and row.error.startswith(str(messy_archive / name))
        assert pd.isna(row.predicted_label) and np.isnan(row.prob_POSITIVE)
    for name in SCORED:
        row = by_name.loc[name]
        assert row.status == "ok" and pd.isna(row.error) and row.predicted_label in ("NORMAL", "POSITIVE"), name
    assert by_name.loc["ct_small.dcm", "modality"] == "CT" and by_name.loc["chest_cr.dcm", "modality"] == "CR"
    # The JPEG 2000 copy of the chest CR decodes to the same image as the uncompressed one (lossless).
    assert by_name.loc["chest_j2k.dcm", "prob_POSITIVE"] == pytest.approx(
        by_name.loc["chest_cr.dcm", "prob_POSITIVE"], abs=1e-5)
    # The same phantom as PNG and as DICOM gets the same scores.
    assert by_name.loc["good phantom (1).png", "prob_POSITIVE"] == pytest.approx(
        by_name.loc["good phantom (1).dcm", "prob_POSITIVE"], abs=1e-5)

    strict = run_score_job(messy_archive, trained_model.model_path, tmp_path / "pred2", tmp_path, "--fail-on-error")
    assert strict.returncode == 1 and "5 file(s) failed" in strict.stdout


def test_jpeg2000_without_its_decoder_is_a_clear_error():
    from pydicom.pixels.decoders import JPEG2000LosslessDecoder

    from medclf.imaging.decode import DecodeError

    data = open(get_testdata_file("RG1_J2KR.dcm"), "rb").read()
    plugins = [name for name in ("pillow", "pylibjpeg") if name in JPEG2000LosslessDecoder.available_plugins]
    for name in plugins:
        JPEG2000LosslessDecoder.remove_plugin(name)  # as on a machine without OpenJPEG
    try:
        with pytest.raises(DecodeError, match=r"RG1_J2KR.dcm: cannot decode pixel data with transfer syntax "
                                              r"JPEG 2000 Image Compression \(Lossless Only\)"):
            decode(data, "RG1_J2KR.dcm")
    finally:
        for name in plugins:
            JPEG2000LosslessDecoder.add_plugin(name, (f"pydicom.pixels.decoders.{name}", "_decode_frame"))
    assert decode(data, "RG1_J2KR.dcm").image.shape == (1955, 1841)


def test_real_dicom_orientation_and_intensity():
    cr = decode(open(get_testdata_file("RG1_UNCR.dcm"), "rb").read(), "RG1_UNCR.dcm")
    assert cr.meta["photometric"] == "MONOCHROME1" and cr.image.shape == (1955, 1841)
    h, w = cr.image.shape
    rows = slice(h // 3, 2 * h // 3)
    mediastinum = cr.image[rows, w * 9 // 20: w * 11 // 20].mean()
    lungs = (cr.image[rows, w // 5: w * 2 // 5].mean() + cr.image[rows, w * 3 // 5: w * 4 // 5].mean()) / 2
    assert lungs < mediastinum - 0.1  # after MONOCHROME1 inversion, air-filled lungs are dark
    assert cr.image[: h // 20, w // 2].mean() > lungs  # and the image is upright: no flip, no transpose
    ct = decode(open(get_testdata_file("CT_small.dcm"), "rb").read(), "CT_small.dcm")
    assert ct.meta["modality"] == "CT" and ct.image.shape == (128, 128)
    body, air = ct.image[40:90, 40:90].mean(), ct.image[:10, :10].mean()
    assert body > air + 0.3  # tissue brighter than the air outside the patient


PATIENT_FILE = "DOE_JANE_MRN7734921_chest"  # archives name files after patients more often than not


def ray_session_logs():
    """Every log file of the test session's Ray cluster: driver, raylet, and each worker's output."""
    import ray

    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    for dirpath, _, files in os.walk(logs):
        for f in files:
            yield os.path.join(dirpath, f)


def test_no_phi_in_outputs_or_logs(ray_cluster, trained_model, phantom_root, tmp_path):
    from medclf.imaging.privacy import UID_KEY_ENV, protect_uid

    src = tmp_path / "archive"
    src.mkdir()
    dcms = sorted(p for p in os.listdir(os.path.join(phantom_root, "test", "NORMAL")) if p.endswith(".dcm"))[:3]
    uids = {}
    for i, name in enumerate(dcms):
        ds = pydicom.dcmread(os.path.join(phantom_root, "test", "NORMAL", name))
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI[0], PHI[1], PHI[2]
        ds.PatientAddress, ds.OtherPatientIDs = PHI[3], PHI[4]
        if i == 2:
            del ds.PixelData  # an error row must not leak either
        ds.save_as(src / f"{PATIENT_FILE}_{i}.dcm")
        uids[str(src / f"{PATIENT_FILE}_{i}.dcm")] = str(ds.SOPInstanceUID)
    out = tmp_path / "pred"
    job = run_score_job(src, trained_model.model_path, out, tmp_path, "-v", "--set", "score.uids=hash")
    assert job.returncode == 0, job.stderr[-3000:]
    texts = {"job stdout": job.stdout, "job stderr": job.stderr}
    for folder in (out, tmp_path / "runs"):
        for dirpath, _, files in os.walk(folder):
            for f in files:
                p = os.path.join(dirpath, f)
                if f.endswith(".parquet"):
                    # decompressed cell values, not zstd bytes; `path` (and the error naming it) are
                    # the site's own link to the file, by design
                    texts[p] = pd.read_parquet(p).drop(columns=["path", "error"]).to_csv()
                else:
                    texts[p] = open(p, "rb").read().decode("latin-1")
    for p in ray_session_logs():
        texts[p] = open(p, "rb").read().decode("latin-1")
    pred = read_predictions(str(out))
    assert any(p.endswith(".parquet") for p in texts) and len(pred) == 3
    assert pred.set_index("path").loc[str(src / f"{PATIENT_FILE}_2.dcm"), "error"].endswith(
        "DICOM has no pixel data (an image object without a PixelData element)")
    key = os.environ[UID_KEY_ENV]
    for row in pred[pred.status == "ok"].itertuples():  # keyed hashes: the site re-links with its key
        assert row.sop_instance_uid == protect_uid(uids[row.path], "hash", key) != uids[row.path]
    secrets = PHI + [PATIENT_FILE, *uids.values()]
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked into {where}"
