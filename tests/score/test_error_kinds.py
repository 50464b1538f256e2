"""Error rows say whether the failure is the file's for good (permanent) or may pass (transient);
the next night's skip set leaves transient ones out, so they are scored again. No Ray needed."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydicom.data import get_testdata_file

from medclf.config import PreprocessConfig
from medclf.imaging.stage import load_images, scored_key
from medclf.data.predictions import prediction_schema
from medclf.score.batch import scored_keys


def test_error_kind_of_each_failure(tmp_path, monkeypatch):
    (tmp_path / "text.png").write_text("not an image")
    shutil.copy(get_testdata_file("RG1_J2KR.dcm"), tmp_path / "j2k.dcm")  # as if no JPEG 2000 decoder, below
    locked = tmp_path / "locked.png"
    locked.write_bytes(b"\x89PNG")
    paths = [str(tmp_path / n) for n in ("text.png", "j2k.dcm", "gone.png", "locked.png")]

    import medclf.storage as storage

    real_read = storage.read_input

    def read(path, max_bytes=None):
        if path.endswith("locked.png"):
            raise PermissionError("AccessDenied")  # what s3fs raises for a 403
        return real_read(path, max_bytes)

    monkeypatch.setattr(storage, "read_input", read)
    import pydicom.pixels

    def no_decoder(*args, **kwargs):  # what pydicom raises when no installed plugin handles the transfer syntax
        raise RuntimeError("Unable to decompress 'JPEG 2000' pixel data because all plugins are missing dependencies")

    # (patched rather than removing plugins: which decoders are installed differs between machines)
    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_decoder)
    batches = list(load_images({"path": np.array(paths)}, PreprocessConfig(image_size=32).model_dump()))
    out = {k: [v for b in batches for v in b[k]] for k in ("path", "error", "error_kind")}
    kinds = dict(zip([os.path.basename(p) for p in out["path"]], out["error_kind"]))
    assert kinds == {"text.png": "permanent", "j2k.dcm": "transient", "gone.png": "transient",
                     "locked.png": "transient"}
    # the exception's type, not its message (library messages may quote file content)
    assert out["error"][3].endswith("locked.png: PermissionError while reading or decoding")


def test_transient_errors_are_not_in_the_skip_set(tmp_path):  # frames: tests/score/test_score_archive.py
    schema = prediction_schema(["A", "B"])
    rows = {f.name: [None] * 4 for f in schema}
    rows.update(path=["ok", "corrupt", "denied", "old"], checksum=["c1", "c2", "c3", "c4"], model_id=["m"] * 4,
                status=["ok", "error", "error", "error"], error_kind=[None, "permanent", "transient", None])
    part = tmp_path / "run_date=2026-11-23"
    part.mkdir()
    pq.write_table(pa.table(rows, schema=schema), part / "part-r-x-00000.parquet")
    keys = set(scored_keys(str(tmp_path), "m").tolist())
    # "old": an error row written before error_kind existed counts as settled, as it did then
    assert keys == {scored_key(p, c) for p, c in [("ok", "c1"), ("corrupt", "c2"), ("old", "c4")]}
