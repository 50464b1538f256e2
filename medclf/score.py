"""Batch scoring with Ray Data: list -> read+decode+preprocess (tasks) -> model (actor pool) -> Parquet.

Reading/decoding runs in Ray tasks separate from the inference actors, so the two overlap and
each scales on its own. A file that cannot be read or decoded becomes a row with
`status = "error"` and its message; a file that holds no image (a DICOM report) a row with
`status = "skipped"` and the reason; the run goes on. One row per image: a single-image file
gives one row (`frame` null), a multi-frame DICOM one row per frame (`score.frames`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Iterator, Optional

import numpy as np
import pandas as pd

from medclf import faults, storage
from medclf.config import Config, PreprocessConfig
from medclf.decode import DICOM_META_TAGS, DecodeError, NotAnImage, open_images
from medclf.lease import Lease, verify
from medclf.models import class_probabilities, load_artifact, load_card, prob_column
from medclf.preprocess import preprocess_gray, to_model_input
from medclf.privacy import check_uid_policy, protect_uid, uid_key

log = logging.getLogger(__name__)

# Output schema of the predictions Parquet (per-class `prob_<class>` columns follow `status`).
PREDICTION_COLUMNS = {
    "path": "input file path or URL",
    "size": "input size in bytes",
    "checksum": "sha256 of the input bytes",
    "format": "png, jpeg or dicom (as sniffed from the bytes)",
    "modality": "DICOM Modality (null for JPEG/PNG)",
    "sop_instance_uid": "DICOM SOPInstanceUID per score.uids: raw, keyed hash (default) or null (null for JPEG/PNG)",
    "study_instance_uid": "DICOM StudyInstanceUID, as sop_instance_uid",
    "series_instance_uid": "DICOM SeriesInstanceUID, as sop_instance_uid",
    "frame": "1-based frame number of a multi-frame DICOM (null for single-image files)",
    "predicted_label": "predicted class name (null on error)",
    "threshold": "decision threshold on the positive class's probability (null: argmax)",
    "model_id": "model artifact id (<arch>-<sha256 of weights, 12 hex>)",
    "model_version": "artifact creation time (UTC, ISO 8601)",
    "run_id": "id of the scoring run",
    "scored_at": "UTC time the row was scored",
    "status": "ok, error, skipped (not an image) or out_of_scope",
    "error": "what went wrong with this file, or why it was skipped (null when fine)",
    "error_kind": "permanent (corrupt or unsupported content) or transient (access error, out of memory, decoder "
                  "missing: the next run retries the file); null when fine",
}
# Rows of files this model scored before: counted in the summary, never written.
ALREADY_SCORED = "already_scored"  # medclf.sink.UNWRITTEN_STATUS
_META_KEYS = ["format", *DICOM_META_TAGS]
PERMANENT, TRANSIENT = "permanent", "transient"


def prediction_schema(classes: list[str]):
    """The Arrow schema of a predictions file for a model with these classes."""
    import pyarrow as pa

    fields = [
        ("path", pa.string()), ("size", pa.int64()), ("checksum", pa.string()), ("format", pa.string()),
        ("modality", pa.string()), ("sop_instance_uid", pa.string()), ("study_instance_uid", pa.string()),
        ("series_instance_uid", pa.string()), ("frame", pa.int32()), ("predicted_label", pa.string()),
        *[(prob_column(c), pa.float32()) for c in classes],
        ("threshold", pa.float64()), ("model_id", pa.string()), ("model_version", pa.string()),
        ("run_id", pa.string()), ("scored_at", pa.string()), ("status", pa.string()), ("error", pa.string()),
        ("error_kind", pa.string()),
    ]
    return pa.schema(fields)


def scored_key(path: str, checksum: str, frame: Optional[int] = None) -> int:
    """64-bit key of (path, content, frame): compact enough to ship millions of them to every task.
    A single-image file (frame None) keeps the key rows written before frames existed have."""
    text = f"{path}\0{checksum}" if frame is None else f"{path}\0{checksum}\0{frame}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def scored_keys(output: str, model_id: str, fault: Optional[faults.Fault] = None) -> np.ndarray:
    """Sorted keys of every image this model already has a committed row for in `output`.

    Rows of transient errors do not count: those files are tried again.

    An output folder with no committed file yet (empty, or holding only what a killed run left
    under hidden names) has no keys.
    """
    if not storage.exists(output):
        return np.zeros(0, np.uint64)
    import pyarrow.compute as pc

    dataset = _predictions_dataset(output)
    faults.check(fault, "listing")
    settled = pc.field("error_kind").is_null() | (pc.field("error_kind") != TRANSIENT)
    # `frame` is always there: _predictions_dataset adds the standard columns (null in older files)
    table = dataset.to_table(columns=["path", "checksum", "frame"],
                             filter=(pc.field("model_id") == model_id) & settled)
    keys = [scored_key(p, c or "", f) for p, c, f in zip(table.column("path").to_pylist(),
                                                         table.column("checksum").to_pylist(),
                                                         table.column("frame").to_pylist())]
    return np.unique(np.array(keys, np.uint64))


def clean_stale_temps(output: str) -> list[str]:
    """Delete the hidden temporary files that killed runs left in `output`.

    Only called while holding the output's lease, when no other run can be writing: every
    temporary file there belongs to a run that died before publishing it.
    """
    if storage.is_remote(output) or not storage.exists(output):
        return []  # on S3 an object is published in one PUT: a killed run leaves nothing behind
    stale = []
    for folder, _, names in os.walk(output):
        stale += [os.path.join(folder, n) for n in names
                  if n.startswith(".") and n.endswith(".tmp") and not n.startswith("._lease")]  # ours: renewals
    for path in stale:
        storage.remove(path)
    return stale


def load_images(batch: dict, spec: dict, skip_keys: np.ndarray | None = None, frames: str = "middle",
                max_file_bytes: Optional[int] = None, rows_per_batch: int = 16,
                uids: tuple = ("keep", None)) -> Iterator[dict]:
    """Ray Data task: paths -> bytes -> checksum -> one row per image -> model tensors; errors as rows.

    A generator: a multi-frame file's rows leave in batches of `rows_per_batch` as they are
    decoded, so a 500-frame cine never sits in memory whole. Images whose (path, checksum,
    frame) is in `skip_keys` were scored before: they leave as ALREADY_SCORED rows without
    being decoded (counted, never written). Each file's first row has `first_row` set, so the
    sink can count files as well as images. `uids`: (score.uids, site key): DICOM UIDs are
    hashed or dropped here, so raw ones never leave the task (medclf.privacy).
    """
    pre = PreprocessConfig.model_validate(spec)
    rows: list[dict] = []
    for path in (str(p) for p in batch["path"]):
        for row in _file_rows(path, pre, skip_keys, frames, max_file_bytes, uids):
            rows.append(row)
            if len(rows) == rows_per_batch:
                yield _rows_to_batch(rows, pre.image_size)
                rows = []
    if rows:
        yield _rows_to_batch(rows, pre.image_size)


def _file_rows(path: str, pre: PreprocessConfig, skip_keys: np.ndarray | None, frames: str,
               max_file_bytes: Optional[int], uids: tuple = ("keep", None)) -> Iterator[dict]:
    row: dict = {"path": path, "size": -1, "checksum": None, "frame": None, "status": None, "error": None,
                 "error_kind": None, "pixels": None, "first_row": True}
    try:
        data = storage.read_input(path, max_file_bytes)
        row.update(size=len(data), checksum=hashlib.sha256(data).hexdigest())
        if _in(skip_keys, scored_key(path, row["checksum"])):
            yield {**row, "status": ALREADY_SCORED}
            return
        images = open_images(data, path, frames)
        row.update({key: _meta_value(key, images.meta.get(key), uids) for key in _META_KEYS})
    except NotAnImage as exc:
        yield {**row, "status": "skipped", "error": str(exc)}
        return
    except Exception as exc:  # one bad file must not end the night's run
        yield {**row, "status": "error", "error": _error_text(path, exc), "error_kind": _error_kind(exc)}
        return
    for frame in images.frames:
        out = {**row, "frame": frame}
        row["first_row"] = False
        if frame is not None and _in(skip_keys, scored_key(path, row["checksum"], frame)):
            yield {**out, "status": ALREADY_SCORED}
            continue
        try:
            out["pixels"] = preprocess_gray(images.image(frame).image, pre)
        except Exception as exc:  # a bad frame is a row; the file's other frames go on
            out.update(status="error", error=_error_text(path, exc), error_kind=_error_kind(exc))
        yield out


def _meta_value(key: str, value, uids: tuple):
    return protect_uid(value, *uids) if key.endswith("_uid") else value


def _in(keys: np.ndarray | None, key: int) -> bool:
    if keys is None or not len(keys):
        return False
    k = np.uint64(key)
    j = np.searchsorted(keys, k)
    return bool(j < len(keys) and keys[j] == k)


def _error_kind(exc: Exception) -> str:
    """Permanent when the content is at fault (corrupt, unsupported, refused by the per-file limits);
    transient otherwise (access errors, MemoryError, file not found, decoder missing, anything
    unknown): the next night tries the file again."""
    if isinstance(exc, DecodeError):
        return TRANSIENT if exc.transient else PERMANENT
    return PERMANENT if isinstance(exc, storage.InputRefused) else TRANSIENT


def _error_text(path: str, exc: Exception) -> str:
    if isinstance(exc, (DecodeError, storage.InputRefused)):
        return str(exc)  # already names the file and the problem
    if isinstance(exc, FileNotFoundError):
        return f"{path}: file not found"
    if isinstance(exc, MemoryError):
        return f"{path}: out of memory while decoding"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{path}: {exc.strerror}"  # e.g. permission denied: says what, quotes nothing
    # Library messages can quote file content or header values: the type and where are enough.
    return f"{path}: {type(exc).__name__} while reading or decoding"


def _rows_to_batch(rows: list[dict], size: int) -> dict:
    pixels = np.zeros((len(rows), 1, size, size), np.float32)  # one channel: 3x less to ship to the model
    for i, row in enumerate(rows):
        if row["pixels"] is not None:
            pixels[i] = row["pixels"]
    out: dict = {key: [row.get(key) for row in rows]
                 for key in ("path", "checksum", "status", "error", "error_kind", *_META_KEYS)}
    out["size"] = np.array([row["size"] for row in rows], np.int64)
    out["frame"] = np.array([-1 if row["frame"] is None else row["frame"] for row in rows], np.int64)  # -1: none
    out["first_row"] = np.array([row["first_row"] for row in rows], bool)
    out["pixels"] = pixels
    return out


def text_or_none(values) -> list:
    """Ray turns an all-null string column into float NaNs; give the strings back, None for nulls."""
    return [v if isinstance(v, str) else None for v in values]


class Predictor:
    """Ray Data actor: holds the model, turns a batch of tensors into prediction rows."""

    def __init__(self, model_path: str, run_id: str, use_gpu: bool = False, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model, self.card = load_artifact(model_path, self.device)
        # NHWC lets oneDNN/cuDNN pick faster convolution kernels (ResNet18 on CPU: +24%, same outputs).
        self.model = self.model.to(memory_format=torch.channels_last)
        self.amp = self.device == "cuda"
        self.run_id = run_id
        self.prob_columns = [prob_column(c) for c in self.card.classes]
        self.schema = prediction_schema(self.card.classes)

    def __call__(self, batch: dict):
        import pyarrow as pa

        torch = self.torch
        statuses = text_or_none(batch["status"])  # set by the decode task for rows not to be scored
        ok = np.array([s is None for s in statuses], bool)
        n = len(statuses)
        probs = np.full((n, len(self.card.classes)), np.nan, np.float32)
        if ok.any():
            gray = torch.from_numpy(batch["pixels"][ok] if not ok.all() else batch["pixels"]).to(self.device)
            x = to_model_input(gray).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                probs[ok] = class_probabilities(self.model(x), self.card.temperature).cpu().numpy()
        labels = predict_labels(probs, self.card.classes, self.card.positive_index, self.card.threshold)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        out = {k: v for k, v in batch.items() if k != "pixels"}  # `first_row` rides along for the sink
        for key in ("checksum", "error", "error_kind", *_META_KEYS):
            out[key] = text_or_none(batch[key])
        out["predicted_label"] = [lab if good else None for lab, good in zip(labels, ok)]
        for j, col in enumerate(self.prob_columns):
            out[col] = probs[:, j]
        out["threshold"] = np.full(n, np.nan if self.card.threshold is None else self.card.threshold, np.float64)
        out["model_id"] = [self.card.model_id] * n
        out["model_version"] = [self.card.created_at] * n
        out["run_id"] = [self.run_id] * n
        out["scored_at"] = [now] * n
        out["status"] = ["ok" if good else status for good, status in zip(ok, statuses)]
        out["size"] = np.asarray(batch["size"], np.int64)
        out["path"] = [str(p) for p in batch["path"]]
        frame = np.asarray(batch["frame"], np.int64)
        out["frame"] = pa.array(frame, pa.int32(), mask=frame < 0)
        table = pa.table({name: out[name] for name in self.schema.names}, schema=self.schema)
        return table.append_column("first_row", pa.array(np.asarray(batch["first_row"], bool)))


def predict_labels(probs: np.ndarray, classes: list[str], positive_index: Optional[int], threshold: Optional[float]):
    """Binary with a threshold: positive iff p(positive) >= threshold; otherwise argmax."""
    if positive_index is not None and threshold is not None and len(classes) == 2:
        negative_index = 1 - positive_index
        return [classes[positive_index] if p >= threshold else classes[negative_index] for p in probs[:, positive_index]]
    return [classes[int(i)] for i in np.nan_to_num(probs, nan=-1).argmax(axis=1)]


# `score.extensions` entry that matches by content: any file with the DICOM "DICM" marker at
# byte 128, whatever its name (PACS exports often have no extension, or a UID for a name).
DICOM_BY_CONTENT = "dicom"


@dataclass
class Inputs:
    paths: list  # files to score
    filtered: int = 0  # files in the folder/prefix that score.extensions excluded


def find_inputs(source: str, extensions: Iterable[str]) -> Inputs:
    """Input files: a folder/prefix, a glob, or a manifest (Parquet/CSV with a `path` column).

    Folders and globs are filtered by `extensions` (suffixes like `.dcm`, and the entry `dicom`,
    which also takes every other file whose bytes carry the DICOM marker: one 132-byte read per
    such file at listing time). A manifest is taken as it is.
    """
    storage.check_input_url(source)
    if source.lower().endswith((".parquet", ".csv")) and storage.exists(source) and not storage.isdir(source):
        from medclf.data import read_manifest

        return Inputs(list(read_manifest(source)["path"]))
    if not any(ch in source for ch in "*?[") and not storage.exists(source):
        raise FileNotFoundError(f"{source}: scoring input not found")
    wanted = [e for e in extensions if e != DICOM_BY_CONTENT]
    sniff = DICOM_BY_CONTENT in extensions
    suffixes = tuple(e.lower() for e in wanted)
    paths, filtered = [], 0
    for path in storage.list_files(source):
        name = path.rsplit("/", 1)[-1].lower()
        if name.endswith(suffixes) or (sniff and _has_dicom_marker(path)):
            paths.append(path)
        else:
            filtered += 1
    return Inputs(paths, filtered)


def _has_dicom_marker(path: str) -> bool:
    return storage.read_head(path, 132)[128:132] == b"DICM"


def list_inputs(source: str, extensions: Iterable[str]) -> list[str]:
    """The files `find_inputs` finds."""
    return find_inputs(source, extensions).paths


# Memory each read/decode task reserves: the worker process with torch loaded (~400 MB) plus a
# 16-bit 2000x2000 radiograph being rescaled and resized (~100 MB). The reservation also keeps Ray Data from fusing decoding into the
# inference actors (it fuses only ops with identical resource requests), so decode runs in
# its own tasks, overlapping inference, instead of serially inside each actor.
DECODE_TASK_MEMORY = 640 * 1024**2


def images_dataset(paths: list[str], spec: PreprocessConfig, decode_batch_size: int = 16,
                   skip_keys: np.ndarray | None = None, frames: str = "middle", max_file_mb: Optional[float] = None,
                   retries: int = 2, uids: tuple = ("keep", None)):
    """Ray Dataset of decoded, preprocessed images (the stage training reuses).

    `frames` defaults to one image per file (what training, with one label per file, wants);
    scoring passes `score.frames`. A task whose worker dies is retried `retries` times; its files
    are then missing from the output, and `run_scoring` writes error rows for them. `uids`: see
    `load_images`.
    """
    import ray.data

    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, min(len(paths) // 64, 200)))
    max_file_bytes = None if max_file_mb is None else int(max_file_mb * 2**20)
    return ds.map_batches(
        load_images,
        fn_kwargs={"spec": spec.model_dump(), "skip_keys": skip_keys, "frames": frames,
                   "max_file_bytes": max_file_bytes, "rows_per_batch": decode_batch_size, "uids": uids},
        batch_size=decode_batch_size,
        batch_format="numpy",
        num_cpus=0.5,  # leave CPU for the inference actors on small machines
        memory=DECODE_TASK_MEMORY,  # (Ray Data's default SPREAD scheduling puts these on every node)
        max_retries=retries,  # Ray's default for tasks is 3; Ray Data's map tasks otherwise retry without limit
    )


@dataclass
class ScoreSummary:
    """Counts of images (rows), each computed from the rows themselves: seen = scored + skipped +
    failed + out_of_scope, where skipped = already scored + not an image."""

    output: str
    seen: int
    skipped: int
    scored: int
    failed: int
    seconds: float
    files: list
    already_scored: int = 0
    not_images: int = 0
    out_of_scope: int = 0
    files_listed: int = 0
    filtered: int = 0

    @property
    def images_per_s(self) -> float:
        done = self.scored + self.failed + self.out_of_scope
        return done / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        return (
            f"files listed {self.files_listed} ({self.filtered} left out by score.extensions); images seen "
            f"{self.seen}: scored {self.scored}, skipped {self.skipped} ({self.already_scored} already scored, "
            f"{self.not_images} not an image), failed {self.failed}, out of scope {self.out_of_scope}; "
            f"{self.seconds:.1f}s, {self.images_per_s:.1f} images/s -> {self.output}"
        )


def run_scoring(cfg: Config, run_id: str, input_path: str, model_path: str, output: str,
                rescore: Optional[bool] = None) -> ScoreSummary:
    """Score `input_path` into the predictions dataset `output`, incrementally.

    Output layout: `<output>/run_date=YYYY-MM-DD/part-<run id>-<lease token>-<task>.parquet`, each
    file committed atomically and exactly once (medclf.sink). The run holds the output's lease
    (medclf.lease) from before it reads the output until its last commit: a second run refuses
    with LeaseHeld. Unless `rescore`, images this model already scored (same path, bytes and
    frame; transient errors excepted) are skipped, so re-running a night, or resuming a killed
    one, adds exactly the missing rows.
    """
    from medclf.sink import CommitPerFileDatasink

    start = time.time()
    sc = cfg.score
    rescore = sc.rescore if rescore is None else rescore
    storage.check_input_url(input_path)  # the inputs' kind and the model are checked before any work
    card = load_card(model_path)  # fail fast on a bad artifact, before any Ray work
    check_uid_policy(sc.uids, uid_key(sc.uid_key))
    inputs = find_inputs(input_path, sc.extensions)
    paths = inputs.paths
    if not paths:
        raise FileNotFoundError(f"{input_path}: no input files with extensions {sc.extensions} "
                                f"({inputs.filtered} other file(s) left out)")
    log.debug("score settings: extensions %s, frames %s, max_file_mb %s, decode_retries %d", sc.extensions,
              sc.frames, sc.max_file_mb, sc.decode_retries)
    fault = faults.from_env()
    with Lease(output, run_id, sc.lease_seconds) as held:  # LeaseHeld: another run writes here
        faults.check(fault, "leased")
        stale = clean_stale_temps(output)
        if stale:
            log.warning("removed %d temporary file(s) left by a killed run in %s", len(stale), output)
        skip = np.zeros(0, np.uint64) if rescore else scored_keys(output, card.model_id, fault)
        log.info("scoring %d files from %s with model %s (%d images already scored)", len(paths), input_path,
                 card.model_id, len(skip))
        run_date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        sink = CommitPerFileDatasink(storage.join(output, f"run_date={run_date}"), run_id,
                                     prediction_schema(card.classes), sc.rows_per_file, output, held.token, fault)
        _scoring_dataset(cfg, paths, card, model_path, run_id, skip).write_datasink(sink)
        statuses, files = dict(sink.statuses), [path for path, _ in sink.committed]
        if sink.first_rows < len(paths):
            lost = _write_lost_files(paths, output, card, run_id, run_date, sc.decode_retries, held.token)
            files += lost.files
            statuses["error"] = statuses.get("error", 0) + lost.rows
        faults.check(fault, "before_release")
        held.check()
    counts = {k: statuses.get(k, 0) for k in ("ok", "error", "skipped", "out_of_scope", ALREADY_SCORED)}
    return ScoreSummary(output, sum(statuses.values()), counts[ALREADY_SCORED] + counts["skipped"], counts["ok"],
                        counts["error"], time.time() - start, files, already_scored=counts[ALREADY_SCORED],
                        not_images=counts["skipped"], out_of_scope=counts["out_of_scope"],
                        files_listed=len(paths), filtered=inputs.filtered)


def _scoring_dataset(cfg: Config, paths: list[str], card, model_path: str, run_id: str, skip: np.ndarray):
    """paths -> decode tasks -> inference actor pool: the Ray Dataset of prediction rows."""
    import ray.data

    sc = cfg.score
    ds = images_dataset(paths, card.preprocess_spec, sc.decode_batch_size, skip if len(skip) else None,
                        sc.frames, sc.max_file_mb, sc.decode_retries, (sc.uids, uid_key(sc.uid_key)))
    threads = sc.torch_threads or max(1, int(sc.cpus_per_actor))
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_path": model_path, "run_id": run_id, "use_gpu": sc.use_gpu,
                               "threads": threads},
        batch_size=sc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=sc.num_actors),
        num_cpus=sc.cpus_per_actor,
        num_gpus=1 if sc.use_gpu else 0,
    )
    # Decoding outpaces inference; without a cap Ray Data lets the decoded backlog grow toward its
    # default budget (a share of the whole object store), so memory would grow with the archive.
    options = ds.context.execution_options  # this dataset's own context, not the process-wide one
    options.resource_limits = options.resource_limits.copy(object_store_memory=sc.buffer_mb * 1024**2)
    # A decode task that failed all its retries loses its files, not the night: they become error rows below.
    ds.context.max_errored_blocks = -1
    return ds


@dataclass
class _Lost:
    files: list
    rows: int


def _write_lost_files(paths: list[str], output: str, card, run_id: str, run_date: str, retries: int,
                      lease_token: str) -> _Lost:
    """Error rows for listed files that got no row at all (their decode task died `retries` + 1 times).

    Transient: a crash or out-of-memory is not known to be the content's fault, so the next night
    tries those files again. Committed like the sink's files: under the lease, exclusively."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    done = _predictions_dataset(output).to_table(columns=["path"], filter=pc.field("model_id") == card.model_id)
    lost = sorted(set(paths) - set(done.column("path").to_pylist()))
    if not lost:
        return _Lost([], 0)
    log.error("%d file(s) got no row: their decode task failed %d times; recording them as errors", len(lost),
              retries + 1)
    schema = prediction_schema(card.classes)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    values = {"path": lost, "status": ["error"] * len(lost), "model_id": [card.model_id] * len(lost),
              "model_version": [card.created_at] * len(lost), "run_id": [run_id] * len(lost),
              "scored_at": [now] * len(lost), "size": [-1] * len(lost), "error_kind": [TRANSIENT] * len(lost),
              "error": [f"{p}: the task decoding this file failed {retries + 1} times (worker crashed or ran out of "
                        "memory)" for p in lost]}
    table = pa.table({f.name: pa.array(values.get(f.name, [None] * len(lost)), f.type) for f in schema}, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    final = storage.join(output, f"run_date={run_date}", f"part-{run_id}-{lease_token[:8]}-lost.parquet")
    verify(output, lease_token)  # a run that lost the output commits nothing
    storage.create_exclusive(final, buf.getvalue())
    return _Lost([final], len(lost))


def _read_files(files: list[str], columns: list[str]) -> pd.DataFrame:
    fs, _ = storage.arrow_filesystem(files[0])
    import pyarrow.dataset as pads

    paths = [storage.filesystem(f)[1] if storage.is_remote(f) else f for f in files]
    return pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=columns).to_pandas()


def _predictions_dataset(path: str):
    """Every committed file under `path`, read with the union of their schemas.

    Partitions written by models with other class names keep their own `prob_*` columns, and the
    standard columns are always there (null in files written before a column existed).
    """
    import pyarrow as pa
    import pyarrow.dataset as pads

    fs, fs_path = storage.arrow_filesystem(path)
    found = pads.dataset(fs_path, filesystem=fs, format="parquet", partitioning="hive")
    schemas = [prediction_schema([]), *(fragment.physical_schema for fragment in found.get_fragments()), found.schema]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    return pads.dataset(fs_path, schema=schema, filesystem=fs, format="parquet", partitioning="hive")


def read_predictions(path: str, columns: Optional[list[str]] = None) -> pd.DataFrame:
    """All committed prediction rows under `path` (every run date); hidden temp files are ignored."""
    return _predictions_dataset(path).to_table(columns=columns).to_pandas()
