"""Predictions + ground truth -> evaluation report (Parquet tables, PNG plots, one HTML page).

`run_evaluation` reads a predictions dataset (from `score`) and labels; `write_report` takes any
frame of scored, labelled rows, so training writes its validation report with the same code.
Table schemas: docs/evaluation.md. Report folder:

    metrics.parquet      one row per operating point (`rule`): the model's stored threshold, and for
                         binary tasks Youden J, a target sensitivity and argmax (0.5) chosen on this
                         data; `<metric>_ci_low/high`: 95% stratified bootstrap (binary tasks)
    per_class.parquet    one-vs-rest figures per class at the stored operating point
    confusion.parquet    true_label, predicted_label, count (at the stored operating point)
    roc.parquet, pr.parquet           curve points per class
    calibration.parquet  reliability bins (binary: P(positive); multi-class: top-class confidence)
    subgroups.parquet    the same figures per value of each grouping column (format, modality, site...)
    roc.png pr.png confusion.png reliability.png histogram.png gallery.png
    summary.html         one self-contained page (plots embedded) for people; summary.json for tools
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from medclf import storage
from medclf.imaging.manifest import DatasetError, read_manifest
from medclf.errors import UserError
from medclf.report.metrics import (
    bootstrap_ci,
    classification_metrics,
    confusion_table,
    per_class_table,
    pr_points,
    roc_points,
)
from medclf.model.calibration import calibration_table, expected_calibration_error
from medclf.model.decision import choose_threshold
from medclf.data.predictions import prob_column, read_predictions
from medclf.report.summary_page import summary_html
from medclf.report.selective import risk_coverage, risk_coverage_plot, selective_summary

# Columns that, when present in the predictions or the labels manifest, get a subgroup table.
SUBGROUP_CANDIDATES = ("format", "modality", "site", "hospital", "scanner", "manufacturer", "view",
                       "view_position", "body_part", "sex", "age_group")
GALLERY_SIZE = 16


class EvaluationError(UserError):
    pass


@dataclass
class Report:
    output: str
    metrics: pd.DataFrame
    n_evaluated: int
    n_failed: int
    out_of_scope: Optional[dict] = None  # ood_rate(): n, rate of the files seen, count per reason
    rows_dropped: Optional[dict] = None  # {"other_models": n, "superseded": n} from select_model_rows


def select_model_rows(pred: pd.DataFrame, model_id: Optional[str], where: str = "predictions") -> tuple:
    """One model's latest row per file: (rows, model_id, {"other_models": n, "superseded": n}).

    A predictions folder collects every night: a model rollout adds a second model's rows, and
    `--rescore` or a retried transient error a second row for the same file. Evaluating them
    together would count files twice and mix models. Keeps the rows of `model_id` (None: the only
    model present), then the newest (`scored_at`) per (path, frame, checksum).
    """
    ids = sorted(pred["model_id"].dropna().unique().tolist())
    if model_id is None:
        if len(ids) > 1:
            raise EvaluationError(f"{where}: rows from {len(ids)} models {ids}; choose one with --model ARTIFACT "
                                  "or --model-id ID (evaluate.model_id)")
        model_id = ids[0] if ids else None
    mine = pred[pred["model_id"] == model_id] if model_id is not None else pred
    if mine.empty:
        raise EvaluationError(f"{where}: no rows scored by model {model_id}; the predictions hold models {ids}")
    key = [c for c in ("path", "frame", "checksum") if c in mine.columns]
    latest = mine.sort_values("scored_at", kind="stable").drop_duplicates(key, keep="last").sort_index()
    dropped = {"other_models": int(len(pred) - len(mine)), "superseded": int(len(mine) - len(latest))}
    return latest.reset_index(drop=True), model_id, dropped


def dropped_note(dropped: dict, model_id: Optional[str]) -> str:
    """One line for people: which rows were left out of the evaluation, and why."""
    return (f"rows not evaluated: {dropped['other_models']} scored by other models than {model_id}, "
            f"{dropped['superseded']} superseded by a newer row for the same file")


def attach_labels(pred: pd.DataFrame, labels: Optional[str], class_map: Optional[dict] = None,
                  allow_unscored: bool = False) -> pd.DataFrame:
    """Add `label` (and the manifest's other columns) to the predictions.

    From a manifest joined on path, or else from each file's parent folder name. A scored file
    without a label, or a labelled file never scored, is an error (the second unless
    `allow_unscored`): either means the two sides do not describe the same data.
    """
    if labels:
        try:
            manifest = read_manifest(labels)
        except DatasetError as exc:
            raise EvaluationError(str(exc)) from None
        if "label" not in manifest.columns:
            raise EvaluationError(f"{labels}: labels manifest has no 'label' column (columns: {list(manifest.columns)})")
        extra = [c for c in manifest.columns if c not in pred.columns or c == "path"]
        table = manifest[extra].drop_duplicates("path")
        merged = pred.merge(table, on="path", how="left")
        # an out-of-scope file (a CT slice in a chest archive) is no prediction: it needs no label
        unlabelled = merged["label"].isna() & (merged["status"] != "out_of_scope")
        if unlabelled.all():
            raise EvaluationError(
                f"{labels}: none of the {len(pred)} scored files has a label; the paths do not match "
                f"(scored e.g. {pred['path'].iloc[0]!r}, labelled e.g. {manifest['path'].iloc[0]!r})")
        if unlabelled.any():
            sample = merged.loc[unlabelled, "path"].head(3).tolist()
            raise EvaluationError(f"{labels}: no label for {int(unlabelled.sum())} scored file(s), e.g. {sample}")
        unscored = sorted(set(table["path"]) - set(pred["path"]))
        if unscored and not allow_unscored:
            raise EvaluationError(
                f"{labels}: {len(unscored)} labelled file(s) were never scored, e.g. {unscored[:3]}; score them, "
                "or set evaluate.allow_unscored=true to evaluate the scored subset")
    else:
        merged = pred.copy()
        merged["label"] = [posixpath.basename(posixpath.dirname(p.replace("\\", "/"))) for p in merged["path"]]
    if class_map:
        merged["label"] = merged["label"].map(lambda v: class_map.get(v, v))
    return merged


def load_predictions(predictions: str, classes: list[str]) -> pd.DataFrame:
    if not storage.exists(predictions):
        raise EvaluationError(f"{predictions}: predictions folder not found")
    try:
        pred = read_predictions(predictions)
    except Exception as exc:  # not Parquet, unreadable, mixed schemas
        raise EvaluationError(f"{predictions}: not a readable predictions dataset ({exc})") from None
    if pred.empty:
        raise EvaluationError(f"{predictions}: the predictions set is empty (no committed rows); run `score` first")
    prob_cols = [prob_column(c) for c in classes]
    absent = [c for c in prob_cols if c not in pred.columns]
    if absent:
        found = [c for c in pred.columns if c.startswith("prob_")]
        raise EvaluationError(
            f"{predictions}: no probability columns {absent} for classes {classes}; the predictions have {found} "
            "(scored by a model with other class names?)")
    return pred


def per_file(pred: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per scored file, as labels are per file: a multi-frame file's frame rows become one
    row whose probabilities are the mean over its frames that scored `ok` (status ok if any did;
    `frames` says how many). Rows of files that hold no image (`skipped`) are left out."""
    pred = pred[pred["status"] != "skipped"]
    if "frame" not in pred.columns or pred["frame"].isna().all():
        return pred.reset_index(drop=True)
    single = pred[pred["frame"].isna()]
    multi = pred[pred["frame"].notna()]
    prob_cols = [prob_column(c) for c in classes]
    # Not by run_id: after select_model_rows a file's frames are unique, but a resumed (killed) run
    # leaves them under two run ids; they are still one file.
    keys = [k for k in ("path", "checksum", "model_id") if k in multi.columns]
    combined = []
    for _, rows in multi.groupby(keys, sort=False, dropna=False):
        ok = rows[rows["status"] == "ok"]
        row = (ok if len(ok) else rows).iloc[0].copy()
        row[prob_cols] = ok[prob_cols].mean().to_numpy() if len(ok) else row[prob_cols]
        row["frame"], row["frames"] = pd.NA, len(ok)
        combined.append(row)
    return pd.concat([single, pd.DataFrame(combined)], ignore_index=True)


def run_evaluation(
    predictions: str,
    output: str,
    classes: list[str],
    positive_class: Optional[str] = None,
    labels: Optional[str] = None,
    class_map: Optional[dict] = None,
    bootstrap_resamples: int = 1000,
    bootstrap_seed: int = 0,
    group_by: Optional[list[str]] = None,
    target_sensitivity: float = 0.95,
    allow_unscored: bool = False,
    model_id: Optional[str] = None,
    show_paths: bool = False,
) -> Report:
    """Evaluate `model_id`'s latest row per image in `predictions` (None: the only model there), one
    row per file (frames averaged)."""
    pred, model_id, dropped = select_model_rows(load_predictions(predictions, classes), model_id, predictions)
    pred = per_file(pred, classes)
    df = attach_labels(pred, labels, class_map, allow_unscored)
    source = {"predictions": predictions, "labels": labels or "parent folder names", "model_id": model_id,
              "rows_dropped": dropped, "rows_dropped_note": dropped_note(dropped, model_id)}
    report = write_report(df, output, classes, positive_class, bootstrap_resamples, bootstrap_seed, group_by,
                          target_sensitivity, source, show_paths)
    report.rows_dropped = dropped
    return report


def _decisions(probs: np.ndarray, pos: Optional[int], threshold: Optional[float]) -> np.ndarray:
    if pos is not None and probs.shape[1] == 2:
        return np.where(probs[:, pos] >= (0.5 if threshold is None else threshold), pos, 1 - pos)
    return probs.argmax(axis=1)


def subgroup_table(df: pd.DataFrame, y: np.ndarray, probs: np.ndarray, classes: list[str], pos: Optional[int],
                   threshold: Optional[float], columns: list[str]) -> pd.DataFrame:
    """Figures per value of each grouping column, with counts: a drop on one scanner shows here."""
    rows = []
    for col in columns:
        values = df[col].astype("string").fillna("<missing>").to_numpy()
        for value in sorted(set(values)):
            inside = values == value
            m = classification_metrics(y[inside], probs[inside], pos, threshold)
            counts = {f"n_{c}": int((y[inside] == k).sum()) for k, c in enumerate(classes)}
            rows.append({"group": col, "value": value, **counts, **m})
    return pd.DataFrame(rows)


def write_report(
    df: pd.DataFrame,
    output: str,
    classes: list[str],
    positive_class: Optional[str] = None,
    bootstrap_resamples: int = 1000,
    bootstrap_seed: int = 0,
    group_by: Optional[list[str]] = None,
    target_sensitivity: float = 0.95,
    source: Optional[dict] = None,
    show_paths: bool = False,
) -> Report:
    """`df`: path, label, status, threshold, model_id and one `prob_<class>` column per class."""
    from medclf.report import plots

    unknown = sorted(set(df.loc[df["status"] != "out_of_scope", "label"].dropna()) - set(classes))
    if unknown:
        raise EvaluationError(
            f"labels {unknown} are not among the model's classes {classes}; map them with data.class_map "
            "or check that the labels belong to this model")
    ok = df[df["status"] == "ok"].reset_index(drop=True)
    n_failed = int((~df["status"].isin(["ok", "out_of_scope"])).sum())
    oos = ood_rate(df)
    if ok.empty:
        raise EvaluationError(f"every one of the {len(df)} predictions failed; nothing to evaluate")
    prob_cols = [prob_column(c) for c in classes]
    y = ok["label"].map(classes.index).to_numpy()
    probs = ok[prob_cols].to_numpy(np.float64)
    binary = positive_class is not None and len(classes) == 2
    pos = classes.index(positive_class) if positive_class else None
    stored = ok["threshold"].dropna() if "threshold" in ok else pd.Series([], dtype=float)
    threshold = float(stored.iloc[0]) if len(stored) else None

    rows = [{"rule": "stored" if threshold is not None else "argmax", **classification_metrics(y, probs, pos, threshold)}]
    if binary:
        y_pos = (y == pos).astype(int)
        if len(np.unique(y_pos)) == 2:
            rows.append({"rule": "youden_on_this_data",
                         **classification_metrics(y, probs, pos, choose_threshold(y_pos, probs[:, pos], "youden"))})
            t = choose_threshold(y_pos, probs[:, pos], "target_sensitivity", target_sensitivity)
            rows.append({"rule": f"sensitivity_{target_sensitivity:g}_on_this_data", **classification_metrics(y, probs, pos, t)})
        if threshold is not None:
            rows.append({"rule": "argmax", **classification_metrics(y, probs, pos, 0.5)})
        if bootstrap_resamples and len(np.unique(y_pos)) == 2:
            for row in rows:  # 95% CIs at each operating point
                ci = bootstrap_ci(y_pos, probs[:, pos], row["threshold"], bootstrap_resamples, bootstrap_seed)
                for r in ci.itertuples():
                    row[f"{r.metric}_ci_low"], row[f"{r.metric}_ci_high"] = r.ci_low, r.ci_high
    metrics = pd.DataFrame(rows)
    metrics.insert(1, "n_failed", n_failed)
    metrics.insert(2, "n_out_of_scope", oos["n"])

    y_pred = _decisions(probs, pos, threshold)
    # Selective prediction (medclf.report.selective): refused rows lower coverage, not accuracy.
    curve = risk_coverage(y_pred == y, probs[np.arange(len(y_pred)), y_pred], oos["n"])
    selective = selective_summary(curve, len(ok), oos["n"])
    if binary:
        calibration = calibration_table((y == pos).astype(int), probs[:, pos])
        calibration_what = f"true {positive_class}"
    else:  # multi-class: is the top class right as often as its probability says?
        calibration = calibration_table((y_pred == y).astype(int), probs.max(axis=1))
        calibration_what = "top class correct"
    columns = group_by if group_by is not None else [c for c in SUBGROUP_CANDIDATES if c in ok.columns]
    missing_cols = [c for c in columns if c not in ok.columns]
    if missing_cols:
        raise EvaluationError(f"evaluate.group_by names {missing_cols}, not columns of the predictions or labels "
                              f"(have: {sorted(ok.columns)})")
    columns = [c for c in columns if ok[c].nunique(dropna=False) >= 2 or group_by is not None]
    tables = {
        "metrics": metrics,
        "per_class": per_class_table(y, y_pred, probs, classes),
        "confusion": confusion_table(y, y_pred, classes),
        "roc": roc_points(y, probs, classes, pos),
        "pr": pr_points(y, probs, classes, pos),
        "calibration": calibration,
        "subgroups": subgroup_table(ok, y, probs, classes, pos, threshold, columns),
        "risk_coverage": curve,
    }
    storage.makedirs(output)
    for name, table in tables.items():
        storage.write_bytes(storage.join(output, f"{name}.parquet"), table.to_parquet(index=False))

    head = metrics.iloc[0]
    per_class = tables["per_class"].set_index("class")
    if binary:
        aucs, aps = {positive_class: head["roc_auc"]}, {positive_class: head["pr_auc"]}
        roc_op = (1 - head["specificity"], head["sensitivity"])
        pr_op = (head["sensitivity"], head["precision"])
        hist = plots.score_histogram({c: probs[y == k, pos] for k, c in enumerate(classes)},
                                     f"P({positive_class})", threshold if threshold is not None else 0.5)
        ece = expected_calibration_error((y == pos).astype(int), probs[:, pos])
    else:
        aucs, aps = per_class["roc_auc"].to_dict(), per_class["pr_auc"].to_dict()
        roc_op = pr_op = None
        hist = plots.score_histogram({c: probs[y == k].max(axis=1) if (y == k).any() else np.zeros(0)
                                      for k, c in enumerate(classes)}, "probability of the predicted class")
        ece = expected_calibration_error((y_pred == y).astype(int), probs.max(axis=1))
    prevalence = {c: float((y == k).mean()) for k, c in enumerate(classes)}
    pictures = {
        "roc.png": plots.roc_plot(tables["roc"], aucs, roc_op),
        "pr.png": plots.pr_plot(tables["pr"], aps, prevalence, pr_op),
        "confusion.png": plots.confusion_plot(tables["confusion"], classes),
        "reliability.png": plots.reliability_plot(calibration, calibration_what, ece),
        "histogram.png": hist,
        "gallery.png": gallery(ok, y, y_pred, probs, classes, show_paths),
        "risk_coverage.png": risk_coverage_plot(curve, selective),
    }
    for name, png in pictures.items():
        storage.write_bytes(storage.join(output, name), png)

    summary = {**(source or {}), "classes": classes, "positive_class": positive_class, "threshold": threshold,
               "n_evaluated": int(len(ok)), "n_failed": n_failed, "out_of_scope": oos, "selective": selective,
               "class_counts": {c: int((y == k).sum()) for k, c in enumerate(classes)},
               "model_ids": sorted(ok["model_id"].dropna().unique().tolist()) if "model_id" in ok else [],
               "adaptation": adaptation_counts(ok),
               "subgroup_columns": columns,
               "metrics": {k: (None if pd.isna(v) else v) for k, v in head.items() if k != "rule"}}
    storage.write_bytes(storage.join(output, "summary.json"), json.dumps(summary, indent=2, default=float).encode())
    storage.write_bytes(storage.join(output, "summary.html"), summary_html(summary, tables, pictures).encode())
    return Report(output, metrics, int(len(ok)), n_failed, oos)


def adaptation_counts(rows: pd.DataFrame) -> dict[str, int]:
    """Evaluated rows per site profile they were scored with (`adaptation_id`, medclf.score.adaptation);
    "training statistics" for rows scored without one. Two keys: the figures mix two states of the model."""
    ids = rows["adaptation_id"] if "adaptation_id" in rows else pd.Series(None, index=rows.index, dtype=object)
    counts = ids.fillna("training statistics").astype(str).value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items())}


def ood_rate(df: pd.DataFrame) -> dict:
    """Out-of-scope files (medclf.monitor.ood) among those seen: not predictions, so not in the metrics,
    but a rising rate says the input has drifted from what the model was trained on."""
    from medclf.imaging.scope import reason_kind

    rows = df[df["status"] == "out_of_scope"]
    reasons = rows["error"].map(reason_kind).value_counts() if len(rows) else pd.Series(dtype=int)
    return {"n": int(len(rows)), "rate": float(len(rows) / len(df)) if len(df) else float("nan"),
            "reasons": {str(k): int(v) for k, v in reasons.items()}}


def gallery(ok: pd.DataFrame, y: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, classes: list[str],
            show_paths: bool = False) -> bytes:
    """Sample predictions: the most confident errors first, then the least confident correct calls.

    Captions name each file by a short hash of its path unless `show_paths` (medclf.imaging.privacy)."""
    from medclf.config import PreprocessConfig
    from medclf.imaging.decode import decode
    from medclf.report.plots import gallery_plot
    from medclf.imaging.preprocess import preprocess_gray
    from medclf.imaging.privacy import display_name

    confidence = probs[np.arange(len(y_pred)), y_pred]
    wrong = np.flatnonzero(y_pred != y)
    right = np.flatnonzero(y_pred == y)
    order = list(wrong[np.argsort(-confidence[wrong])][:GALLERY_SIZE])
    order += list(right[np.argsort(confidence[right])][: GALLERY_SIZE - len(order)])
    display = PreprocessConfig(image_size=160, mean=0.0, std=1.0)  # the same resize, intensities kept in [0, 1]
    images, captions = [], []
    for i in order:
        path = str(ok["path"].iloc[i])
        try:
            images.append(preprocess_gray(decode(storage.read_bytes(path), path).image, display)[0])
        except Exception:  # the gallery illustrates; an unreadable file must not sink the report
            images.append(None)
        name = display_name(path, show_paths)
        captions.append(f"{name[:28]}\ntrue {classes[y[i]]} / pred {classes[y_pred[i]]}\np(pred) = {confidence[i]:.3f}")
    n_wrong = min(len(wrong), GALLERY_SIZE)
    title = f"Sample predictions: {n_wrong} most confident error(s) (red), then least confident correct calls"
    return gallery_plot(images, captions, [bool(y_pred[i] != y[i]) for i in order], title)
