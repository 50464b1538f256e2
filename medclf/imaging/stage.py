"""The image stage shared by scoring, training, Grad-CAM and evaluation: list input files, then
read -> checksum -> decode -> preprocess, one row per image, as a Ray Data dataset. The decode
step also measures each image's input statistics for drift (medclf.imaging.stats.image_stats).

A file that cannot be read or decoded becomes a row with `status = "error"` and its message; a
file that holds no image (a DICOM report) a row with `status = "skipped"` and the reason. One row
per image: a single-image file gives one row (`frame` null), a multi-frame DICOM one row per frame.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np

from medclf import storage
from medclf.config import PreprocessConfig
from medclf.imaging.decode import DICOM_META_TAGS, DecodeError, NotAnImage, jpeg_header, open_images, sniff_format
from medclf.imaging.device_decode import DEVICE_MODES
from medclf.imaging.dicomweb import is_dicomweb, read_instance
from medclf.imaging.manifest import read_manifest
from medclf.imaging.scope import image_out_of_scope, input_out_of_scope, pixels_out_of_scope
from medclf.imaging.preprocess import preprocess_gray
from medclf.imaging import confine
from medclf.imaging.privacy import protect_uid
from medclf.imaging.stats import STAT_COLUMNS, image_stats

# Rows of files this model scored before: counted in the summary, never written.
ALREADY_SCORED = "already_scored"  # medclf.score.sink.UNWRITTEN_STATUS
META_KEYS = ["format", *DICOM_META_TAGS]
PERMANENT, TRANSIENT = "permanent", "transient"


def scored_key(path: str, checksum: str, frame: Optional[int] = None) -> int:
    """64-bit key of (path, content, frame): compact enough to ship millions of them to every task.
    A single-image file (frame None) keeps the key rows written before frames existed have."""
    text = f"{path}\0{checksum}" if frame is None else f"{path}\0{checksum}\0{frame}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def load_images(batch: dict, spec: dict, skip_keys: np.ndarray | None = None, frames: str = "middle",
                max_file_bytes: Optional[int] = None, rows_per_batch: int = 16,
                uids: tuple = ("keep", None), gate: Optional[dict] = None,
                roots: Optional[tuple] = None, actor_jpeg: Optional[int] = None) -> Iterator[dict]:
    """Ray Data task: paths -> bytes -> checksum -> one row per image -> model tensors; errors as rows.

    A generator: a multi-frame file's rows leave in batches of `rows_per_batch` as they are
    decoded, so a 500-frame cine never sits in memory whole. Images whose (path, checksum,
    frame) is in `skip_keys` were scored before: they leave as ALREADY_SCORED rows without
    being decoded (counted, never written). Each file's first row has `first_row` set, so the
    sink can count files as well as images. `uids`: (score.uids, site key): DICOM UIDs are
    hashed or dropped here, so raw ones never leave the task (medclf.imaging.privacy). `gate`: the
    model's domain checks known from the header (medclf.model.records.input_gate): a file that fails them
    gives `out_of_scope` rows, its pixels never decoded. `actor_jpeg`: JPEGs whose shorter side is at least
    this are not decoded here: their rows carry the file's bytes in `encoded`, for the inference actor
    to decode on its GPU (medclf.imaging.device_decode); None: every file is decoded here.
    """
    pre = PreprocessConfig.model_validate(spec)
    rows: list[dict] = []
    pacs_down: set = set()  # PACS this task could not reach: the rest of its instances fail at once
    for path in (str(p) for p in batch["path"]):
        for row in _file_rows(path, pre, skip_keys, frames, max_file_bytes, uids, gate, roots=roots,
                              pacs_down=pacs_down, actor_jpeg=actor_jpeg):
            rows.append(row)
            if len(rows) == rows_per_batch:
                yield _rows_to_batch(rows, pre.image_size, actor_jpeg is not None)
                rows = []
    if rows:
        yield _rows_to_batch(rows, pre.image_size, actor_jpeg is not None)


def _file_rows(path: str, pre: PreprocessConfig, skip_keys: np.ndarray | None, frames: str,
               max_file_bytes: Optional[int], uids: tuple = ("keep", None), gate: Optional[dict] = None,
               data: Optional[bytes] = None, roots: Optional[tuple] = None,
               pacs_down: Optional[set] = None, actor_jpeg: Optional[int] = None) -> Iterator[dict]:
    """A file's rows; `data`: its bytes when they came another way (the online endpoint's request body);
    `roots`: where files may be read from (medclf.imaging.confine); `pacs_down`: read_instance's `down`;
    `actor_jpeg`: see `load_images`."""
    row: dict = {"path": path, "size": -1, "checksum": None, "frame": None, "status": None, "error": None,
                 "error_kind": None, "pixels": None, "first_row": True}
    started = time.perf_counter()
    try:
        if data is None and is_dicomweb(path):  # a PACS instance (medclf.imaging.dicomweb)
            data = read_instance(path, max_file_bytes, pacs_down)
        elif data is None:
            confine.check(path, roots)  # symlinks resolved; /proc, /sys, /dev always refused
            # One read; the checksum is taken from these bytes in memory, never by reading the file again.
            data = storage.read_input(confine.normalise(path), max_file_bytes)
        row.update(size=len(data), checksum=hashlib.sha256(data).hexdigest())
        row["t_read"] = time.perf_counter() - started  # stage costs (medclf.score.costs)
        if _in(skip_keys, scored_key(path, row["checksum"])):
            yield {**row, "status": ALREADY_SCORED}
            return
        header_started = time.perf_counter()
        images, meta = None, _actor_jpeg_meta(data, path, actor_jpeg)
        if meta is None:
            images = open_images(data, path, frames, min_side=pre.image_size)  # JPEG draft decode (imaging.draft)
            meta = images.meta
        header_seconds = time.perf_counter() - header_started
        row.update({key: _meta_value(key, meta.get(key), uids) for key in META_KEYS})
        out_of_scope = input_out_of_scope(meta, gate)
    except NotAnImage as exc:
        yield {**row, "status": "skipped", "error": str(exc)}
        return
    except Exception as exc:  # one bad file must not end the night's run
        yield {**row, "status": "error", "error": error_text(path, exc), "error_kind": error_kind(exc)}
        return
    if images is None:  # the inference actor decodes it (medclf.imaging.device_decode)
        row["t_decode"] = header_seconds
        if out_of_scope:
            yield {**row, "status": "out_of_scope", "error": f"{path}: {out_of_scope}"}
        else:
            yield {**row, "encoded": data}
        return
    for frame in images.frames:
        out = {**row, "frame": frame}
        row["first_row"], row["t_read"] = False, 0.0  # a file is read once: its first row carries it
        if frame is not None and _in(skip_keys, scored_key(path, row["checksum"], frame)):
            yield {**out, "status": ALREADY_SCORED}
            continue
        if out_of_scope:
            yield {**out, "status": "out_of_scope", "error": f"{path}: {out_of_scope}"}
            continue
        started = time.perf_counter()
        try:
            image = images.image(frame).image
            out["stats"] = image_stats(image)  # for drift (medclf.monitor.reference), measured here: no second pass
            refused = image_out_of_scope(image, gate)  # blank, near-constant, noise: not for any model
            if not refused:
                pixels = preprocess_gray(image, pre)
                refused = pixels_out_of_scope(pixels, gate)  # unlike the model's own validation images
            if refused:
                out.update(status="out_of_scope", error=f"{path}: {refused}")
            else:
                out["pixels"] = pixels
        except Exception as exc:  # a bad frame is a row; the file's other frames go on
            out.update(status="error", error=error_text(path, exc), error_kind=error_kind(exc))
        out["t_decode"] = time.perf_counter() - started + (header_seconds if frame == images.frames[0] else 0.0)
        yield out


def _actor_jpeg_meta(data: bytes, path: str, actor_jpeg: Optional[int]) -> Optional[dict]:
    """A JPEG's header meta when the inference actor is to decode it (see `load_images`), else None."""
    if actor_jpeg is None or sniff_format(data, path) != "jpeg":
        return None
    meta = jpeg_header(data, path)  # a corrupt header fails here, as a full decode would
    if meta["mode"] not in DEVICE_MODES or min(meta["width"], meta["height"]) < actor_jpeg:
        return None
    return meta


def _meta_value(key: str, value, uids: tuple):
    return protect_uid(value, *uids) if key.endswith("_uid") else value


def _in(keys: np.ndarray | None, key: int) -> bool:
    if keys is None or not len(keys):
        return False
    k = np.uint64(key)
    j = np.searchsorted(keys, k)
    return bool(j < len(keys) and keys[j] == k)


def error_kind(exc: Exception) -> str:
    """Permanent when the content is at fault (corrupt, unsupported, refused by the per-file limits);
    transient otherwise (access errors, MemoryError, file not found, decoder missing, anything
    unknown): the next night tries the file again."""
    if isinstance(exc, DecodeError):
        return TRANSIENT if exc.transient else PERMANENT
    return PERMANENT if isinstance(exc, storage.InputRefused) else TRANSIENT


def error_text(path: str, exc: Exception) -> str:
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


def _rows_to_batch(rows: list[dict], size: int, encoded: bool = False) -> dict:
    pixels = np.zeros((len(rows), 1, size, size), np.float32)  # one channel: 3x less to ship to the model
    for i, row in enumerate(rows):
        if row["pixels"] is not None:
            pixels[i] = row["pixels"]
    out: dict = {key: [row.get(key) for row in rows]
                 for key in ("path", "checksum", "status", "error", "error_kind", *META_KEYS)}
    out["size"] = np.array([row["size"] for row in rows], np.int64)
    out["frame"] = np.array([-1 if row["frame"] is None else row["frame"] for row in rows], np.int64)  # -1: none
    out["first_row"] = np.array([row["first_row"] for row in rows], bool)
    out["pixels"] = pixels
    if encoded:  # JPEG bytes for the inference actor to decode (b"": decoded here, or nothing to decode)
        out["encoded"] = np.array([row.get("encoded") or b"" for row in rows] + [None], object)[:-1]
    for name in ("t_read", "t_decode"):  # stage costs (medclf.score.costs); read counted on a file's first row
        out[name] = np.array([row.get(name) or 0.0 for row in rows], np.float64)
    for name in STAT_COLUMNS:  # NaN: not decoded (error, skipped, out of scope by header)
        out[name] = np.array([row["stats"][name] if row.get("stats") else np.nan for row in rows], np.float64)
    return out


def text_or_none(values) -> list:
    """Ray turns an all-null string column into float NaNs; give the strings back, None for nulls."""
    return [v if isinstance(v, str) else None for v in values]


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
# Retries of a decode task whose worker died. A map step that follows decoding in the same tasks
# (the training cache's uint16 conversion) must ask for the same, or Ray Data will not fuse them.
DECODE_RETRIES = 2


def decode_blocks(n_files: int, decode_batch_size: int) -> int:
    """How many blocks (one decode task each) the path list is cut into: about 64 files each, so a
    large archive does not pay per-task overhead thousands of times, but for a small one at least one
    block per CPU of the cluster (each still a full decode batch), so a 100-file night on a
    multi-node cluster is decoded on every node instead of by one task on one."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(1, min(200, max(n_files // 64, min(n_files // decode_batch_size, cpus))))


def images_dataset(paths: list[str], spec: PreprocessConfig, decode_batch_size: int = 16,
                   skip_keys: np.ndarray | None = None, frames: str = "middle", max_file_mb: Optional[float] = None,
                   retries: int = DECODE_RETRIES, uids: tuple = ("keep", None), gate: Optional[dict] = None,
                   roots: Optional[tuple] = None, actor_jpeg: Optional[int] = None):
    """Ray Dataset of decoded, preprocessed images (the stage training reuses).

    `frames` defaults to one image per file (what training, with one label per file, wants);
    scoring passes `score.frames`. A task whose worker dies is retried `retries` times; its files
    are then missing from the output, and `run_scoring` writes error rows for them. `uids`, `gate`,
    `roots`, `actor_jpeg`: see `load_images`.
    """
    import ray.data

    ds = ray.data.from_items([{"path": p} for p in paths],
                             override_num_blocks=decode_blocks(len(paths), decode_batch_size))
    max_file_bytes = None if max_file_mb is None else int(max_file_mb * 2**20)
    return ds.map_batches(
        load_images,
        fn_kwargs={"spec": spec.model_dump(), "skip_keys": skip_keys, "frames": frames,
                   "max_file_bytes": max_file_bytes, "rows_per_batch": decode_batch_size, "uids": uids,
                   "gate": gate, "roots": roots, "actor_jpeg": actor_jpeg},
        batch_size=decode_batch_size,
        batch_format="numpy",
        num_cpus=0.5,  # leave CPU for the inference actors on small machines
        memory=DECODE_TASK_MEMORY,  # (Ray Data's default SPREAD scheduling puts these on every node)
        max_retries=retries,  # Ray's default for tasks is 3; Ray Data's map tasks otherwise retry without limit
    )
