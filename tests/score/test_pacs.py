"""PACS over DICOMweb: a real Orthanc on 127.0.0.1 (started and stopped here), DICOM phantoms stored in it,
scored by medclf, and the SRs read back over QIDO/WADO. Skipped only where Orthanc is not installed."""

from __future__ import annotations

import glob
import http.server
import io
import os
import socket
import threading
from datetime import datetime, timedelta

import pandas as pd
import pydicom
import pytest

from medclf.config import load_config
from medclf.imaging import dicomweb
from medclf.imaging.decode import DecodeError
from medclf.imaging.dicomweb import DicomwebError, Instance, parse_source
from medclf.ops import orthanc as orthanc_mod
from medclf.report.dicom_sr import read_sr

from tests.conftest import TINY

NO_ORTHANC = orthanc_mod.missing()
needs_orthanc = pytest.mark.skipif(NO_ORTHANC is not None, reason=f"no local PACS: {NO_ORTHANC}")
USER, PASSWORD = os.environ["MEDCLF_DICOMWEB_USER"], os.environ["MEDCLF_DICOMWEB_PASSWORD"]


def _source_url(pacs, query="StudyDate=20250101-20261231&ModalitiesInStudy=DX"):
    return pacs.dicomweb.replace("http://", "dicomweb://") + "?" + query


@pytest.fixture
def pacs(tmp_path):
    with orthanc_mod.LocalOrthanc(USER, PASSWORD, folder=str(tmp_path / "orthanc")) as server:
        dicomweb._CLIENTS.clear()
        yield server
    dicomweb._CLIENTS.clear()


def _store_phantoms(pacs, phantom_root) -> dict:
    """The phantom test split's DICOM files, stored in the PACS; {SOP Instance UID: local path}."""
    out = {}
    for path in sorted(glob.glob(os.path.join(phantom_root, "test", "*", "*.dcm"))):
        with open(path, "rb") as f:
            data = f.read()
        assert pacs.upload(data)["Status"] == "Success"
        out[pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID] = path
    return out


# -- no Ray ---------------------------------------------------------------------------------------------------------

def test_source_urls_are_checked_before_any_work(monkeypatch):
    src = parse_source("dicomweb://pacs.example:8042/dicom-web?StudyDate=20260101-&Modality=CR&increment=true")
    assert src.http_base == "http://pacs.example:8042/dicom-web"
    assert src.study_filters == {"StudyDate": "20260101-"} and src.series_filters == {"Modality": "CR"}
    assert src.increment and src.lookback_days == 1 and src.results == "sr"
    assert parse_source("dicomwebs://h/dw").http_base == "https://h/dw"
    for bad, says in [("dicomweb://u:pw@h/dw", "credentials in the URL are refused"),
                      ("dicomweb://h/dw?StudyDate=2026", "StudyDate='2026'"),
                      ("dicomweb://h/dw?PatientName=X", "unknown query key 'PatientName'"),
                      ("dicomweb://h/dw?results=pdf", "results='pdf'"),
                      ("http://h/dw", "dicomweb://host")]:
        with pytest.raises(DicomwebError, match=says):
            parse_source(bad)
    assert "pw" not in str(pytest.raises(DicomwebError, parse_source, "dicomweb://u:pw@h/dw").value)
    monkeypatch.setenv(dicomweb.USER_ENV, "someone")
    monkeypatch.delenv(dicomweb.PASSWORD_ENV)
    with pytest.raises(DicomwebError, match="needs both"):
        dicomweb.check_credentials()


def test_instance_paths_hide_uids_unless_kept_and_resolve_back():
    src = parse_source("dicomweb://127.0.0.1:1/dicom-web")
    inst = Instance("1.2.3.4", "1.2.3.4.5", "1.2.3.4.5.6")
    kept = dicomweb.instance_path(src, inst, "keep", None)
    assert kept == "dicomweb://127.0.0.1:1/dicom-web/studies/1.2.3.4/series/1.2.3.4.5/instances/1.2.3.4.5.6"
    sealed = dicomweb.instance_path(src, inst, "hash", "site-key")
    assert "1.2.3.4" not in sealed and sealed == dicomweb.instance_path(src, inst, "hash", "site-key")  # stable key
    assert dicomweb.instance_path(src, inst, "hash", "other-key") != sealed
    assert dicomweb.parse_instance_path(sealed, "site-key") == ("http://127.0.0.1:1/dicom-web", inst)
    assert dicomweb.parse_instance_path(kept) == ("http://127.0.0.1:1/dicom-web", inst)
    with pytest.raises(DecodeError, match="not made with this site key"):
        dicomweb.parse_instance_path(sealed, "other-key")
    with pytest.raises(DicomwebError, match="needs the site key"):
        dicomweb.instance_path(src, inst, "drop", None)


def test_429_and_503_are_retried_with_back_off(monkeypatch):
    """A real HTTP server that answers 503, then 429, then the QIDO result: the listing waits and succeeds."""
    import time

    seen = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(time.monotonic())
            code = {1: 503, 2: 429}.get(len(seen), 200)
            body = b"[]" if code == 200 else b""
            self.send_response(code)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(dicomweb, "BACKOFF_MS", 50)
    try:
        src = parse_source(f"dicomweb://127.0.0.1:{server.server_port}/dicom-web")
        assert dicomweb.list_instances(src) == []
    finally:
        server.shutdown()
        dicomweb._CLIENTS.clear()
    assert len(seen) == 3
    # exponential back-off, 2^n * 50 ms: at least 100 ms, then at least 200 ms (load can only lengthen them)
    assert seen[1] - seen[0] >= 0.095 and seen[2] - seen[1] >= 0.195


def test_a_failed_connection_is_tried_once_more_and_then_the_task_stops_trying_that_pacs(monkeypatch):
    """A PACS that refuses connections costs one retry, not dicomweb-client's five tries with 15 s of
    back-off; the read task's later reads from it fail at once, as transient rows for the next run."""
    from urllib3.exceptions import MaxRetryError, NewConnectionError

    policy = dicomweb._retry_policy()
    error = NewConnectionError(None, "refused")
    once = policy.increment(method="GET", url="/x", error=error)  # the one retry
    with pytest.raises(MaxRetryError):
        once.increment(method="GET", url="/x", error=error)
    status = policy
    for _ in range(dicomweb.DICOMWEB_RETRIES - 1):  # 429/503 keep their DICOMWEB_RETRIES attempts
        status = status.increment(method="GET", url="/x", response=_response(503))
    with pytest.raises(MaxRetryError):
        status.increment(method="GET", url="/x", response=_response(503))

    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(dicomweb, "BACKOFF_MS", 10)
    src = parse_source(f"dicomweb://127.0.0.1:{port}/dicom-web")
    paths = [dicomweb.instance_path(src, Instance("1.2", "1.2.3", f"1.2.3.{i}"), "keep", None) for i in range(3)]
    down: set = set()
    try:
        with pytest.raises(DecodeError, match="unreachable") as first:
            dicomweb.read_instance(paths[0], down=down)
        assert first.value.transient and down == {src.http_base}
        for path in paths[1:]:
            with pytest.raises(DecodeError, match="not tried again") as later:
                dicomweb.read_instance(path, down=down)
            assert later.value.transient and path in str(later.value)
    finally:
        dicomweb._CLIENTS.clear()


def _response(status: int):
    from urllib3 import HTTPResponse

    return HTTPResponse(status=status, headers={}, preload_content=False)


@needs_orthanc
def test_reads_name_the_instance_and_say_whether_to_retry(pacs, phantom_root, monkeypatch):
    sops = _store_phantoms(pacs, phantom_root)
    src = parse_source(_source_url(pacs))
    listed = dicomweb.list_instances(src)
    assert sorted(i.sop for i in listed) == sorted(sops)
    monkeypatch.setenv("MEDCLF_UID_KEY", "k")  # the read side finds the site key in its environment
    path = dicomweb.instance_path(src, listed[0], "hash", "k")
    data = dicomweb.read_instance(path)
    assert pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID == listed[0].sop
    gone = dicomweb.instance_path(src, Instance(listed[0].study, listed[0].series, "1.2.3.999"), "hash", "k")
    with pytest.raises(DecodeError, match="not in the PACS") as exc:
        dicomweb.read_instance(gone)
    assert not exc.value.transient and str(exc.value).startswith(gone) and "1.2.3.999" not in str(exc.value)
    pacs.stop()
    with pytest.raises(DecodeError, match="unreachable") as exc:
        dicomweb.read_instance(path)
    assert exc.value.transient


@needs_orthanc
def test_wrong_credentials_are_a_transient_error(pacs, phantom_root, monkeypatch):
    _store_phantoms(pacs, phantom_root)
    src = parse_source(_source_url(pacs, ""))
    inst = dicomweb.list_instances(src)[0]
    dicomweb._CLIENTS.clear()
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, "wrong")
    with pytest.raises(DecodeError, match="refused access .HTTP 401") as exc:
        dicomweb.read_instance(dicomweb.instance_path(src, inst, "keep", None))
    assert exc.value.transient and "wrong" not in str(exc.value)


# -- with Ray: the whole job --------------------------------------------------------------------------------------

class _Model:
    def __init__(self, path):
        from medclf.model.artifact import load_card

        self.model_path, self.card = path, load_card(path)


@pytest.fixture(scope="module")
def pacs_model(tmp_path_factory):
    """A small_cnn artifact with seeded random weights for the phantoms' 32 px DICOM: the SR and row checks need
    a real model and real scores, not a trained one (and Ray Train's run would cost minutes and memory)."""
    import torch

    from medclf.model.artifact import ModelCard, save_artifact
    from medclf.model.networks import build_model

    torch.manual_seed(0)
    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], preprocess={"image_size": 32},
                     positive_class="POSITIVE", threshold=0.5)
    path = str(tmp_path_factory.mktemp("pacs_model") / "model")
    save_artifact(build_model("small_cnn", 2).eval(), card, path)
    return _Model(path)


def _cfg(phantom_root, tmp_path, *extra):
    return load_config(None, TINY + [f"data.root={phantom_root}", f"run.root={tmp_path / 'runs'}",
                                     "score.rows_per_file=4", *extra])


def _rows(output):
    from medclf.data.predictions import read_predictions

    return read_predictions(output)


def _srs(pacs) -> list:
    client = dicomweb.client(pacs.dicomweb)
    out = []
    for item in dicomweb._search(client.search_for_instances, filters={"Modality": "SR"}):
        s, se, i = (item[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
        out.append(client.retrieve_instance(s, se, i))
    return out


@needs_orthanc
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_round_trip_scores_the_pacs_and_the_srs_say_what_the_predictions_say(ray_cluster, pacs_model, pacs,
                                                                              phantom_root, tmp_path, caplog):
    from medclf.score.batch import run_scoring
    from medclf.score.pacs import run_pacs_scoring

    sops = _store_phantoms(pacs, phantom_root)
    cfg = _cfg(phantom_root, tmp_path)
    output = str(tmp_path / "predictions")
    run = run_pacs_scoring(cfg, "night1", _source_url(pacs, "ModalitiesInStudy=DX&increment=true"),
                           pacs_model.model_path, output)
    assert run.listed == len(sops) == 24
    assert run.scoring.scored == 24 and run.scoring.failed == 0
    assert run.sr_sent == 24 and run.sr_failed == 0 and run.watermark

    rows = _rows(output)
    assert len(rows) == 24 and set(rows["status"]) == {"ok"}
    # Today's privacy policy holds for PACS rows: no raw UID in the path or the UID columns, no patient data.
    table_text = rows.astype(str).to_csv()
    assert not any(uid in table_text for uid in sops) and "PHANTOM^" not in table_text
    assert not any(uid in caplog.text for uid in sops) and "PHANTOM^" not in caplog.text

    # The same DICOM files scored from local disk in the same session give the same probabilities.
    manifest = str(tmp_path / "local.csv")
    pd.DataFrame({"path": list(sops.values())}).to_csv(manifest, index=False)
    # the manifest lists files outside its own folder: allowed explicitly (medclf.imaging.confine)
    local_cfg = cfg.model_copy(update={"score": cfg.score.model_copy(
        update={"allowed_roots": sorted({os.path.dirname(p) for p in sops.values()})})})
    run_scoring(local_cfg, "local", manifest, pacs_model.model_path, str(tmp_path / "local_predictions"))
    local = _rows(str(tmp_path / "local_predictions")).set_index("path")
    assert set(local["status"]) == {"ok"}, local["error"].dropna().head(3).tolist()

    srs = _srs(pacs)
    assert len(srs) == 24
    by_sop = {}
    for sr in srs:
        values = read_sr(sr)
        assert sr.Modality == "SR" and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        by_sop[values["source"][1]] = (sr, values)
    assert set(by_sop) == set(sops)
    card = pacs_model.card
    for sop, path in sops.items():
        sr, v = by_sop[sop]
        source = pydicom.dcmread(path, stop_before_pixels=True)
        # References the source image, in its study, with its patient (as DICOM requires)
        assert v["source"] == (source.SOPClassUID, sop) and v["frame"] is None
        assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert (sr.PatientID, str(sr.PatientName)) == (source.PatientID, str(source.PatientName))
        assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == source.StudyInstanceUID
        ref = local.loc[path]
        assert v["status"] == "ok" and v["finding"] == ref["predicted_label"]
        for cls in card.classes:
            assert v["probabilities"][cls] == pytest.approx(ref[f"prob_{cls}"], abs=1e-6)
        assert v["threshold"] == pytest.approx(card.threshold)
        assert (v["model_id"], v["model_version"], v["run_id"]) == (card.model_id, card.created_at, "night1")
        assert "not a diagnosis" in v["comment"] and "reason" not in v
        # no site profile or calibration in this run: the SR says nothing of them (absent, not empty)
        assert "adaptation_id" not in v and "calibration_id" not in v and pd.isna(ref["adaptation_id"])

    # The next night: the query starts at the watermark less a day (these studies are older: none listed).
    again = run_pacs_scoring(cfg, "night2", _source_url(pacs, "ModalitiesInStudy=DX&increment=true"),
                             pacs_model.model_path, output)
    day_before = (datetime.strptime(run.watermark, "%Y%m%d") - timedelta(days=1)).strftime("%Y%m%d")
    assert again.window == {"ModalitiesInStudy": "DX", "StudyDate": f"{day_before}-"}
    assert again.listed == 0 and again.scoring.seen == 0 and again.sr_sent == 0
    # A full re-run of the same query: every image already scored, no row and no SR twice; the SR series
    # now in these studies are not listed (nothing to score).
    full = run_pacs_scoring(cfg, "night3", _source_url(pacs, "ModalitiesInStudy=DX"), pacs_model.model_path, output)
    assert full.listed == 24 and full.scoring.scored == 0 and full.scoring.already_scored == 24 and full.sr_sent == 0
    assert len(_rows(output)) == 24 and len(_srs(pacs)) == 24


@needs_orthanc
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_pacs_killed_mid_run_then_the_next_run_completes_nothing_lost_or_twice(ray_cluster, pacs_model,
                                                                                phantom_root, tmp_path):
    """Orthanc dies (SIGKILL, from its own request filter) at the 6th WADO-RS instance request of the run."""
    from medclf.score.pacs import run_pacs_scoring

    flag = tmp_path / "kill-armed"
    flag.write_text("")
    lua = f"""
count = 0
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if method == 'GET' and string.find(uri, '/instances/') and not string.find(uri, '/metadata') then
    local armed = io.open('{flag}', 'r')
    if armed then
      armed:close()
      count = count + 1
      if count >= 6 then os.execute('kill -9 $PPID') end
    end
  end
  return true
end
"""
    with orthanc_mod.LocalOrthanc(USER, PASSWORD, folder=str(tmp_path / "orthanc"), lua=lua) as pacs:
        dicomweb._CLIENTS.clear()
        sops = _store_phantoms(pacs, phantom_root)
        cfg = _cfg(phantom_root, tmp_path)
        output = str(tmp_path / "predictions")
        url = _source_url(pacs, "ModalitiesInStudy=DX&increment=true")
        first = run_pacs_scoring(cfg, "night1", url, pacs_model.model_path, output)
        assert not pacs.running()
        rows = _rows(output)
        assert len(rows) == 24 and 0 < first.scoring.scored < 24  # some read before it died, none lost
        failed = rows[rows["status"] == "error"]
        assert len(failed) == first.scoring.failed == 24 - first.scoring.scored
        assert set(failed["error_kind"]) == {"transient"} and failed["error"].str.contains("unreachable").all()
        assert first.watermark is None  # a night with work left does not move the increment on
        assert first.sr_sent == 0 and first.sr_failed == first.scoring.scored  # the PACS is gone: none delivered

        flag.unlink()
        pacs.start()
        dicomweb._CLIENTS.clear()
        second = run_pacs_scoring(cfg, "night2", url, pacs_model.model_path, output)
        assert second.scoring.scored == first.scoring.failed and second.scoring.already_scored == first.scoring.scored
        assert second.watermark
        rows = _rows(output)
        ok = rows[rows["status"] == "ok"]
        assert len(ok) == 24 and ok["path"].is_unique  # every image scored exactly once
        srs = _srs(pacs)
        assert sorted(read_sr(sr)["source"][1] for sr in srs) == sorted(sops)  # one SR each, none twice
        dicomweb._CLIENTS.clear()


@needs_orthanc
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_study_deleted_between_query_and_retrieve_is_a_permanent_error_row(ray_cluster, pacs_model, pacs,
                                                                           phantom_root, tmp_path, monkeypatch):
    from medclf.score import pacs as pacs_job

    sops = _store_phantoms(pacs, phantom_root)
    real_list = pacs_job.list_instances
    deleted = {}

    def list_then_delete(src, filters):
        listed = real_list(src, filters)  # the real QIDO query, then the study leaves the PACS
        study = listed[0].study
        deleted["sops"] = {i.sop for i in listed if i.study == study}
        orthanc_id = pacs.rest("POST", "/tools/lookup", study.encode())[0]["ID"]
        pacs.rest("DELETE", f"/studies/{orthanc_id}")
        return listed

    monkeypatch.setattr(pacs_job, "list_instances", list_then_delete)
    output = str(tmp_path / "predictions")
    run = pacs_job.run_pacs_scoring(_cfg(phantom_root, tmp_path), "night1", _source_url(pacs),
                                    pacs_model.model_path, output)
    gone = len(deleted["sops"])
    assert gone >= 1 and run.scoring.failed == gone and run.scoring.scored == 24 - gone
    rows = _rows(output)
    errors = rows[rows["status"] == "error"]
    assert len(errors) == gone and set(errors["error_kind"]) == {"permanent"}
    assert errors["error"].str.contains("not in the PACS .HTTP 404.: deleted after the query").all()
    assert run.sr_sent == 24 - gone and run.watermark  # permanent errors do not hold the increment back
    sr_sources = {read_sr(sr)["source"][1] for sr in _srs(pacs)}
    assert sr_sources == set(sops) - deleted["sops"]


def test_cli_refuses_a_bad_pacs_source_before_ray_starts(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    for url, says in [("dicomweb://admin:s3cret@127.0.0.1:1/dicom-web", "credentials in the URL are refused"),
                      ("dicomweb://127.0.0.1:1/dicom-web?StudyDate=yesterday", "StudyDate='yesterday'")]:
        proc = subprocess.run([sys.executable, "-m", "medclf.cli", "score", "--input", url, "--model", str(tmp_path),
                               "--set", f"run.root={tmp_path / 'runs'}"], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 2, proc.stderr
        assert says in proc.stderr and "s3cret" not in proc.stderr + proc.stdout
        assert "Started a local Ray instance" not in proc.stderr and not (tmp_path / "runs").exists()


def test_sr_names_the_site_profile_and_calibration_it_was_scored_with():
    """No PACS needed: an SR built for a row scored under a site profile and a site calibration carries
    both ids, and reads back to the same values (rendered as text, as a viewer lists them)."""
    from pydicom.data import get_testdata_file

    from medclf.report.dicom_sr import Result, build_sr, render_text

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    result = Result(status="ok", probabilities={"NORMAL": 0.25, "PNEUMONIA": 0.75}, finding="PNEUMONIA",
                    threshold=0.5, model_id="m-1", model_version="2026-12-04T00:00:00", run_id="night9",
                    adaptation_id="a" * 64, calibration_id="sitecal-" + "b" * 16)
    values = read_sr(build_sr(source, result))
    assert (values["adaptation_id"], values["calibration_id"]) == ("a" * 64, "sitecal-" + "b" * 16)
    assert values["finding"] == "PNEUMONIA" and values["probabilities"]["PNEUMONIA"] == pytest.approx(0.75)
    text = render_text(build_sr(source, result))
    assert "Site profile (label-free adaptation): " + "a" * 64 in text and "Site calibration: sitecal-" in text


def _wait_until_every_series_is_stable(pacs, seconds: float = 60) -> None:
    """Orthanc logs StableSeries StableAge (1 s here) after a series' last instance: wait for every series."""
    deadline = datetime.now() + timedelta(seconds=seconds)
    while True:
        stable = {c["ID"] for c in pacs.rest("GET", "/changes?limit=100000")["Changes"]
                  if c["ChangeType"] == "StableSeries"}
        waiting = set(pacs.rest("GET", "/series")) - stable
        if not waiting:
            return
        assert datetime.now() < deadline, f"{len(waiting)} series not stable after {seconds} s"
        threading.Event().wait(0.5)


@needs_orthanc
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_arrival_increment_lists_what_the_pacs_received_since_the_last_clean_run(ray_cluster, pacs_model, pacs,
                                                                                 phantom_root, tmp_path):
    """increment=arrival reads Orthanc's change log: a prior that arrives late, with a StudyDate long
    before the last run (which increment=date would never list again), is in the next night's run; the
    SRs sent back do not bring their studies back."""
    from medclf.score.pacs import run_pacs_scoring

    files = sorted(glob.glob(os.path.join(phantom_root, "test", "*", "*.dcm")))
    first, late = files[::2], files[1::2]
    for path in first:
        assert pacs.upload(open(path, "rb").read())["Status"] == "Success"
    _wait_until_every_series_is_stable(pacs)
    cfg = _cfg(phantom_root, tmp_path)
    output = str(tmp_path / "predictions")
    url = _source_url(pacs, "ModalitiesInStudy=DX&increment=arrival")
    night1 = run_pacs_scoring(cfg, "night1", url, pacs_model.model_path, output)
    assert night1.listed == len(first) and night1.scoring.scored == len(first) and night1.since_change is None
    assert night1.sr_sent == len(first) and night1.watermark

    late_sops = set()
    for path in late:  # priors imported late: StudyDate years before the watermark
        ds = pydicom.dcmread(path)
        ds.StudyDate = "19990101"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        assert pacs.upload(buf.getvalue())["Status"] == "Success"
        late_sops.add(ds.SOPInstanceUID)
    _wait_until_every_series_is_stable(pacs)  # night1's SR series too

    night2 = run_pacs_scoring(cfg, "night2", url, pacs_model.model_path, output)
    assert night2.since_change is not None and night2.window == {"ModalitiesInStudy": "DX"}
    assert night2.listed == len(late) and night2.scoring.scored == len(late) and night2.scoring.already_scored == 0
    assert night2.sr_sent == len(late) and night2.watermark
    rows = _rows(output)
    assert len(rows) == len(files) and rows["path"].is_unique and set(rows["status"]) == {"ok"}
    assert sorted(read_sr(sr)["source"][1] for sr in _srs(pacs) if read_sr(sr)["run_id"] == "night2") == \
        sorted(late_sops)

    # Nothing received since (the SR series night2 sent are reports, not listed): nothing listed.
    _wait_until_every_series_is_stable(pacs)  # night2's SR series too, so that night3 reads past them
    night3 = run_pacs_scoring(cfg, "night3", url, pacs_model.model_path, output)
    assert night3.listed == 0 and night3.scoring.seen == 0 and night3.sr_sent == 0
    assert night3.since_change > night2.since_change


def test_arrival_increment_needs_orthanc_dicomweb_root():
    assert parse_source("dicomweb://pacs:8042/dicom-web?increment=arrival").increment == "arrival"
    assert parse_source("dicomweb://pacs:8042/dicom-web?increment=true").increment == "date"
    with pytest.raises(DicomwebError, match="increment=arrival reads Orthanc's change log"):
        parse_source("dicomweb://pacs:8042/wado?increment=arrival")
    with pytest.raises(DicomwebError, match="expected arrival"):
        parse_source("dicomweb://pacs:8042/dicom-web?increment=yes")
