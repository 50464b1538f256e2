"""Batch scoring with Ray Data: list -> read+decode+preprocess (tasks) -> model (actor pool) -> Parquet.

Reading/decoding runs in Ray tasks separate from the inference actors, so the two overlap and
each scales on its own. A file that cannot be read or decoded becomes a row with
`status = "error"` and its message; the run goes on. One row per input file, always.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Optional

import numpy as np
import pandas as pd

from medclf import storage
from medclf.config import Config, PreprocessConfig
from medclf.decode import DICOM_META_TAGS, DecodeError, decode
from medclf.models import load_artifact, load_card, prob_column
from medclf.preprocess import preprocess

log = logging.getLogger(__name__)

# Output schema of the predictions Parquet (per-class `prob_<class>` columns follow `status`).
PREDICTION_COLUMNS = {
    "path": "input file path or URL",
    "size": "input size in bytes",
    "checksum": "sha256 of the input bytes",
    "format": "png, jpeg or dicom (as sniffed from the bytes)",
    "modality": "DICOM Modality (null for JPEG/PNG)",
    "sop_instance_uid": "DICOM SOPInstanceUID (null for JPEG/PNG)",
    "study_instance_uid": "DICOM StudyInstanceUID (null for JPEG/PNG)",
    "series_instance_uid": "DICOM SeriesInstanceUID (null for JPEG/PNG)",
    "predicted_label": "predicted class name (null on error)",
    "threshold": "decision threshold on the positive class's probability (null: argmax)",
    "model_id": "model artifact id (<arch>-<sha256 of weights, 12 hex>)",
    "model_version": "artifact creation time (UTC, ISO 8601)",
    "run_id": "id of the scoring run",
    "scored_at": "UTC time the row was scored",
    "status": "ok or error",
    "error": "what went wrong with this file (null when fine)",
}
_META_KEYS = ["format", *DICOM_META_TAGS]


def prediction_schema(classes: list[str]):
    """The Arrow schema of a predictions file for a model with these classes."""
    import pyarrow as pa

    fields = [
        ("path", pa.string()), ("size", pa.int64()), ("checksum", pa.string()), ("format", pa.string()),
        ("modality", pa.string()), ("sop_instance_uid", pa.string()), ("study_instance_uid", pa.string()),
        ("series_instance_uid", pa.string()), ("predicted_label", pa.string()),
        *[(prob_column(c), pa.float32()) for c in classes],
        ("threshold", pa.float64()), ("model_id", pa.string()), ("model_version", pa.string()),
        ("run_id", pa.string()), ("scored_at", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ]
    return pa.schema(fields)


def load_images(batch: dict, spec: dict) -> dict:
    """Ray Data task: paths -> bytes -> checksum -> pixels -> model tensors; errors as values."""
    pre = PreprocessConfig.model_validate(spec)
    paths = [str(p) for p in batch["path"]]
    n, size = len(paths), pre.image_size
    pixels = np.zeros((n, 3, size, size), np.float32)
    out: dict = {"path": paths, "size": np.full(n, -1, np.int64), "checksum": [None] * n, "error": [None] * n}
    for key in _META_KEYS:
        out[key] = [None] * n
    for i, path in enumerate(paths):
        try:
            data = storage.read_bytes(path)
            out["size"][i] = len(data)
            out["checksum"][i] = hashlib.sha256(data).hexdigest()
            decoded = decode(data, path)
            for key in _META_KEYS:
                out[key][i] = decoded.meta.get(key)
            pixels[i] = preprocess(decoded.image, pre)
        except DecodeError as exc:
            out["error"][i] = str(exc)
        except FileNotFoundError:
            out["error"][i] = f"{path}: file not found"
        except Exception as exc:  # one bad file must not end the night's run
            out["error"][i] = f"{path}: {type(exc).__name__}: {exc}"
    out["pixels"] = pixels
    return out


def text_or_none(values) -> list:
    """Ray turns an all-null string column into float NaNs; give the strings back, None for nulls."""
    return [v if isinstance(v, str) else None for v in values]


class Predictor:
    """Ray Data actor: holds the model, turns a batch of tensors into prediction rows."""

    def __init__(self, model_path: str, run_id: str, use_gpu: bool = False):
        import torch

        self.torch = torch
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model, self.card = load_artifact(model_path, self.device)
        self.run_id = run_id
        self.prob_columns = [prob_column(c) for c in self.card.classes]
        self.schema = prediction_schema(self.card.classes)

    def __call__(self, batch: dict):
        import pyarrow as pa

        torch = self.torch
        errors = text_or_none(batch["error"])
        ok = np.array([e is None for e in errors], bool)
        n = len(errors)
        probs = np.full((n, len(self.card.classes)), np.nan, np.float32)
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device)
            with torch.inference_mode():
                probs[ok] = torch.softmax(self.model(x).float(), dim=1).cpu().numpy()
        labels = predict_labels(probs, self.card.classes, self.card.positive_index, self.card.threshold)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        out = {k: v for k, v in batch.items() if k != "pixels"}
        for key in ("checksum", "error", *_META_KEYS):
            out[key] = text_or_none(batch[key])
        out["predicted_label"] = [lab if good else None for lab, good in zip(labels, ok)]
        for j, col in enumerate(self.prob_columns):
            out[col] = probs[:, j]
        out["threshold"] = np.full(n, np.nan if self.card.threshold is None else self.card.threshold, np.float64)
        out["model_id"] = [self.card.model_id] * n
        out["model_version"] = [self.card.created_at] * n
        out["run_id"] = [self.run_id] * n
        out["scored_at"] = [now] * n
        out["status"] = ["ok" if good else "error" for good in ok]
        out["size"] = np.asarray(batch["size"], np.int64)
        out["path"] = [str(p) for p in batch["path"]]
        return pa.table({name: out[name] for name in self.schema.names}, schema=self.schema)


def predict_labels(probs: np.ndarray, classes: list[str], positive_index: Optional[int], threshold: Optional[float]):
    """Binary with a threshold: positive iff p(positive) >= threshold; otherwise argmax."""
    if positive_index is not None and threshold is not None and len(classes) == 2:
        negative_index = 1 - positive_index
        return [classes[positive_index] if p >= threshold else classes[negative_index] for p in probs[:, positive_index]]
    return [classes[int(i)] for i in np.nan_to_num(probs, nan=-1).argmax(axis=1)]


def list_inputs(source: str, extensions: Iterable[str]) -> list[str]:
    """Input files: a folder/prefix, a glob, or a manifest (Parquet/CSV with a `path` column)."""
    if source.lower().endswith((".parquet", ".csv")) and storage.exists(source) and not storage.isdir(source):
        from medclf.data import read_manifest

        return list(read_manifest(source)["path"])
    if not any(ch in source for ch in "*?[") and not storage.exists(source):
        raise FileNotFoundError(f"{source}: scoring input not found")
    return list(storage.list_files(source, list(extensions)))


def images_dataset(paths: list[str], spec: PreprocessConfig, decode_batch_size: int = 16):
    """Ray Dataset of decoded, preprocessed images (the stage training reuses)."""
    import ray.data

    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, min(len(paths) // 64, 200)))
    return ds.map_batches(
        load_images,
        fn_kwargs={"spec": spec.model_dump()},
        batch_size=decode_batch_size,
        batch_format="numpy",
        num_cpus=0.5,  # leave CPU for the inference actors on small machines
    )


@dataclass
class ScoreSummary:
    output: str
    seen: int
    scored: int
    failed: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.seen / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        return (
            f"scored {self.scored}, failed {self.failed} of {self.seen} files in {self.seconds:.1f}s "
            f"({self.images_per_s:.1f} images/s) -> {self.output}"
        )


def run_scoring(cfg: Config, run_id: str, input_path: str, model_path: str, output: str) -> ScoreSummary:
    import ray.data

    start = time.time()
    card = load_card(model_path)  # fail fast on a bad artifact, before any Ray work
    paths = list_inputs(input_path, cfg.score.extensions)
    if not paths:
        raise FileNotFoundError(f"{input_path}: no input files with extensions {cfg.score.extensions}")
    log.info("scoring %d files from %s with model %s", len(paths), input_path, card.model_id)
    ds = images_dataset(paths, card.preprocess_spec, cfg.score.decode_batch_size)
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_path": model_path, "run_id": run_id, "use_gpu": cfg.score.use_gpu},
        batch_size=cfg.score.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.score.num_actors),
        num_cpus=cfg.score.cpus_per_actor,
        num_gpus=1 if cfg.score.use_gpu else 0,
    )
    fs, fs_path = storage.arrow_filesystem(output)
    ds.write_parquet(fs_path, filesystem=fs, min_rows_per_file=1024, mode="overwrite")
    table = read_predictions(output, columns=["status"])
    failed = int((table["status"] == "error").sum())
    return ScoreSummary(output, len(table), len(table) - failed, failed, time.time() - start)


def read_predictions(path: str, columns: Optional[list[str]] = None) -> pd.DataFrame:
    import pyarrow.dataset as pads

    fs, fs_path = storage.arrow_filesystem(path)
    dataset = pads.dataset(fs_path, filesystem=fs, format="parquet", partitioning="hive")
    return dataset.to_table(columns=columns).to_pandas()
