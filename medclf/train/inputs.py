"""The run's data on the driver, before any worker starts: discover, split and check the labelled
files (prepare_data), refuse to resume a run id whose inputs changed (check_resume), and the splits
as class indices with their validation groups (TrainingInputs, start_run).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from medclf import storage
from medclf.config import Config, ConfigError
from medclf.data import labelled as data_mod
from medclf.ops.logs import say
from medclf.train.parts import LoopConfig, worker_config

# The name training's log lines carried before the module was split: the log reads as it did.
log = logging.getLogger(__name__)


def prepare_data(cfg: Config) -> tuple[pd.DataFrame, list[str]]:
    """Discover + split + validate; raises before any heavy work on bad data."""
    df = data_mod.discover(cfg.data)
    classes = data_mod.class_names(df, cfg.data)
    split_seed = cfg.run.seed if cfg.data.split_seed is None else cfg.data.split_seed
    df = data_mod.assign_validation(df, cfg.data, split_seed)
    source = cfg.data.manifest or cfg.data.root or "data"
    data_mod.check_nonempty(df, classes, [cfg.data.train_split, cfg.data.val_split], source)
    if cfg.data.positive_class and len(classes) != 2:
        raise data_mod.DatasetError(f"data.positive_class is set but there are {len(classes)} classes {classes}")
    return df, classes


def preprocess_all(paths: list[str], cfg: Config) -> tuple[np.ndarray, list[str]]:
    """Decode + preprocess every image once (Ray Data tasks); returns tensors and error messages."""
    from medclf.imaging.stage import images_dataset, text_or_none

    ds = images_dataset(paths, cfg.preprocess, cfg.score.decode_batch_size)
    pixels = np.zeros((len(paths), 1, cfg.preprocess.image_size, cfg.preprocess.image_size), np.float32)
    where = {p: i for i, p in enumerate(paths)}
    errors: list[str] = []
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        for j, (path, err) in enumerate(zip(batch["path"], text_or_none(batch["error"]))):
            if err is not None:
                errors.append(str(err))
            else:
                pixels[where[str(path)]] = batch["pixels"][j]
    return pixels, errors


FINGERPRINT_FILE = "run_fingerprint.json"


class ResumeError(ConfigError):
    """A re-used run id whose checkpoints were made for other inputs."""


def run_fingerprint(cfg: Config, classes: list[str], df: pd.DataFrame) -> dict:
    """What a run id's checkpoints are only valid for: classes, architecture, preprocessing, data."""
    listing = df.sort_values("path")[[c for c in ("path", "label", "split") if c in df.columns]]
    return {"classes": list(classes), "architecture": cfg.model.arch, "preprocessing": cfg.preprocess.model_dump(),
            "data listing": hashlib.sha256(listing.to_csv(index=False).encode()).hexdigest()}


def check_resume(run_dir: str, fingerprint: dict, restart: bool = False) -> None:
    """Refuse to resume a run id whose inputs changed (naming what changed), unless `restart`,
    which drops the run's checkpoints and starts over. Records the fingerprint for the next re-use."""
    path = storage.join(run_dir, FINGERPRINT_FILE)
    if restart:
        checkpoints = storage.join(run_dir, "ray_train")
        if storage.exists(checkpoints):
            fs, p = storage.filesystem(checkpoints)
            fs.rm(p, recursive=True)
    elif storage.exists(path):
        before = json.loads(storage.read_bytes(path))
        changed = [k for k in fingerprint if before.get(k) != fingerprint[k]]
        if changed:
            detail = "; ".join(f"{k}: was {before.get(k)!r}, now {fingerprint[k]!r}" for k in changed
                               if k != "data listing")
            raise ResumeError(
                f"{run_dir}: this run id was started with other {', '.join(changed)}"
                + (f" ({detail})" if detail else "")
                + "; its checkpoints do not fit. Use a new run id, or --restart to start this run over.")
    storage.write_bytes(path, json.dumps(fingerprint, indent=2).encode())


@dataclass
class TrainingInputs:
    """The run's data as the driver sees it: splits, labels as class indices, validation groups."""

    classes: list[str]
    positive: Optional[str]
    train: pd.DataFrame
    val: pd.DataFrame
    train_y: np.ndarray
    val_y: np.ndarray
    val_groups: np.ndarray

    @property
    def positive_index(self) -> Optional[int]:
        return self.classes.index(self.positive) if self.positive else None

    @property
    def select_group(self) -> str:
        """The validation part the epoch, temperature and threshold are chosen on."""
        return "family" if (self.val_groups == "family").any() else "patient"

    def job(self, cfg: Config) -> LoopConfig:
        return worker_config(cfg, self.classes, self.train_y, positive_index=self.positive_index,
                             val_y=self.val_y.tolist(), val_select=(self.val_groups == self.select_group).tolist(),
                             val_patient=(self.val_groups == "patient").tolist())


def start_run(cfg: Config, run_dir: str, prepared, restart: bool) -> TrainingInputs:
    """Split, print the data line, check a re-used run id may resume, record the splits."""
    df, classes = prepared or prepare_data(cfg)
    positive = cfg.data.positive_class or (classes[-1] if len(classes) == 2 else None)
    train, val = (df[df["split"] == s].reset_index(drop=True) for s in (cfg.data.train_split, cfg.data.val_split))
    log.debug("train %d images, validation %d images, classes %s", len(train), len(val), classes)  # say() prints it
    say(f"data: {len(train)} train / {len(val)} validation images, "
         f"{df[df.split.isin([cfg.data.train_split, cfg.data.val_split])].patient_id.nunique()} patients, "
         f"classes {classes}")
    storage.makedirs(run_dir)
    check_resume(run_dir, run_fingerprint(cfg, classes, df), restart)
    storage.write_bytes(storage.join(run_dir, "splits.parquet"), df.to_parquet(index=False))
    labels = {name: np.array([classes.index(c) for c in part["label"]], np.int64) for name, part in
              (("train", train), ("val", val))}
    return TrainingInputs(classes, positive, train, val, labels["train"], labels["val"], validation_groups(val))


def validation_groups(val: pd.DataFrame) -> np.ndarray:
    """Per validation row: `family` (held-out families / patient ranges) or `patient` (medclf.data.labelled)."""
    if data_mod.VAL_GROUP_COLUMN not in val:
        return np.full(len(val), "patient", dtype=object)
    return val[data_mod.VAL_GROUP_COLUMN].fillna("patient").to_numpy(dtype=object)
