"""Labelled datasets: discover files, map class names, split by patient.

A dataset is a DataFrame with columns `path` (full path or URL), `label` (class name),
`split` (train / val / test) and `patient_id`. It comes from an image folder
(`<root>/<CLASS>/<file>` or `<root>/<split>/<CLASS>/<file>`) or a manifest (Parquet/CSV with
`path` and `label`, optionally `split` and `patient_id`; relative paths are relative to the
manifest's folder).
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import PurePosixPath
from typing import Optional

import numpy as np
import pandas as pd

from medclf import storage
from medclf.config import DataConfig
from medclf.imaging.manifest import DatasetError, read_manifest


def _relative_parts(path: str, root: str) -> list[str]:
    if not storage.is_remote(root):  # listed paths are absolute and normalised ('../x' resolved)
        root, path = os.path.abspath(root), os.path.abspath(path)
    root = root.rstrip("/")
    rel = path[len(root) :].lstrip("/") if path.startswith(root) else path
    return list(PurePosixPath(rel.replace("\\", "/")).parts)


def patient_id_of(path: str, regex: Optional[str]) -> str:
    """Patient id from a file name: the regex's first group, or the file stem."""
    name = posixpath.basename(path)
    if regex:
        m = re.search(regex, name)
        if m:
            return m.group(1)
    return name.rsplit(".", 1)[0]


def numbered_block(patient_id: str, label: str, block: int, path: str) -> str:
    """`<label>#<k>`: the k-th run of `block` consecutive file numbers of a class (data.patient_block)."""
    number = _patient_number(patient_id)
    if number < 0:
        raise DatasetError(f"{path}: data.patient_block groups files by the number in their name, "
                           f"and '{patient_id}' has none")
    return f"{label}#{number // block}"


def discover(cfg: DataConfig) -> pd.DataFrame:
    """Find the labelled files per the config; validate classes before any training work."""
    if cfg.manifest:
        df = read_manifest(cfg.manifest)
        if "label" not in df.columns:
            raise DatasetError(f"{cfg.manifest}: manifest has no 'label' column")
        source = cfg.manifest
        if "split" not in df.columns:
            df["split"] = cfg.train_split
    elif cfg.root:
        source = cfg.root
        if not storage.exists(cfg.root):
            raise DatasetError(f"{cfg.root}: data folder not found")
        paths = list(storage.list_files(cfg.root, cfg.extensions))
        if not paths:
            raise DatasetError(f"{cfg.root}: no image files ({', '.join(cfg.extensions)}) found")
        rows = []
        for p in paths:
            parts = _relative_parts(p, cfg.root)
            if len(parts) == 2:
                split, folder = cfg.train_split, parts[0]
            elif len(parts) == 3:
                split, folder = parts[0], parts[1]
            else:
                raise DatasetError(
                    f"{p}: expected <root>/<CLASS>/<file> or <root>/<split>/<CLASS>/<file> under {cfg.root}"
                )
            rows.append((p, folder, split))
        df = pd.DataFrame(rows, columns=["path", "label", "split"])
    else:
        raise DatasetError("no data: set data.root (an image folder) or data.manifest")

    df["label"] = df["label"].astype(str).map(lambda name: cfg.class_map.get(name, name))
    found = sorted(df["label"].unique())
    classes = cfg.classes or found
    missing = [c for c in classes if c not in found]
    if missing:
        raise DatasetError(
            f"{source}: no images for class(es) {missing}; found folders/labels {found}"
            + (f" (after data.class_map {cfg.class_map})" if cfg.class_map else "")
        )
    extra = [c for c in found if c not in classes]
    if extra:
        raise DatasetError(
            f"{source}: labels {extra} are not in data.classes {classes}; add them or map them with data.class_map"
        )
    if len(classes) < 2:
        raise DatasetError(f"{source}: need at least 2 classes, found {classes}")
    if "patient_id" not in df.columns:
        df["patient_id"] = [patient_id_of(p, cfg.patient_regex) for p in df["path"]]
        if cfg.patient_block:
            df["patient_id"] = [numbered_block(pid, label, cfg.patient_block, p)
                                for pid, label, p in zip(df["patient_id"], df["label"], df["path"])]
    df["patient_id"] = df["patient_id"].astype(str)
    return df.reset_index(drop=True)


def class_names(df: pd.DataFrame, cfg: DataConfig) -> list[str]:
    return list(cfg.classes) if cfg.classes else sorted(df["label"].unique())


# Which part of validation a row belongs to (splits.parquet): `patient` (random patients of the
# training archive) or `family` (held-out acquisition families / patient ranges: a new archive's
# stand-in). Null outside validation.
VAL_GROUP_COLUMN = "val_group"


def family_of(path: str, regex: str) -> str:
    """Acquisition family from a file name: the regex's first group, or '' when it does not match."""
    m = re.search(regex, posixpath.basename(path))
    return m.group(1) if m else ""


def _patient_number(patient_id: str) -> int:
    digits = re.findall(r"\d+", patient_id)
    return int(digits[-1]) if digits else -1


def _random_patients(train: pd.DataFrame, fraction: float, rng: np.random.Generator) -> set:
    """A label-stratified random `fraction` of the patients in `train` (each label keeps >= 1 each side)."""
    patient_label = train.groupby("patient_id")["label"].agg(lambda s: s.value_counts().index[0])
    chosen: set = set()
    for label in sorted(patient_label.unique()):
        patients = np.array(sorted(patient_label[patient_label == label].index))
        rng.shuffle(patients)
        n_val = int(round(len(patients) * fraction))
        if len(patients) >= 2:
            n_val = min(max(n_val, 1), len(patients) - 1)  # both splits keep every class
        chosen.update(patients[:n_val])
    return chosen


def _family_holdout_patients(train: pd.DataFrame, cfg: DataConfig) -> set:
    """Patients of the held-out families, plus a contiguous id range of every other family whose
    class no held-out family covers (so each class is represented in the held-out part)."""
    families = train["path"].map(lambda p: family_of(p, cfg.family_regex))
    unknown = sorted(set(cfg.holdout_families) - set(families))
    if unknown:
        raise DatasetError(f"data.holdout_families {unknown} match no file name (families found by "
                           f"data.family_regex: {sorted(set(families) - {''})})")
    held = families.isin(cfg.holdout_families)
    chosen, covered = set(train.loc[held, "patient_id"]), set(train.loc[held, "label"])
    for family in sorted(set(families) - set(cfg.holdout_families)):
        if set(train.loc[families == family, "label"]) <= covered:
            continue
        patients = sorted(set(train.loc[families == family, "patient_id"]) - chosen,
                          key=lambda p: (_patient_number(p), p))
        n_range = int(round(len(patients) * cfg.holdout_id_fraction))
        chosen.update(patients[:n_range] if cfg.holdout_id_end == "low" else patients[len(patients) - n_range:])
    return chosen


def assign_validation(df: pd.DataFrame, cfg: DataConfig, seed: int) -> pd.DataFrame:
    """Carve a validation split out of train by patient when none exists (`data.val_scheme`).

    Every image of a patient lands in the same split. `patient`: random patients drawn per
    (majority) label, so both splits keep the class balance. `family`: whole acquisition families
    and the latest patient ranges first (VAL_GROUP_COLUMN `family`), then random patients of the rest
    (`patient`). Deterministic for a seed.
    """
    df = df.copy()
    if (df["split"] == cfg.val_split).any():  # a given validation split (a manifest may name its groups)
        if VAL_GROUP_COLUMN not in df.columns:
            df[VAL_GROUP_COLUMN] = np.where(df["split"] == cfg.val_split, "patient", None)
        return df
    df[VAL_GROUP_COLUMN] = None
    train = df[df["split"] == cfg.train_split]
    if train.empty:
        raise DatasetError(f"no '{cfg.train_split}' images to train on (splits found: {sorted(df['split'].unique())})")
    rng = np.random.default_rng(seed)
    family_patients: set = set()
    if cfg.val_scheme == "family":
        family_patients = _family_holdout_patients(train, cfg)
        train = train[~train["patient_id"].isin(family_patients)]
    patient_patients = _random_patients(train, cfg.val_fraction, rng)
    in_train = df["split"] == cfg.train_split
    for group, patients in (("family", family_patients), ("patient", patient_patients)):
        rows = in_train & df["patient_id"].isin(patients)
        df.loc[rows, "split"] = cfg.val_split
        df.loc[rows, VAL_GROUP_COLUMN] = group
    return df


def check_nonempty(df: pd.DataFrame, classes: list[str], splits: list[str], source: str) -> None:
    for split in splits:
        part = df[df["split"] == split]
        counts = part["label"].value_counts()
        empty = [c for c in classes if counts.get(c, 0) == 0]
        if empty:
            raise DatasetError(f"{source}: split '{split}' has no images of class(es) {empty}")
