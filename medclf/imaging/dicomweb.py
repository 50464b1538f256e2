"""DICOMweb as a scoring input: QIDO-RS to list a PACS's instances, WADO-RS to read each one.

Source URL: `dicomweb://host:port/dicom-web?StudyDate=20260101-20260131&ModalitiesInStudy=DX`
(`dicomwebs://` for HTTPS). Query keys: StudyDate (a DICOM date range, either end open),
ModalitiesInStudy, StudyInstanceUID (study level), Modality, SeriesInstanceUID (series level);
`increment=arrival` (the series the PACS received since the last clean run, from Orthanc's change
log: medclf.score.pacs) or `increment=date` (= `true`: StudyDate from the last clean run less
`lookback_days=N` [1], for any DICOMweb server); `results=sr` [default: one DICOM SR per scored image sent back by STOW-RS]
or `results=none`.

Each listed instance becomes one input path, `<source>/studies/<study>/series/<series>/instances/<sop>`,
so the run's keys are the SOP Instance UID (+ frame) and exactly-once works as for files. Under
`score.uids` hash or drop the UIDs must not reach the predictions, and the read task must still find
the instance: the path is then `<source>/instances/<token>`, the three UIDs encrypted with AES-SIV
under the site key (deterministic, so the same instance has the same path, hence key, every night;
only the site can read it back, as with hashed UIDs).

Credentials come from the environment only: MEDCLF_DICOMWEB_TOKEN (a bearer token), or
MEDCLF_DICOMWEB_USER and MEDCLF_DICOMWEB_PASSWORD (basic auth). HTTP 429 and 503 are retried with
exponential back-off (DICOMWEB_RETRIES attempts, 15 s of waiting at most). A connection that fails is
tried once more; after that the PACS counts as down for the rest of the read task (`down`), whose
other instances on it become transient error rows at once, for the next run. dicomweb-client's own
retry is off: it retries every exception with that back-off, so a PACS that died mid-run cost each
instance left 15 s of waiting (and a host that drops packets, 5 x its 20 s connect timeout).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import parse_qsl, urlsplit

from medclf.errors import UserError
from medclf.imaging.decode import DecodeError
from medclf.imaging.privacy import UID_KEY_ENV

SCHEMES = ("dicomweb", "dicomwebs")
TOKEN_ENV, USER_ENV, PASSWORD_ENV = "MEDCLF_DICOMWEB_TOKEN", "MEDCLF_DICOMWEB_USER", "MEDCLF_DICOMWEB_PASSWORD"
STUDY_KEYS = ("StudyDate", "ModalitiesInStudy", "StudyInstanceUID")
SERIES_KEYS = ("Modality", "SeriesInstanceUID")
DICOMWEB_RETRIES = 5  # attempts on 429/503
BACKOFF_MS = 500  # waits 2^n * this between attempts (1 s, 2 s, 4 s, 8 s)
RETRY_CODES = (429, 503)
INCREMENTS = {"arrival": "arrival", "date": "date", "true": "date", "1": "date", "false": "", "0": ""}
_DATE_RANGE = re.compile(r"^(\d{8})?-?(\d{8})?$")


class DicomwebError(UserError):
    """A bad DICOMweb source URL or credentials; `str()` says what."""


@dataclass
class Source:
    url: str  # dicomweb://host:port/path, no query
    http_base: str  # http(s)://host:port/path: what the client talks to
    study_filters: dict = field(default_factory=dict)
    series_filters: dict = field(default_factory=dict)
    increment: str = ""  # "": the whole query every run; "date": by StudyDate; "arrival": Orthanc's change log
    lookback_days: int = 1
    results: str = "sr"


def is_dicomweb(path) -> bool:
    return str(path).split("://", 1)[0].lower() in SCHEMES and "://" in str(path)


def parse_source(url: str) -> Source:
    """The source URL checked and split; a DicomwebError names the problem (before any work)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES or not parts.hostname:
        raise DicomwebError(f"{url}: a DICOMweb source is dicomweb://host[:port]/path?query (or dicomwebs://)")
    if parts.username or parts.password:
        raise DicomwebError(f"{parts.scheme}://{parts.hostname}/...: credentials in the URL are refused; set "
                            f"{TOKEN_ENV}, or {USER_ENV} and {PASSWORD_ENV}")
    path = parts.path.rstrip("/")
    http = "https" if parts.scheme.lower() == "dicomwebs" else "http"
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    src = Source(f"{parts.scheme.lower()}://{netloc}{path}", f"{http}://{netloc}{path}")
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in STUDY_KEYS:
            src.study_filters[key] = value
        elif key in SERIES_KEYS:
            src.series_filters[key] = value
        elif key == "increment":
            if value.lower() not in INCREMENTS:
                raise DicomwebError(f"{src.url}: increment={value!r}: expected arrival (what the PACS received since "
                                    "the last clean run; Orthanc), date (by StudyDate; any server), or false")
            src.increment = INCREMENTS[value.lower()]
        elif key == "lookback_days":
            if not value.isdigit():
                raise DicomwebError(f"{src.url}: lookback_days={value!r}: expected a whole number of days >= 0")
            src.lookback_days = int(value)
        elif key == "results":
            if value not in ("sr", "none"):
                raise DicomwebError(f"{src.url}: results={value!r}: expected sr or none")
            src.results = value
        else:
            raise DicomwebError(f"{src.url}: unknown query key {key!r}; expected one of "
                                f"{[*STUDY_KEYS, *SERIES_KEYS, 'increment', 'lookback_days', 'results']}")
    if src.increment == "arrival" and not src.http_base.endswith("/dicom-web"):
        raise DicomwebError(f"{src.url}: increment=arrival reads Orthanc's change log beside its DICOMweb root, "
                            "which must end in /dicom-web (Orthanc's default); with another server use increment=date")
    date = src.study_filters.get("StudyDate")
    if date is not None and not (_DATE_RANGE.match(date) and date not in ("", "-")):
        raise DicomwebError(f"{src.url}: StudyDate={date!r}: expected YYYYMMDD, YYYYMMDD-YYYYMMDD, or a range "
                            "open at one end (YYYYMMDD- or -YYYYMMDD)")
    return src


def check_credentials() -> None:
    if bool(os.environ.get(USER_ENV)) != bool(os.environ.get(PASSWORD_ENV)):
        raise DicomwebError(f"DICOMweb basic auth needs both {USER_ENV} and {PASSWORD_ENV} in the environment")


def _session():
    import requests

    check_credentials()
    session = requests.Session()
    token = os.environ.get(TOKEN_ENV)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif os.environ.get(USER_ENV):
        session.auth = (os.environ[USER_ENV], os.environ[PASSWORD_ENV])
    return session


_CLIENTS: dict = {}


def _retry_policy():
    """urllib3's Retry on the client's session: 429/503 up to DICOMWEB_RETRIES attempts, 2^n x BACKOFF_MS
    apart; one more try of a failed connection; nothing else. Retry-After is not followed: a server
    asking for an hour would hold a read task for an hour (the row is retried next run instead)."""
    from urllib3.util.retry import Retry

    class Backoff(Retry):
        def get_backoff_time(self) -> float:
            return 2 ** len(self.history) * BACKOFF_MS / 1000  # read when it waits (tests shorten it)

    return Backoff(total=DICOMWEB_RETRIES, connect=1, read=0, other=0, redirect=0, status=DICOMWEB_RETRIES - 1,
                   status_forcelist=RETRY_CODES, allowed_methods=None, raise_on_status=False,
                   respect_retry_after_header=False)


def client(http_base: str):
    """One dicomweb-client per base URL and process (a read task reads many instances)."""
    if http_base not in _CLIENTS:
        from dicomweb_client.api import DICOMwebClient
        from requests.adapters import HTTPAdapter

        session = _session()
        adapter = HTTPAdapter(max_retries=_retry_policy())
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        c = DICOMwebClient(http_base, session=session)
        c.set_http_retry_params(retry=False)  # the session retries (see the module docstring)
        _CLIENTS[http_base] = c
    return _CLIENTS[http_base]


@dataclass(frozen=True)
class Instance:
    study: str
    series: str
    sop: str


def _value(item: dict, tag: str) -> Optional[str]:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


NON_IMAGE_MODALITIES = ("SR", "KO", "PR", "DOC")  # series never listed: structured reports, key objects, states
QIDO_PAGE = 500  # results per QIDO-RS request


def _search(method, *uids, filters: Optional[dict] = None) -> list[dict]:
    """All results of a QIDO-RS search, page by page (limit/offset). Our own loop: dicomweb-client's
    `get_remaining` asks for a page past the end, which Orthanc 1.10 leaves unanswered. A server that
    ignores `offset` would repeat its first page: a page with nothing new ends the loop."""
    out, seen, offset = [], set(), 0
    while True:
        page = method(*uids, search_filters=dict(filters or {}), limit=QIDO_PAGE, offset=offset)
        new = [item for item in page if json.dumps(item, sort_keys=True) not in seen]
        seen.update(json.dumps(item, sort_keys=True) for item in new)
        out += new
        if len(page) < QIDO_PAGE or not new:
            return out
        offset += len(page)


def list_instances(src: Source, study_filters: Optional[dict] = None,
                   only_series: Optional[set] = None) -> list[Instance]:
    """QIDO-RS: studies matching the study filters, their series matching the series filters, their instances.

    only_series: {(StudyInstanceUID, SeriesInstanceUID)} to restrict the listing to (the arrival
    increment); each study is still matched against the study filters, each series against the series'."""
    c = client(src.http_base)
    filters = src.study_filters if study_filters is None else study_filters
    if only_series is None:
        studies = [_value(study, "0020000D") for study in _search(c.search_for_studies, filters=filters)]
    else:
        wanted = sorted({study for study, _ in only_series})
        studies = [s for s in wanted if _search(c.search_for_studies, filters={**filters, "StudyInstanceUID": s})]
    out = []
    for s in studies:
        for series in _search(c.search_for_series, s, filters=src.series_filters):
            if _value(series, "00080060") in NON_IMAGE_MODALITIES:
                continue  # reports, among them our own SRs: nothing to score, and listed again every night
            se = _value(series, "0020000E")
            if only_series is not None and (s, se) not in only_series:
                continue
            for inst in _search(c.search_for_instances, s, se):
                out.append(Instance(s, se, _value(inst, "00080018")))
    return sorted(set(out), key=lambda i: (i.study, i.series, i.sop))


CHANGES_PAGE = 1000  # change-log entries per request


def orthanc_root(src: Source) -> str:
    """Orthanc's REST API sits beside its DICOMweb root: http://host:8042/dicom-web -> http://host:8042."""
    return src.http_base[: -len("/dicom-web")]


def _rest_get(session, url: str, **params):
    """GET on Orthanc's REST API, with the same retries as DICOMweb (429/503, exponential back-off);
    None when the resource is gone (deleted since the change was logged)."""
    import time

    import requests

    for attempt in range(DICOMWEB_RETRIES):
        try:
            resp = session.get(url, params=params, timeout=60)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise DicomwebError(f"{url}: the PACS is unreachable ({type(exc).__name__})") from None
        if resp.status_code in RETRY_CODES and attempt + 1 < DICOMWEB_RETRIES:
            time.sleep(2 ** attempt * BACKOFF_MS / 1000)
            continue
        if resp.status_code in (404, 410):
            return None
        if resp.status_code >= 400:
            raise DicomwebError(f"{url}: the PACS answered HTTP {resp.status_code}")
        return resp.json()


def last_change(src: Source) -> int:
    """The newest entry of Orthanc's change log (what a first arrival run records as its watermark)."""
    return int(_rest_get(_session(), f"{orthanc_root(src)}/changes", last="")["Last"])


def series_received_since(src: Source, seq: int) -> tuple[set, int]:
    """({(StudyInstanceUID, SeriesInstanceUID)} of the image series Orthanc received after change `seq`,
    the last change read).

    Orthanc logs `StableSeries` when a series has received nothing for `StableAge` seconds (60 by
    default): a series still arriving is left to the next run, and a series that receives more later
    is logged again. Report series (our own SRs among them) are left out here, so sending results
    does not bring a study back the next night."""
    session, root = _session(), orthanc_root(src)
    found, series_cache = set(), {}
    while True:
        page = _rest_get(session, f"{root}/changes", since=seq, limit=CHANGES_PAGE)
        for change in page["Changes"]:
            if change["ChangeType"] != "StableSeries" or change["ID"] in series_cache:
                continue
            series = _rest_get(session, f"{root}/series/{change['ID']}")
            study = _rest_get(session, f"{root}/studies/{series['ParentStudy']}") if series else None
            series_cache[change["ID"]] = None
            if series and study and series["MainDicomTags"].get("Modality") not in NON_IMAGE_MODALITIES:
                found.add((study["MainDicomTags"]["StudyInstanceUID"], series["MainDicomTags"]["SeriesInstanceUID"]))
        seq = int(page["Last"])
        if page["Done"] or not page["Changes"]:
            return found, seq


def _cipher(key: str):
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV

    return AESSIV(hashlib.sha512(b"medclf-dicomweb-path\0" + key.encode()).digest())  # AES-256-SIV


def site_key() -> Optional[str]:
    """The read tasks decrypt paths with the key in their environment (a config value would not reach them)."""
    return os.environ.get(UID_KEY_ENV) or None


def instance_path(src: Source, inst: Instance, uids_mode: str, key: Optional[str]) -> str:
    if uids_mode == "keep":
        return f"{src.url}/studies/{inst.study}/series/{inst.series}/instances/{inst.sop}"
    if not key:
        raise DicomwebError(f"DICOMweb input with score.uids={uids_mode} needs the site key in the environment "
                            f"({UID_KEY_ENV}): instance paths are encrypted with it")
    token = _cipher(key).encrypt(f"{inst.study}\0{inst.series}\0{inst.sop}".encode(), None)
    return f"{src.url}/instances/{base64.urlsafe_b64encode(token).decode().rstrip('=')}"


_KEPT = re.compile(r"^(?P<base>.*)/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/instances/(?P<sop>[0-9.]+)$")
_SEALED = re.compile(r"^(?P<base>.*)/instances/(?P<token>[A-Za-z0-9_-]+)$")


def parse_instance_path(path: str, key: Optional[str] = None) -> tuple[str, Instance]:
    """(http base, instance) of a path made by `instance_path`."""
    kept, sealed = _KEPT.match(path), _SEALED.match(path)
    if kept:
        base, inst = kept["base"], Instance(kept["study"], kept["series"], kept["sop"])
    elif sealed:
        key = key or site_key()
        if not key:
            raise DecodeError(path, f"encrypted DICOMweb path but no site key ({UID_KEY_ENV}) here", transient=True)
        token = sealed["token"]
        try:
            plain = _cipher(key).decrypt(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)), None)
        except Exception:
            raise DecodeError(path, "DICOMweb path not made with this site key") from None
        base, inst = sealed["base"], Instance(*plain.decode().split("\0"))
    else:
        raise DecodeError(path, "not a DICOMweb instance path (<source>/studies/S/series/S/instances/I)")
    return parse_source(base).http_base, inst


def read_instance(path: str, max_bytes: Optional[int] = None, down: Optional[set] = None) -> bytes:
    """WADO-RS: the instance as a DICOM Part-10 file, in its stored transfer syntax.

    Errors name the path (never raw UIDs under hash/drop) and say whether the next run should
    try again: gone from the PACS (404/410) is permanent; unreachable, refused credentials, and
    429/503 left after the retries are transient. `down`: the PACS base URLs this read task found
    unreachable; a read from one of them fails at once, and one that finds its PACS unreachable adds it."""
    import requests
    from pydicom.filewriter import dcmwrite

    http_base, inst = parse_instance_path(path)
    if down is not None and http_base in down:
        raise DecodeError(path, "the PACS is unreachable (an earlier read of this task could not connect; "
                                "not tried again)", transient=True)
    try:
        ds = client(http_base).retrieve_instance(inst.study, inst.series, inst.sop,
                                                 media_types=(("application/dicom", "*"),))
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        if code in (404, 410):
            raise DecodeError(path, f"instance not in the PACS (HTTP {code}): deleted after the query?") from None
        if code in (401, 403):
            raise DecodeError(path, f"the PACS refused access (HTTP {code}); check {TOKEN_ENV} or {USER_ENV}/"
                                    f"{PASSWORD_ENV}", transient=True) from None
        raise DecodeError(path, f"the PACS answered HTTP {code} (after {DICOMWEB_RETRIES} tries on 429/503)",
                          transient=True) from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        if down is not None:
            down.add(http_base)
        raise DecodeError(path, f"the PACS is unreachable ({type(exc).__name__})", transient=True) from None
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    data = buf.getvalue()
    if max_bytes is not None and len(data) > max_bytes:
        from medclf.storage import InputRefused

        raise InputRefused(path, f"instance is {len(data) / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit")
    return data
