"""Predictions + ground truth -> evaluation report (Parquet tables + PNG plots).

Report folder:
    metrics.parquet    one row per operating point (`rule`): the model's stored threshold, and
                       for binary tasks also Youden J and argmax (0.5); columns from medclf.metrics,
                       with `<metric>_ci_low/high` (95% stratified bootstrap) for binary tasks
    confusion.parquet  true_label, predicted_label, count (at the stored threshold)
    roc.parquet        class, fpr, tpr, threshold
    pr.parquet         class, precision, recall, threshold
    calibration.parquet  (binary) bin, bin_low, bin_high, count, mean_predicted, fraction_positive
    roc.png, confusion.png
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from medclf import storage
from medclf.data import read_manifest
from medclf.metrics import (
    bootstrap_ci,
    calibration_table,
    choose_threshold,
    classification_metrics,
    confusion_table,
    pr_points,
    roc_points,
)
from medclf.models import prob_column
from medclf.plots import confusion_plot, roc_plot
from medclf.score import read_predictions


class EvaluationError(ValueError):
    pass


@dataclass
class Report:
    output: str
    metrics: pd.DataFrame
    n_evaluated: int
    n_failed: int


def attach_labels(pred: pd.DataFrame, labels: Optional[str], class_map: Optional[dict] = None) -> pd.DataFrame:
    """Add a `label` column: from a manifest (joined on path) or each file's parent folder name."""
    if labels:
        manifest = read_manifest(labels)
        if "label" not in manifest.columns:
            raise EvaluationError(f"{labels}: labels manifest has no 'label' column")
        table = manifest[["path", "label"]].drop_duplicates("path")
        merged = pred.merge(table, on="path", how="left")
        missing = merged["label"].isna().sum()
        if missing:
            sample = merged.loc[merged["label"].isna(), "path"].head(3).tolist()
            raise EvaluationError(f"{labels}: no label for {missing} scored file(s), e.g. {sample}")
    else:
        merged = pred.copy()
        merged["label"] = [posixpath.basename(posixpath.dirname(p.replace("\\", "/"))) for p in merged["path"]]
    if class_map:
        merged["label"] = merged["label"].map(lambda v: class_map.get(v, v))
    return merged


def run_evaluation(
    predictions: str,
    output: str,
    classes: list[str],
    positive_class: Optional[str] = None,
    labels: Optional[str] = None,
    class_map: Optional[dict] = None,
    bootstrap_resamples: int = 1000,
    bootstrap_seed: int = 0,
) -> Report:
    pred = read_predictions(predictions)
    if pred.empty:
        raise EvaluationError(f"{predictions}: no predictions to evaluate")
    prob_cols = [prob_column(c) for c in classes]
    absent = [c for c in prob_cols if c not in pred.columns]
    if absent:
        raise EvaluationError(f"{predictions}: no probability columns {absent} for classes {classes}")
    df = attach_labels(pred, labels, class_map)
    unknown = sorted(set(df["label"]) - set(classes))
    if unknown:
        raise EvaluationError(f"labels {unknown} are not among the model's classes {classes}")
    ok = df[df["status"] == "ok"]
    n_failed = int((df["status"] != "ok").sum())
    if ok.empty:
        raise EvaluationError(f"{predictions}: every prediction failed; nothing to evaluate")
    y = ok["label"].map(classes.index).to_numpy()
    probs = ok[prob_cols].to_numpy(np.float64)
    pos = classes.index(positive_class) if positive_class else None
    stored = ok["threshold"].dropna()
    stored_threshold = float(stored.iloc[0]) if len(stored) else None

    rows = [{"rule": "stored" if stored_threshold is not None else "argmax",
             **classification_metrics(y, probs, pos, stored_threshold)}]
    if pos is not None and len(classes) == 2:
        y_pos = (y == pos).astype(int)
        youden = choose_threshold(y_pos, probs[:, pos], "youden")
        rows.append({"rule": "youden_on_this_data", **classification_metrics(y, probs, pos, youden)})
        rows.append({"rule": "argmax", **classification_metrics(y, probs, pos, 0.5)})
    if pos is not None and len(classes) == 2 and bootstrap_resamples:
        y_pos = (y == pos).astype(int)
        for row in rows:  # 95% CIs at each operating point
            ci = bootstrap_ci(y_pos, probs[:, pos], row["threshold"], bootstrap_resamples, bootstrap_seed)
            for r in ci.itertuples():
                row[f"{r.metric}_ci_low"], row[f"{r.metric}_ci_high"] = r.ci_low, r.ci_high
    metrics = pd.DataFrame(rows)
    metrics.insert(1, "n_failed", n_failed)

    if pos is not None and len(classes) == 2:
        t = 0.5 if stored_threshold is None else stored_threshold
        y_pred = np.where(probs[:, pos] >= t, pos, 1 - pos)
    else:
        y_pred = probs.argmax(axis=1)
    confusion = confusion_table(y, y_pred, classes)
    roc = roc_points(y, probs, classes, pos)
    pr = pr_points(y, probs, classes, pos)
    tables = {"metrics": metrics, "confusion": confusion, "roc": roc, "pr": pr}
    if pos is not None and len(classes) == 2:
        tables["calibration"] = calibration_table((y == pos).astype(int), probs[:, pos])

    storage.makedirs(output)
    for name, table in tables.items():
        storage.write_bytes(storage.join(output, f"{name}.parquet"), table.to_parquet(index=False))
    head = metrics.iloc[0]
    if pos is not None:
        aucs = {classes[pos]: head["roc_auc"]}
        op = (1 - head["specificity"], head["sensitivity"])
    else:
        from sklearn.metrics import roc_auc_score

        aucs = {c: roc_auc_score((y == k).astype(int), probs[:, k]) for k, c in enumerate(classes) if len(set(y == k)) == 2}
        op = None
    storage.write_bytes(storage.join(output, "roc.png"), roc_plot(roc, aucs, op))
    storage.write_bytes(storage.join(output, "confusion.png"), confusion_plot(confusion, classes))
    summary = {"predictions": predictions, "classes": classes, "positive_class": positive_class,
               "threshold": stored_threshold, "n_evaluated": int(len(ok)), "n_failed": n_failed,
               "model_ids": sorted(ok["model_id"].unique().tolist())}
    storage.write_bytes(storage.join(output, "summary.json"), json.dumps(summary, indent=2).encode())
    return Report(output, metrics, int(len(ok)), n_failed)
