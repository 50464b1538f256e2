"""Score a PACS over DICOMweb and send the results back as DICOM SR: the nightly job against a PACS.

    QIDO-RS listing (medclf.imaging.dicomweb) -> manifest of instance paths -> run_scoring (the same
    lease, exactly-once commits and skip keys as for files; WADO-RS reads in the decode tasks)
    -> one Comprehensive SR per scored image (medclf.report.dicom_sr), STOW-RS to the PACS
    -> the watermark, when the run left nothing to try again.

The increment, one of two kinds; each keeps a watermark (`<output>/_dicomweb_watermark-<query
hash>.json`) that moves only after a run with no transient error and no SR left unsent, so what a
failed night missed is listed again. Anything listed twice is skipped by the skip keys (SOP
Instance UID path, bytes, frame): overlap costs a re-download, never a duplicate row or SR.
- `increment=arrival` (Orthanc): the series the PACS received since the last clean run, read from
  Orthanc's change log (`StableSeries` entries after the stored change number), then matched
  against the query over QIDO-RS. Exact: a prior imported weeks late is in the next night's run.
- `increment=date` (any DICOMweb server; DICOMweb has no "received since" query): StudyDate from
  the last clean run's date less `lookback_days` onward. A study whose StudyDate is older than that
  window when it reaches the PACS is not in the increment.

The SRs carry the source's patient and study attributes (DICOM requires them); those are read by
this driver from WADO-RS metadata for the SR only, and never written to the predictions or logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Optional

from medclf import storage
from medclf.config import Config
from medclf.imaging.dicomweb import (DicomwebError, Instance, Source, _search, check_credentials, client,
                                     instance_path, last_change, list_instances, parse_source,
                                     series_received_since, site_key)
from medclf.imaging.privacy import check_uid_policy, uid_key
from medclf.score.batch import ScoreSummary, run_scoring

log = logging.getLogger(__name__)
STOW_BATCH = 32  # SRs per STOW-RS request


@dataclass
class PacsRun:
    scoring: ScoreSummary
    listed: int = 0
    window: dict = field(default_factory=dict)  # the study-level query this run used
    since_change: Optional[int] = None  # increment=arrival: the change-log number this run listed after
    sr_sent: int = 0
    sr_failed: int = 0
    watermark: Optional[str] = None  # the date now stored, None when it did not move

    def __str__(self) -> str:
        moved = f"watermark -> {self.watermark}" if self.watermark else "watermark not moved"
        since = f", received after change {self.since_change}" if self.since_change is not None else ""
        return (f"{self.scoring}\nPACS: {self.listed} instance(s) listed ({self.window or 'no study filter'}{since}); "
                f"SR sent {self.sr_sent}, SR failed {self.sr_failed}; {moved}")


def check_pacs_input(cfg: Config, url: Optional[str] = None) -> Source:
    """Everything checkable before Ray starts: the URL, the credentials' presence, the UID policy's key."""
    src = parse_source(url or cfg.score.input)
    check_credentials()
    check_uid_policy(cfg.score.uids, uid_key(cfg.score.uid_key, cfg.score.uid_key_file))
    if cfg.score.uids != "keep" and not site_key():
        raise DicomwebError(f"DICOMweb input with score.uids={cfg.score.uids}: set the site key in the environment "
                            "(MEDCLF_UID_KEY); the read tasks decrypt the instance paths with it, and a key in the "
                            "config file does not reach them")
    return src


def watermark_path(output: str, src: Source) -> str:
    query = json.dumps([src.url, src.study_filters, src.series_filters], sort_keys=True)
    return storage.join(output, f"_dicomweb_watermark-{hashlib.sha256(query.encode()).hexdigest()[:12]}.json")


def read_watermark(output: str, src: Source) -> Optional[dict]:
    """The last clean run's watermark under increment (None: no increment, or no clean run yet)."""
    path = watermark_path(output, src)
    return json.loads(storage.read_bytes(path)) if src.increment and storage.exists(path) else None


def study_window(src: Source, mark: Optional[dict]) -> dict:
    """The study-level QIDO filters: the source's, with StudyDate starting at the watermark under increment=date."""
    filters = dict(src.study_filters)
    if src.increment != "date" or not mark:
        return filters
    through = datetime.strptime(mark["through"], "%Y%m%d")
    start = (through - timedelta(days=src.lookback_days)).strftime("%Y%m%d")
    date = filters.get("StudyDate") or "-"
    lo, hi = date.split("-", 1) if "-" in date else (date, date)
    filters["StudyDate"] = f"{max(lo, start)}-{hi}"
    return filters


def run_pacs_scoring(cfg: Config, run_id: str, url: str, model_path: str, output: str,
                     rescore: Optional[bool] = None) -> PacsRun:
    from medclf.model.artifact import load_card

    src = check_pacs_input(cfg, url)
    card = load_card(model_path)
    listed_through = datetime.now(timezone.utc).strftime("%Y%m%d")  # before listing: later arrivals come next time
    mark = read_watermark(output, src)
    window = study_window(src, mark)
    since = change = None
    if src.increment == "arrival":
        since = mark.get("change") if mark else None
        last = last_change(src)
        if since is not None and last < since:
            log.warning("DICOMweb %s: the PACS's change log ends before this output's watermark (change %d): a new "
                        "or restored PACS database; listing the whole query once", src.url, since)
            since = None
        if since is None:  # the first run lists the whole query; the log is read from here on
            change = last
            instances = list_instances(src, window)
        else:
            received, change = series_received_since(src, int(since))
            instances = list_instances(src, window, only_series=received)
    else:
        instances = list_instances(src, window)
    log.info("DICOMweb %s: %d instance(s) match %s%s", src.url, len(instances), window or "no study filter",
             f", received after change {since}" if since is not None else "")
    key = site_key()
    by_path = {instance_path(src, inst, cfg.score.uids, key): inst for inst in instances}
    run = PacsRun(ScoreSummary(output, 0, 0, 0, 0, 0.0, []), len(instances), window, since)
    if instances:
        with tempfile.TemporaryDirectory(prefix="medclf-pacs-") as tmp:
            import pandas as pd

            manifest = os.path.join(tmp, "instances.parquet")
            pd.DataFrame({"path": list(by_path)}).to_parquet(manifest)
            run.scoring = run_scoring(cfg, run_id, manifest, model_path, output, rescore)
        rows = _model_rows(output, card, set(by_path))
        if src.results == "sr":
            run.sr_sent, run.sr_failed = send_results(src, _newest(rows), by_path, card)
        retry = sum(1 for r in rows if r["run_id"] == run_id and r["status"] == "error"
                    and r["error_kind"] == "transient")
    else:
        retry = 0
    if retry or run.sr_failed:
        log.warning("watermark kept: %d image(s) to try again, %d SR(s) not sent", retry, run.sr_failed)
    else:
        storage.write_atomic(watermark_path(output, src), json.dumps(
            {"source": src.url, "study_filters": src.study_filters, "series_filters": src.series_filters,
             "through": listed_through, "change": change, "run_id": run_id}).encode())
        run.watermark = listed_through
    return run


def _model_rows(output: str, card, paths: set) -> list[dict]:
    """This model's committed rows for the listed instances, of every run (SRs an earlier run could not
    send are sent now)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from medclf.data.predictions import predictions_dataset
    from medclf.data.predictions import prob_column

    cols = ["path", "frame", "status", "error", "error_kind", "predicted_label", "threshold", "model_id",
            "model_version", "run_id", "scored_at", "adaptation_id", "calibration_id",
            *[prob_column(c) for c in card.classes]]
    wanted = (pc.field("model_id") == card.model_id) & pc.field("path").isin(pa.array(sorted(paths), pa.string()))
    return predictions_dataset(output).to_table(columns=cols, filter=wanted).to_pylist()


def _newest(rows: list[dict]) -> list[dict]:
    """The latest row per image (a --rescore run appends a second one), as evaluation reads them."""
    latest: dict = {}
    for row in rows:
        key = (row["path"], row["frame"])
        if key not in latest or (row["scored_at"], row["run_id"]) > (latest[key]["scored_at"], latest[key]["run_id"]):
            latest[key] = row
    return list(latest.values())


def send_results(src: Source, rows: list[dict], by_path: dict, card) -> tuple[int, int]:
    """One SR per scored or out-of-scope image whose SR the PACS does not hold yet, STOW-RS in batches:
    (sent, failed). One QIDO per study finds what is there, so a run that died before sending, or
    whose PACS went away, has its SRs sent by the next run, and none is sent twice."""
    import requests
    from pydicom.dataset import Dataset

    from medclf.data.predictions import prob_column
    from medclf.report.dicom_sr import Result, build_sr, sr_uid

    c = client(src.http_base)
    metadata: dict = {}
    in_pacs: dict = {}  # study -> SOP Instance UIDs of its SRs: what earlier runs already delivered
    pending, sent, failed = [], 0, 0
    for row in rows:
        if row["status"] not in ("ok", "out_of_scope") or row["path"] not in by_path:
            continue
        inst: Instance = by_path[row["path"]]
        try:
            if inst.study not in in_pacs:
                in_pacs[inst.study] = {item["00080018"]["Value"][0] for item in _search(
                    c.search_for_instances, inst.study, filters={"Modality": "SR"})}
            if sr_uid(inst.sop, row["frame"], row["model_id"], row["run_id"]) in in_pacs[inst.study]:
                continue  # delivered before (SR UIDs are deterministic)
            if inst not in metadata:
                metadata[inst] = Dataset.from_json(c.retrieve_instance_metadata(inst.study, inst.series, inst.sop))
            scored = row["status"] == "ok"
            reason = (row["error"] or "").removeprefix(f"{row['path']}: ") or None
            result = Result(
                status=row["status"], finding=row["predicted_label"] if scored else None,
                probabilities={cl: row[prob_column(cl)] for cl in card.classes
                               if row[prob_column(cl)] is not None and row[prob_column(cl)] == row[prob_column(cl)]},
                threshold=row["threshold"] if row["threshold"] == row["threshold"] else None,
                model_id=row["model_id"], model_version=row["model_version"], run_id=row["run_id"],
                reason=None if scored else reason, frame=row["frame"],
                adaptation_id=row["adaptation_id"], calibration_id=row["calibration_id"])
            pending.append(build_sr(metadata[inst], result, instance_number=1 + (row["frame"] or 0)))
        except (requests.RequestException, ValueError, AttributeError) as exc:
            failed += 1
            log.error("%s: SR not built (%s)", row["path"], type(exc).__name__)  # the path, never the UIDs
        if len(pending) == STOW_BATCH:
            sent, failed = _stow(c, pending, sent, failed)
            pending = []
    if pending:
        sent, failed = _stow(c, pending, sent, failed)
    return sent, failed


def _stow(c, datasets: list, sent: int, failed: int) -> tuple[int, int]:
    import requests

    try:
        c.store_instances(datasets)
        return sent + len(datasets), failed
    except requests.RequestException as exc:
        log.error("STOW-RS of %d SR(s) failed (%s)", len(datasets), type(exc).__name__)
        return sent, failed + len(datasets)
