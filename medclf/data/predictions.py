"""The predictions dataset scoring writes: its columns, and reading it back (evaluation, Grad-CAM,
the nightly skip set). Hive-partitioned Parquet by `run_date`, local or on object storage."""

from __future__ import annotations

import posixpath
import re
from typing import Optional

import pandas as pd

from medclf import storage
from medclf.imaging.stats import STAT_COLUMNS

# Principal components of the penultimate-layer features each row carries (fitted into the drift
# reference by medclf.monitor.reference).
EMB_PCS = 4
EMB_COLUMNS = [f"emb_pc{k + 1}" for k in range(EMB_PCS)]

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
    "predicted_label": "predicted class name (null unless status is ok)",
    "threshold": "decision threshold on the positive class's probability (null: argmax)",
    "ood_score": "distance of the image from the model's training domain (medclf.monitor.ood; higher = less like it); "
                 "null when not computed (error, skipped, out of scope by header, model without a domain record)",
    "model_id": "model artifact id (<arch>-<sha256 of weights, 12 hex>)",
    "model_version": "artifact creation time (UTC, ISO 8601)",
    "adaptation_id": "id (sha256) of the site profile the row was scored with (medclf.model.adapt); null: the "
                     "training statistics (score.adapt none, or files written before adaptation)",
    "calibration_id": "id of the site calibration file the probabilities, threshold and label were made with "
                      "(medclf.model.site_calibration); null: the model card's own (and in files written before it)",
    "run_id": "id of the scoring run",
    "scored_at": "UTC time the row was scored",
    "status": "ok, error, skipped (not an image) or out_of_scope (not what the model was trained on: medclf.monitor.ood)",
    "error": "what went wrong with this file, or why it was skipped or out of scope (null when fine)",
    "error_kind": "permanent (corrupt or unsupported content) or transient (access error, out of memory, decoder "
                  "missing: the next run retries the file); null when fine",
    **{name: f"{text} (medclf.monitor.reference; null when not decoded, or in files written before drift)"
       for name, text in STAT_COLUMNS.items()},
    **{name: f"projection of the penultimate-layer features on principal component {k + 1} of the validation "
             "features (the model's drift reference); null without one" for k, name in enumerate(EMB_COLUMNS)},
}

def prob_column(class_name: str) -> str:
    """Parquet column holding a class's probability: `prob_<name>` with non-word characters -> '_'."""
    return "prob_" + re.sub(r"\W+", "_", class_name).strip("_")


def prediction_schema(classes: list[str]):
    """The Arrow schema of a predictions file for a model with these classes."""
    import pyarrow as pa

    fields = [
        ("path", pa.string()), ("size", pa.int64()), ("checksum", pa.string()), ("format", pa.string()),
        ("modality", pa.string()), ("sop_instance_uid", pa.string()), ("study_instance_uid", pa.string()),
        ("series_instance_uid", pa.string()), ("frame", pa.int32()), ("predicted_label", pa.string()),
        *[(prob_column(c), pa.float32()) for c in classes],
        ("threshold", pa.float64()), ("ood_score", pa.float64()), ("model_id", pa.string()), ("model_version", pa.string()),
        ("adaptation_id", pa.string()), ("calibration_id", pa.string()),
        ("run_id", pa.string()), ("scored_at", pa.string()), ("status", pa.string()), ("error", pa.string()),
        ("error_kind", pa.string()),
        *[(name, pa.float64()) for name in (*STAT_COLUMNS, *EMB_COLUMNS)],
    ]
    return pa.schema(fields)


def predictions_dataset(path: str):
    """Every committed file under `path`, read with the union of their schemas.

    Partitions written by models with other class names keep their own `prob_*` columns, and the
    standard columns are always there (null in files written before a column existed).
    """
    import pyarrow as pa
    import pyarrow.dataset as pads

    from medclf.data.fence import valid_files

    fs, fs_path = storage.arrow_filesystem(path)
    good, zombies = valid_files(path) if storage.isdir(path) else ([], [])
    # Parts a run published after losing its lease do not count (medclf.data.fence)
    source = [posixpath.join(fs_path.rstrip("/"), n) for n in good] if zombies else fs_path
    base = {"partition_base_dir": fs_path.rstrip("/")} if zombies else {}
    found = pads.dataset(source, filesystem=fs, format="parquet", partitioning="hive", **base)
    schemas = [prediction_schema([]), *(fragment.physical_schema for fragment in found.get_fragments()), found.schema]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    return pads.dataset(source, schema=schema, filesystem=fs, format="parquet", partitioning="hive", **base)


def read_predictions(path: str, columns: Optional[list[str]] = None) -> pd.DataFrame:
    """All committed prediction rows under `path` (every run date); hidden temp files are ignored."""
    return predictions_dataset(path).to_table(columns=columns).to_pandas()
