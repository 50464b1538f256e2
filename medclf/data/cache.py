"""The preprocessed training cache: every training and validation image is read, decoded and
preprocessed once per data set (the scoring stage, medclf.imaging.stage), written as Parquet shards, and
streamed from there every epoch (Ray Data -> Ray Train), so no process ever holds the whole set.

Layout: `<cache root>/<split>-<key>/*.parquet` plus `_cache.json`, written last (a folder without
it is an unfinished build and is rebuilt). The key is a hash of the cache format, the classes, the
preprocessing spec and, per file, its path, label, size and modification time (ETag on S3): a run
whose files, labels and preprocessing are unchanged (a resume, a re-run, a restarted worker)
reuses the cache; any change builds a new one. Both are said in the run's log.

Pixels are stored as uint16 of the preprocessed [0, 1] image (before the mean/std step, which is
undone and redone exactly): preprocess_gray's output is a continuous resample of 8- to 16-bit
sources, so uint8 would drop the extra bits of 12/16-bit DICOM, while uint16 keeps every image to
1/65535 (float16 keeps only ~1/2048 near 1.0) at half the size of float32.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pandas as pd

from medclf import storage
from medclf.config import Config, PreprocessConfig
from medclf.ops.logs import say

CACHE_VERSION = 2  # 2: each row keeps its file's SHA-256 (duplicate_audit)
MARKER = "_cache.json"
SCALE = 65535  # uint16 full scale = 1.0 on the [0, 1] image


class CacheError(RuntimeError):
    pass


@dataclass
class SplitCache:
    name: str  # "train" / "val"
    path: str
    key: str
    rows: int
    built: bool  # False: reused as it was


def cache_key(part: pd.DataFrame, labels: np.ndarray, classes: list[str], spec: PreprocessConfig) -> str:
    """What the cached images depend on: format, classes, preprocessing, and each file's path,
    label, size and modification time (no file is read to compute it)."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "classes": classes,
                                   "preprocess": spec.model_dump()}, sort_keys=True).encode())
    for path, label, stat in zip(part["path"], labels, storage.file_stats(list(part["path"]))):
        h.update(f"{path}\0{label}\0{stat}\n".encode())
    return h.hexdigest()[:24]


def ensure_cache(name: str, part: pd.DataFrame, labels: np.ndarray, classes: list[str], cfg: Config,
                 root: str) -> SplitCache:
    """The cache of one split: reused when its key matches a finished cache, else built (and said)."""
    key = cache_key(part, labels, classes, cfg.preprocess)
    path = storage.join(root, f"{name}-{key}")
    marker = storage.join(path, MARKER)
    if storage.exists(marker):
        rows = json.loads(storage.read_bytes(marker))["rows"]
        say(f"data cache: reusing {path} ({rows} {name} images; files, labels and preprocessing unchanged)")
        return SplitCache(name, path, key, rows, built=False)
    others = [p.rsplit("/", 1)[-1] for p in _caches_of(root, name) if not p.endswith(key)]
    reason = (f"files, labels or preprocessing changed since {', '.join(others)}" if others
              else "no cache of these files yet")
    say(f"data cache: building {path} ({len(part)} {name} images: {reason})")
    build(path, part, labels, cfg)
    storage.write_bytes(marker, json.dumps({"rows": len(part), "key": key, "version": CACHE_VERSION,
                                            "preprocess": cfg.preprocess.model_dump()}).encode())
    return SplitCache(name, path, key, len(part), built=True)


def _caches_of(root: str, name: str) -> list[str]:
    fs, p = storage.filesystem(root)
    if not fs.exists(p):
        return []
    return [e for e in fs.ls(p, detail=False) if e.rstrip("/").rsplit("/", 1)[-1].startswith(f"{name}-")]


MAX_FILE_MB = 4
"""Largest cache file (= Ray Data block). Every process that writes, reads or streams the cache holds
a few blocks, and pooled Ray workers keep their peak. Sized by row count alone (up to 1,024 rows), a
file of 224 px images would reach 100 MB. At 128 px phantoms (16 MB files at 20,000) the cap made no
measurable difference to peak memory (docs/benchmarks.md)."""


def rows_per_file(n: int, row_bytes: int) -> int:
    """Enough files for a block-order shuffle and for every worker to get several, not thousands;
    at most MAX_FILE_MB each, so a block does not grow with the data set."""
    return int(max(16, min(1024, n // 32, MAX_FILE_MB * 2**20 // row_bytes)))


def build(path: str, part: pd.DataFrame, labels: np.ndarray, cfg: Config) -> None:
    """Decode + preprocess every file of the split with Ray Data tasks, straight to Parquet shards;
    unreadable files fail the build, naming them."""
    from medclf.imaging.stage import DECODE_RETRIES, DECODE_TASK_MEMORY, images_dataset

    fs, p = storage.filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)  # an unfinished build: its part files must not mix with the new ones
    paths = list(part["path"])
    ds = images_dataset(paths, cfg.preprocess, cfg.score.decode_batch_size)
    ds = bounded(ds, cfg.train.stream_buffer_mb).map_batches(
        _cache_rows, fn_kwargs={"index": {q: i for i, q in enumerate(paths)}, "labels": labels,
                                "spec": cfg.preprocess.model_dump()},
        batch_format="numpy", num_cpus=0.5, memory=DECODE_TASK_MEMORY,
        max_retries=DECODE_RETRIES)  # the decode step's resources and retries: fused into its tasks
    arrow_fs, arrow_path = storage.arrow_filesystem(path)
    n = rows_per_file(len(paths), row_bytes=2 * cfg.preprocess.image_size ** 2)  # uint16 pixels
    ds.write_parquet(arrow_path, filesystem=arrow_fs, min_rows_per_file=n, max_rows_per_file=n)
    _check_build(path, len(paths))


def _cache_rows(batch: dict, index: dict, labels: np.ndarray, spec: dict) -> dict:
    from medclf.imaging.stage import text_or_none

    pre = PreprocessConfig.model_validate(spec)
    rows = np.array([index[str(p)] for p in batch["path"]], np.int64)
    x01 = np.clip(batch["pixels"][:, 0] * pre.std + pre.mean, 0.0, 1.0)  # undo the normalisation exactly
    return {"row": rows, "label": labels[rows], "pixels": np.rint(x01 * SCALE).astype(np.uint16),
            "checksum": np.array([c or "" for c in text_or_none(batch["checksum"])], dtype=object),
            "error": np.array([e or "" for e in text_or_none(batch["error"])], dtype=object)}


def _check_build(path: str, expected: int) -> None:
    import pyarrow.parquet as pq

    from medclf.imaging.manifest import DatasetError

    arrow_fs, arrow_path = storage.arrow_filesystem(path)
    errors = [e for e in pq.read_table(arrow_path, columns=["error"], filesystem=arrow_fs).column("error").to_pylist()
              if e]
    if errors:
        shown = "\n  ".join(errors[:10])
        raise DatasetError(f"{len(errors)} unreadable image(s) in the {path.rsplit('/', 1)[-1].split('-')[0]} split; "
                           f"fix or remove them before training:\n  {shown}" + ("\n  ..." if len(errors) > 10 else ""))
    rows = pq.read_table(arrow_path, columns=["row"], filesystem=arrow_fs).num_rows
    if rows != expected:
        raise CacheError(f"{path}: {expected - rows} of {expected} images missing after decoding (tasks failed)")


def duplicate_audit(caches: dict, parts: dict) -> dict:
    """Byte-identical files among the training data, from the checksums the cache build recorded
    (no file is read again). `label_conflicts`: copies that carry different labels, so the model is
    taught both (BUSI has one: `benign (433).png` is `malignant (145).png`). `val_copies_of_train`:
    validation images identical to a training image, which validation scores as if unseen. Said in
    the run's log; the run goes on (the split and the labels are the data's, not the trainer's)."""
    import pyarrow.parquet as pq

    seen: dict = {}  # checksum -> [(split, path, label), ...]
    for name, cache in caches.items():
        arrow_fs, arrow_path = storage.arrow_filesystem(cache.path)
        table = pq.read_table(arrow_path, columns=["row", "checksum"], filesystem=arrow_fs)
        part = parts[name]
        for row, checksum in zip(table.column("row").to_pylist(), table.column("checksum").to_pylist()):
            seen.setdefault(checksum, []).append((name, part["path"].iat[row], part["label"].iat[row]))
    copies = [sorted(group) for group in seen.values() if len(group) > 1]
    conflicts = [[{"split": s, "path": p, "label": str(lab)} for s, p, lab in group]
                 for group in copies if len({lab for _, _, lab in group}) > 1]
    val_copies = sorted(p for group in copies if any(s == "train" for s, _, _ in group)
                        for s, p, _ in group if s == "val")
    audit = {"duplicate_groups": len(copies), "duplicate_files": sum(map(len, copies)),
             "label_conflicts": conflicts, "val_copies_of_train": val_copies}
    for group in conflicts:
        say("data audit: identical files with different labels: "
             + "; ".join(f"{c['path']} ({c['label']}, {c['split']})" for c in group))
    if val_copies:
        say(f"data audit: {len(val_copies)} validation image(s) identical to a training image, so validation "
             f"scores them as seen (first: {val_copies[0]})")
    return audit


# READER_NOTE: the cache is read with Ray Data's first Parquet reader, not Ray 2.60's default (V2).
# V2 lists the files again at every execution (each epoch, each validation pass) through a pool of up
# to 32 FooterReader actors, one Python process (~200 MB) each, started as long as files remain to
# list, and reads in units of up to 128 MB: at 20,000 phantoms (190 files) one epoch's stream
# started 19 of them and peaked at 7.0 GB summed RSS against 4.0 GB at 2,000; the first reader
# plans its read tasks once and peaked at 4.1 GB vs 3.1 GB, in half the time (docs/benchmarks.md).


def dataset(cache: SplitCache, seed: Optional[int] = None, buffer_mb: Optional[float] = None):
    """The cache as a Ray Dataset (row, label, pixels); with `seed`, in a block order that is
    reshuffled every epoch (execution), reproducibly from the seed; `buffer_mb`: at most this much
    read ahead into the object store (bounded)."""
    import ray.data
    from ray.data import RandomSeedConfig

    arrow_fs, arrow_path = storage.arrow_filesystem(cache.path)
    context = ray.data.DataContext.get_current()
    default, context.use_datasource_v2 = context.use_datasource_v2, False  # why: READER_NOTE
    try:
        ds = ray.data.read_parquet(arrow_path, filesystem=arrow_fs, columns=["row", "label", "pixels"],
                                   file_extensions=["parquet"])
    finally:
        context.use_datasource_v2 = default
    if seed is not None:
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds if buffer_mb is None else bounded(ds, buffer_mb)


def bounded(ds, buffer_mb: float):
    """`ds` with Ray Data's object-store budget capped at `buffer_mb` (train.stream_buffer_mb)."""
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=buffer_mb * 2**20)
    return ds


def to_model_scale(pixels: np.ndarray, spec: PreprocessConfig) -> np.ndarray:
    """uint16 (N, S, S) from the cache -> float32 (N, 1, S, S), exactly as preprocess_gray normalises."""
    x = pixels.astype(np.float32)[:, None]
    x *= 1.0 / SCALE
    x -= spec.mean
    x *= 1.0 / spec.std
    return x


def iter_pixels(cache: SplitCache, spec: PreprocessConfig, batch_size: int = 64,
                buffer_mb: Optional[float] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The split batch by batch as (row indices, float32 (B, 1, S, S)), in no particular row order:
    for work on a whole split that need not hold it (the finish step's validation features)."""
    for batch in dataset(cache, buffer_mb=buffer_mb).iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield batch["row"], to_model_scale(batch["pixels"], spec)


def read_pixels(cache: SplitCache, spec: PreprocessConfig) -> np.ndarray:
    """The whole split as float32 (N, 1, S, S) in row order (the in-memory path)."""
    out = np.zeros((cache.rows, 1, spec.image_size, spec.image_size), np.float32)
    for rows, x in iter_pixels(cache, spec, batch_size=512):
        out[rows] = x
    return out


def torch_batch(batch: dict, spec: PreprocessConfig, second: str = "label"):
    """collate_fn for iter_torch_batches: (model-scale pixels, `second` column) as CPU tensors."""
    import torch

    return torch.from_numpy(to_model_scale(batch["pixels"], spec)), torch.from_numpy(batch[second])


START_EPOCH_FILE = "stream_start_epoch.json"


def announce_start_epoch(run_dir: str, epoch: int) -> None:
    """Every rank, before it asks for its shard: the epoch this worker group starts at (0, or the one
    after the checkpoint it resumes from), read by shard_config's configure for the block order.
    Atomic: a rank never reads another's half-written file."""
    storage.write_atomic(storage.join(run_dir, START_EPOCH_FILE), json.dumps({"epoch": epoch}).encode())


def _start_epoch(run_dir: Optional[str]) -> int:
    path = run_dir and storage.join(run_dir, START_EPOCH_FILE)
    return json.loads(storage.read_bytes(path))["epoch"] if path and storage.exists(path) else 0


def shard_config(run_dir: Optional[str] = None, preserve_order: bool = True):
    """Ray Train's DataConfig for the cache datasets: `train` split equally (DDP needs the same number
    of steps on every worker; up to world_size - 1 rows of an epoch are left out for that), `val`
    split unequally (every row once, for the gathered metrics). Order preserved: the same seed gives
    every worker the same rows in the same order (on one node; across nodes, locality picks).

    Block order: Ray Data reseeds randomize_block_order from the seed and its execution counter,
    which counts the executions of this worker group only (one per epoch) and restarts with a new
    group (a restarted worker, a resumed run). The counter is set to the group's first epoch
    (announce_start_epoch in `run_dir`), so epoch e always gets the order seeded by (seed, e)."""
    import ray.train

    class ShardConfig(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds, _deep_copy=True)
                ds.set_name(name)
                limits = ds.context.execution_options.resource_limits  # the read-ahead cap (dataset)
                ds.context.execution_options = self._resolve_execution_options(name)
                ds.context.execution_options.resource_limits = limits
                ds.context.execution_options.preserve_order = preserve_order
                ds.context._execution_idx = _start_epoch(run_dir) if name == "train" else 0
                for i, split in enumerate(ds.streaming_split(world_size, equal=name == "train", locality_hints=hints)):
                    output[i][name] = split
            return output

    return ShardConfig()
