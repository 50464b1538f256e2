"""The decode stage and the model stage of scoring as plain functions (no Ray): which rows a file
becomes (one per frame, skipped, error), what the rows carry, and how re-runs skip them."""

import os
import zipfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medclf.model.artifact import ModelCard, save_artifact
from medclf.model.networks import build_model
from medclf.imaging.stage import ALREADY_SCORED, load_images, scored_key
from medclf.score.batch import Predictor


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained small CNN artifact: the rows, not the scores, are under test here."""
    dest = str(tmp_path_factory.mktemp("m") / "model")
    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], preprocess={"image_size": 32})
    save_artifact(build_model("small_cnn", 2), card, dest)
    return dest


def score(model, paths, **kwargs):
    predictor = Predictor(model, "run", threads=1)
    spec = {"image_size": 32}
    tables = [predictor(b) for b in load_images({"path": np.array(paths, object)}, spec, rows_per_batch=4, **kwargs)]
    return pa.concat_tables(tables).to_pandas()


def test_rows_per_frame_skips_errors_and_reruns(model, tmp_path):
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.dcm"
    zero.symlink_to("/dev/zero")
    (tmp_path / "big.dcm").write_bytes(b"\0" * (3 * 2**20))
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(tmp_path / "bomb.dcm")
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("inner.dcm", open(get_testdata_file("MR_small.dcm"), "rb").read())
    single, cine, sr = (get_testdata_file(n) for n in ("MR_small.dcm", "emri_small.dcm", "test-SR.dcm"))
    hostile = {str(fifo): "not a regular file (a FIFO); not read",
               str(zero): "resolves to /dev (never read)",  # the symlink is resolved before anything is opened
               str(tmp_path / "big.dcm"): "over the 2 MiB limit (score.max_file_mb); not read",
               str(tmp_path / "bomb.dcm"): "60000x60000 (3600 Mpx), over the 64 Mpx limit",
               f"zip://inner.dcm::{tmp_path / 'a.zip'}": "only local paths and s3:// URLs are read",
               get_testdata_file("MR_truncated.dcm"): "cannot decode pixel data"}
    paths = [single, cine, sr, *hostile]
    rows = score(model, paths, frames="all", max_file_bytes=2 * 2**20)

    assert len(rows) == 1 + 10 + 1 + len(hostile) and rows.first_row.sum() == len(paths)
    assert rows[rows.path == single].frame.isna().all() and (rows[rows.path == single].status == "ok").all()
    frames = rows[rows.path == cine]
    assert sorted(frames.frame) == list(range(1, 11)) and (frames.status == "ok").all()
    report = rows[rows.path == sr].iloc[0]
    assert report.status == "skipped" and report.error == f"{sr}: not an image: DICOM object without pixel data " \
                                                         "(modality SR)"
    for path, problem in hostile.items():
        row = rows[rows.path == path].iloc[0]
        assert row.status == "error" and row.error.startswith(path) and problem in row.error, row.error
        assert np.isnan(row.prob_POSITIVE) and pd.isna(row.predicted_label)

    keys = np.unique(np.array([scored_key(p, c, None if np.isnan(f) else int(f))
                               for p, c, f in zip(rows.path, rows.checksum, rows.frame.astype(float)) if c],
                              np.uint64))
    again = score(model, [single, cine], frames="all", skip_keys=keys)
    assert len(again) == 11 and (again.status == ALREADY_SCORED).all()  # each frame known, none decoded again
    middle = score(model, [cine], frames="middle")
    assert middle.frame.tolist() == [5]
