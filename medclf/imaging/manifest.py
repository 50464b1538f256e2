"""A manifest: a Parquet or CSV table of files with a `path` column (relative paths are relative to
the manifest's folder), read for labelled data sets (medclf.data.labelled) and as a list of scoring
inputs (medclf.imaging.stage.find_inputs).
"""

from __future__ import annotations

import io
import os

import pandas as pd

from medclf import storage
from medclf.errors import UserError


class DatasetError(UserError):
    pass


def read_manifest(path: str) -> pd.DataFrame:
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: manifest not found") from None
    try:
        if path.lower().endswith(".csv"):
            df = pd.read_csv(io.BytesIO(raw))
        else:
            df = pd.read_parquet(io.BytesIO(raw))
    except Exception as exc:
        raise DatasetError(f"{path}: not a readable Parquet/CSV manifest ({exc})") from None
    if "path" not in df.columns:
        raise DatasetError(f"{path}: manifest has no 'path' column (columns: {list(df.columns)})")
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    df = df.copy()
    local_base = not storage.is_remote(base)
    # URLs stay as written (file:// included: medclf.imaging.confine normalises or refuses it per entry)
    df["path"] = [p if ("://" in p or p.startswith("/"))
                  else (os.path.abspath(os.path.join(base, p)) if local_base else storage.join(base, p))
                  for p in df["path"]]
    return df
