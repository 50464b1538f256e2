"""Scoring a real PACS-like archive: the pydicom + pydicom-data DICOM corpus (every encoding they
ship, multi-frame, pixel-less objects, deliberately broken files), files without extensions, and
hostile inputs (FIFO, /dev/zero, zip:// chains, over-size files, header bombs). Real Ray, real files.
"""

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from medclf.config import load_config
from medclf.data.predictions import read_predictions
from medclf.score.batch import run_scoring
from tests.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Files of the corpus that are broken on purpose (pydicom's own tests use them to exercise its
# error paths), with why: each must be an error row naming the file.
CORRUPT = {
    "JPEG-lossy.dcm": "12-bit JPEG Extended stream with a non-conformant scan header (libjpeg: scan start/stop "
                      "must be 0/63 for sequential modes); no PyPI decoder (libjpeg, GDCM, Pillow) accepts it",
    "JPEG2000-embedded-sequence-delimiter.dcm": "a sequence delimiter inside the JPEG 2000 fragment breaks the "
                                                "codestream header",
    "MR_truncated.dcm": "pixel data shorter than Rows x Columns x bytes",
    "badVR.dcm": "Number of Frames holds '1A', not a number",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "cut short inside the header: no DICOM element survives",
    "meta_missing_tsyntax.dcm": "parser fixture: a Pixel Data element without Rows/Columns",
    "nested_priv_SQ.dcm": "parser fixture: a Pixel Data element without Rows/Columns",
    "no_meta.dcm": "parser fixture: one private element, no DICOM object",
    "no_meta_group_length.dcm": "parser fixture: no SOP Class, no Modality, no pixels",
    "priv_SQ.dcm": "parser fixture: private sequences only",
    "UN_sequence.dcm": "parser fixture: one UN sequence only",
    "empty_charset_LEI.dcm": "parser fixture: two elements, no DICOM object",
}
# Well-formed DICOM objects that hold no image: skipped with the reason.
NOT_IMAGES = {"ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm", "reportsi.dcm",
              "reportsi_with_empty_number_tags.dcm", "rtplan.dcm", "rtplan_truncated.dcm", "rtstruct.dcm",
              "test-SR.dcm", "waveform_ecg.dcm"}


def corpus_files() -> list[str]:
    """Every .dcm file pydicom and pydicom-data ship (two folders)."""
    files = sorted({f for f in get_testdata_files("*.dcm") if os.path.isfile(f)})
    assert len(files) >= 140 and len({os.path.dirname(f) for f in files}) == 2  # pydicom's and pydicom-data's
    return files


def frames_in(path: str) -> int:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return int(ds.get("NumberOfFrames", 1) or 1)


def test_the_dicom_corpus_scores_one_row_per_frame(ray_cluster, trained_model, tmp_path):
    files = corpus_files()
    names = [os.path.basename(f) for f in files]
    assert set(CORRUPT) | NOT_IMAGES <= set(names)
    manifest = tmp_path / "corpus.csv"
    pd.DataFrame({"path": files}).to_csv(manifest, index=False)
    roots = sorted({os.path.dirname(f) for f in files})  # the manifest lives elsewhere (score.allowed_roots)
    cfg = load_config(None, TINY + ["score.decode_batch_size=16", "score.batch_size=64"],
                      {"score.allowed_roots": roots})
    start = time.time()
    summary = run_scoring(cfg, "corpus", str(manifest), trained_model.model_path, str(tmp_path / "pred"))
    seconds = time.time() - start
    pred = read_predictions(str(tmp_path / "pred"))
    pred["name"] = pred.path.map(os.path.basename)

    assert set(pred.path) == set(files)  # every file has a row
    for path, rows in pred.groupby("path"):
        name = os.path.basename(path)
        if name in CORRUPT:
            assert (rows.status == "error").all() and rows.error.str.startswith(path).all(), (name, rows.error)
        elif name in NOT_IMAGES:
            assert list(rows.status) == ["skipped"], (name, list(rows.status), list(rows.error))
            assert re.fullmatch(re.escape(path) + r": not an image: DICOM object without pixel data \(modality \w+\)",
                                rows.error.iloc[0]), rows.error.iloc[0]
        else:
            n = frames_in(path)
            assert list(rows.status) == ["ok"] * n, (name, rows.error.dropna().tolist())
            if n == 1:
                assert rows.frame.isna().all(), name  # one image: no frame number
            else:
                assert sorted(rows.frame.astype(int)) == list(range(1, n + 1)), name
            assert rows.predicted_label.notna().all()
    # Counts add up and come from the rows.
    by_status = pred.status.value_counts().to_dict()
    assert summary.scored == by_status["ok"] and summary.failed == by_status["error"]
    assert summary.not_images == by_status["skipped"] == len(NOT_IMAGES)
    assert summary.seen == len(pred) == summary.scored + summary.skipped + summary.failed + summary.out_of_scope
    assert summary.files_listed == len(files) and summary.out_of_scope == 0
    assert len(pred) > 350  # multi-frame files add one row per frame
    print(f"corpus: {len(files)} files, {len(pred)} rows in {seconds:.0f}s: {by_status}")  # ~1 min on an idle VM


def test_files_without_extension_multiframe_and_reruns(ray_cluster, trained_model, tmp_path):
    archive = tmp_path / "night #2"  # a '#' in a path is a path, not a YAML comment
    (archive / "series").mkdir(parents=True)
    shutil.copy(get_testdata_file("MR_small.dcm"), archive / "series" / "IM0001")  # no extension, DICM marker
    shutil.copy(get_testdata_file("CT_small.dcm"), archive / "series" / "1.2.840.113619.2.55.320")  # UID name
    shutil.copy(get_testdata_file("emri_small.dcm"), archive / "cine.dcm")  # 10 frames
    shutil.copy(get_testdata_file("test-SR.dcm"), archive / "report.dcm")
    (archive / "notes.txt").write_text("not an image\n")
    (archive / "README").write_text("no extension and no DICM marker either\n")
    out = tmp_path / "pred"
    cfg = load_config(None, TINY + ["score.extensions=[.dcm, dicom]"])
    first = run_scoring(cfg, "n1", str(archive), trained_model.model_path, str(out))
    assert (first.files_listed, first.filtered) == (4, 2)
    assert (first.seen, first.scored, first.not_images, first.failed, first.already_scored) == (13, 12, 1, 0, 0)
    pred = read_predictions(str(out)).assign(name=lambda d: d.path.map(os.path.basename))
    assert sorted(pred[pred.name == "cine.dcm"].frame) == list(range(1, 11))
    assert pred[pred.name == "IM0001"].frame.isna().all() and (pred[pred.name == "IM0001"].status == "ok").all()
    assert pred.loc[pred.name == "report.dcm", "status"].item() == "skipped"
    assert "files listed 4 (2 left out by score.extensions); images seen 13: scored 12, skipped 1" in str(first)

    # Re-run: every image (each frame) was scored before -> counted as already scored, nothing written.
    again = run_scoring(cfg, "n2", str(archive), trained_model.model_path, str(out))
    assert (again.seen, again.already_scored, again.scored, again.files) == (13, 13, 0, [])
    # The middle frame only, into a fresh output.
    middle = load_config(None, TINY + ["score.extensions=[.dcm, dicom]", "score.frames=middle"])
    mid = run_scoring(middle, "m", str(archive), trained_model.model_path, str(tmp_path / "mid"))
    rows = read_predictions(str(tmp_path / "mid"))
    assert mid.seen == 4 and rows.loc[rows.path.str.endswith("cine.dcm"), "frame"].tolist() == [5]
    refuse = load_config(None, TINY + ["score.frames=refuse"])
    ref = run_scoring(refuse, "r", str(archive / "cine.dcm"), trained_model.model_path, str(tmp_path / "ref"))
    row = read_predictions(str(tmp_path / "ref")).iloc[0]
    assert ref.failed == 1 and "multi-frame DICOM (10 frames) refused" in row.error


@pytest.mark.timeout(300)  # a FIFO or /dev/zero that were read would block or run until this fires
def test_hostile_inputs_become_error_rows_quickly(ray_cluster, trained_model, phantom_root, tmp_path):
    good, other = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(phantom_root, "test")) for f in sorted(fs)
                   if f.endswith(".png")][:2]
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)  # a reader would block forever
    zero = tmp_path / "zero.dcm"
    zero.symlink_to("/dev/zero")  # a reader would never finish
    big = tmp_path / "big.dcm"
    big.write_bytes(b"\0" * (3 * 2**20))
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows, ds.Columns = 60000, 60000  # 3.6 Gpx claimed by a 9 KB file
    ds.save_as(tmp_path / "bomb.dcm")
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("inner.png", open(good, "rb").read())
    entries = {
        str(fifo): "pipe.dcm: not a regular file (a FIFO); not read",
        str(zero): "zero.dcm: resolves to /dev (never read)",  # the symlink is resolved before anything is opened
        "/etc/hosts": "outside score.allowed_roots",
        "/proc/self/environ": "resolves to /proc (never read)",
        str(tmp_path / ".." / ".." / "etc" / "hosts"): "outside score.allowed_roots",
        "file://relative/x.png": "file:// URL with a host or a relative path",
        f"file://{other}": None,  # normalised to its local path
        str(big): "big.dcm: file is 3.0 MiB, over the 2 MiB limit (score.max_file_mb); not read",
        str(tmp_path / "bomb.dcm"): "bomb.dcm: image is 60000x60000 (3600 Mpx), over the 64 Mpx limit",
        f"zip://inner.png::{archive}": "only local paths and s3:// URLs are read",
        "memory://x.png": "only local paths and s3:// URLs are read",
        good: None,
    }
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": list(entries)}).to_csv(manifest, index=False)
    cfg = load_config(None, TINY + ["score.max_file_mb=2"], {"score.allowed_roots": [str(tmp_path), phantom_root]})
    summary = run_scoring(cfg, "hostile", str(manifest), trained_model.model_path, str(tmp_path / "pred"))
    pred = read_predictions(str(tmp_path / "pred")).set_index("path")
    ok = sum(problem is None for problem in entries.values())
    wrong = {p: (pred.loc[p, "status"], pred.loc[p, "error"]) for p, problem in entries.items()
             if p in pred.index and (pred.loc[p, "status"] == "ok") != (problem is None)}
    assert not wrong and len(pred) == len(entries), wrong  # names the entry whose row is not what it should be
    assert (summary.failed, summary.scored) == (len(entries) - ok, ok)
    refused = pred[pred.error.fillna("").str.contains("allowed_roots|never read|file:// URL")]
    assert (refused.error_kind == "permanent").all() and (refused["size"] == -1).all()  # never read, never retried
    for path, problem in entries.items():
        row = pred.loc[path]
        if problem is None:
            assert row.status == "ok"
        else:
            assert row.status == "error" and row.error.startswith(path) and problem in row.error, row.error


def test_manifest_or_input_with_other_urls_is_refused(tmp_path, capsys):
    from medclf.cli import run_command

    rc = run_command("score", ["--input", "http://example.org/a.png", "--model", str(tmp_path),
                               "--run-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "http://example.org/a.png: only local paths and s3:// URLs are read" in err


def test_cli_scores_a_folder_with_a_hash_and_verbose_s3_logs_no_credentials(ray_cluster, trained_model, phantom_root,
                                                                            s3_bucket, tmp_path):
    import ray
    import s3fs

    folder = tmp_path / "dir #2"
    folder.mkdir()
    pngs = sorted(f for f in os.listdir(os.path.join(phantom_root, "test", "NORMAL")) if f.endswith(".png"))[:3]
    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    for name in pngs:
        shutil.copy(os.path.join(phantom_root, "test", "NORMAL", name), folder / name)
        s3.put(str(folder / name), f"{s3_bucket}/archive/{name}")
    key_id, token = "AKIAMEDCLFTESTKEY7Q2", "medclf-session-token-must-not-be-logged"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key_id, "AWS_SESSION_TOKEN": token}
    base = [sys.executable, os.path.join(ROOT, "jobs", "score.py"), "--model", trained_model.model_path,
            "--run-root", str(tmp_path / "runs"), "--set", f"ray.address={ray.get_runtime_context().gcs_address}",
            "--set", "score.cpus_per_actor=0.5", "--set", "score.extensions=[.png]"]

    local = subprocess.run(base + ["--input", f"{folder}/", "--output", str(tmp_path / "p1")], capture_output=True,
                           text=True, timeout=300, env=env)
    assert local.returncode == 0, local.stderr[-3000:]
    assert sorted(read_predictions(str(tmp_path / "p1")).path) == [str(folder / n) for n in pngs]

    remote = subprocess.run(base + ["-v", "--input", f"{s3_bucket}/archive", "--output", f"{s3_bucket}/pred"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert remote.returncode == 0, remote.stderr[-3000:]
    log = remote.stdout + remote.stderr
    assert "DEBUG medclf" in log  # -v did turn on our debug logging
    assert len(read_predictions(f"{s3_bucket}/pred")) == len(pngs)
    for secret in (key_id, token, "x-amz-security-token", "X-Amz-Security-Token"):
        assert secret not in log, f"{secret} in the -v log"
    assert np.all(read_predictions(f"{s3_bucket}/pred").status == "ok")


def test_grad_cam_rows_carry_the_frame(ray_cluster, trained_model, tmp_path):
    from medclf.report.gradcam import run_explain

    cine, single = get_testdata_file("emri_small.dcm"), get_testdata_file("MR_small.dcm")
    index = run_explain([cine, single, get_testdata_file("test-SR.dcm")], trained_model.model_path,
                        str(tmp_path / "cam"), cpus_per_actor=0.5)
    ok = index[index.status == "ok"]
    assert sorted(ok[ok.path == cine].frame) == list(range(1, 11)) and ok[ok.path == single].frame.isna().all()
    assert ok.heatmap_png.nunique() == 11 and all(os.path.exists(p) for p in ok.heatmap_png)
    assert index.loc[index.path.str.endswith("test-SR.dcm"), "status"].tolist() == ["skipped"]
