"""Classification metrics as pure functions over arrays (scikit-learn underneath).

Scores, never hard labels, feed ROC and PR curves. Binary tasks are evaluated at a decision
threshold on the positive class's probability; multi-class tasks by argmax, one-vs-rest AUC
and macro averages. The rule that picks the threshold (choose_threshold) and the calibration
measures live with the model (medclf.model.decision, medclf.model.calibration).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from medclf.model.calibration import expected_calibration_error


def binary_metrics(y_true: np.ndarray, p_pos: np.ndarray, threshold: float) -> dict:
    y_true = np.asarray(y_true).astype(int)
    p_pos = np.asarray(p_pos, dtype=float)
    y_pred = (p_pos >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both = len(np.unique(y_true)) == 2
    return {
        "n": int(len(y_true)),
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)) if both else float("nan"),
        "precision": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y_true, p_pos)) if both else float("nan"),
        "pr_auc": float(skm.average_precision_score(y_true, p_pos)) if both else float("nan"),
        "brier": brier_score(y_true, p_pos),
        "ece": expected_calibration_error(y_true, p_pos),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


def multiclass_metrics(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> dict:
    y_true = np.asarray(y_true).astype(int)
    y_pred = probs.argmax(axis=1)
    labels = list(range(n_classes))
    out = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "sensitivity": float(skm.recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }
    for name, fn in (("precision", skm.precision_score), ("sensitivity", skm.recall_score), ("f1", skm.f1_score)):
        out[f"{name}_weighted"] = float(fn(y_true, y_pred, labels=labels, average="weighted", zero_division=0))
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    negatives = cm.sum() - cm.sum(axis=1)
    true_negatives = cm.sum() - cm.sum(axis=0) - cm.sum(axis=1) + np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["specificity"] = float(np.nanmean(true_negatives / negatives))  # macro one-vs-rest
    for average in ("macro", "weighted"):
        suffix = "" if average == "macro" else "_weighted"
        try:
            out[f"roc_auc{suffix}"] = float(skm.roc_auc_score(y_true, probs, multi_class="ovr", labels=labels,
                                                             average=average))
        except ValueError:
            out[f"roc_auc{suffix}"] = float("nan")
    onehot = np.eye(n_classes)[y_true]
    present = onehot.sum(axis=0) > 0
    out["pr_auc"] = float(np.mean([skm.average_precision_score(onehot[:, k], probs[:, k])
                                   for k in range(n_classes) if present[k]])) if present.any() else float("nan")
    for k, r in enumerate(skm.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)):
        out[f"recall_{k}"] = float(r)
    return out


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One-vs-rest figures per class at the given decisions: n, precision, recall, specificity, F1, AUCs."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    rows = []
    for k, name in enumerate(classes):
        t, p = (y_true == k).astype(int), (y_pred == k).astype(int)
        tp, fp = int((t & p).sum()), int(((1 - t) & p).sum())
        fn, tn = int((t & (1 - p)).sum()), int(((1 - t) & (1 - p)).sum())
        both = 0 < t.sum() < len(t)
        rows.append({"class": name, "n": int(t.sum()), "predicted": int(p.sum()),
                     "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
                     "specificity": _ratio(tn, tn + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
                     "roc_auc": float(skm.roc_auc_score(t, probs[:, k])) if both else float("nan"),
                     "pr_auc": float(skm.average_precision_score(t, probs[:, k])) if both else float("nan")})
    return pd.DataFrame(rows)


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, positive_index: Optional[int], threshold: Optional[float]
) -> dict:
    """Binary metrics when a positive class is set, multi-class ones otherwise; plus log loss."""
    n_classes = probs.shape[1]
    y_true = np.asarray(y_true).astype(int)
    # Thresholds compare the scores as given (a threshold chosen on them must select the same
    # images); only log loss sees them renormalised (float32 softmax misses 1.0 by ~1e-7).
    probs = np.asarray(probs, dtype=np.float64)
    if positive_index is not None and n_classes == 2:
        out = binary_metrics((y_true == positive_index).astype(int), probs[:, positive_index],
                             0.5 if threshold is None else threshold)
    else:
        out = multiclass_metrics(y_true, probs, n_classes)
    eps = 1e-7
    clipped = np.clip(probs / probs.sum(axis=1, keepdims=True), eps, 1 - eps)
    out["log_loss"] = float(skm.log_loss(y_true, clipped / clipped.sum(axis=1, keepdims=True), labels=list(range(n_classes))))
    return out


def confusion_table(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    cm = skm.confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    return pd.DataFrame(
        [(classes[i], classes[j], int(cm[i, j])) for i in range(len(classes)) for j in range(len(classes))],
        columns=["true_label", "predicted_label", "count"],
    )


def roc_points(y_true: np.ndarray, scores: np.ndarray, classes: list[str], positive_index: Optional[int]) -> pd.DataFrame:
    """ROC points: one curve for a binary task, one-vs-rest curves for multi-class."""
    rows = []
    targets = [positive_index] if positive_index is not None and len(classes) == 2 else range(len(classes))
    for k in targets:
        y = (np.asarray(y_true) == k).astype(int)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, thr = skm.roc_curve(y, scores[:, k])
        rows.append(pd.DataFrame({"class": classes[k], "fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["class", "fpr", "tpr", "threshold"])


def _ratio(num: int, den: int) -> float:
    return float(num) / float(den) if den else float("nan")


def pr_points(y_true: np.ndarray, scores: np.ndarray, classes: list[str], positive_index: Optional[int]) -> pd.DataFrame:
    """Precision-recall points (one curve, or one-vs-rest curves for multi-class)."""
    rows = []
    targets = [positive_index] if positive_index is not None and len(classes) == 2 else range(len(classes))
    for k in targets:
        y = (np.asarray(y_true) == k).astype(int)
        if len(np.unique(y)) < 2:
            continue
        precision, recall, thr = skm.precision_recall_curve(y, scores[:, k])
        # sklearn gives one more (precision, recall) point than thresholds: the (1, 0) end point.
        rows.append(pd.DataFrame({"class": classes[k], "precision": precision, "recall": recall,
                                  "threshold": np.append(thr, np.nan)}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["class", "precision", "recall", "threshold"])


def brier_score(y_true: np.ndarray, p_pos: np.ndarray) -> float:
    return float(skm.brier_score_loss(np.asarray(y_true).astype(int), np.asarray(p_pos, float)))


BOOTSTRAP_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "roc_auc")


def bootstrap_ci(y_true: np.ndarray, p_pos: np.ndarray, threshold: float, n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Stratified bootstrap confidence intervals (percentile method) for binary metrics.

    Positives and negatives are resampled separately, so every resample keeps the class counts
    (and AUC is always defined). Vectorised: all resamples at once, AUC from ranks
    (Mann-Whitney), so 1,000 x 1,000 takes well under a second.
    """
    from scipy.stats import rankdata

    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, float)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("bootstrap CIs need both classes in the data")
    rng = np.random.default_rng(seed)
    # Columns [0, P) are positives, [P, P+N) negatives, in every resample.
    idx = np.concatenate([rng.choice(pos, (n_resamples, len(pos))), rng.choice(neg, (n_resamples, len(neg)))], 1)
    scores = p[idx]
    n_pos, n_neg = len(pos), len(neg)
    called = scores >= threshold
    tp = called[:, :n_pos].sum(1).astype(float)
    fp = called[:, n_pos:].sum(1).astype(float)
    fn, tn = n_pos - tp, n_neg - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        samples = {
            "accuracy": (tp + tn) / (n_pos + n_neg),
            "sensitivity": tp / n_pos,
            "specificity": tn / n_neg,
            "precision": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
            "roc_auc": (rankdata(scores, axis=1)[:, :n_pos].sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg),
        }
    point = binary_metrics(y, p, threshold)
    tail = (1 - level) / 2 * 100
    rows = []
    for name in BOOTSTRAP_METRICS:
        s = samples[name][np.isfinite(samples[name])]
        low, high = (np.percentile(s, [tail, 100 - tail]) if len(s) else (np.nan, np.nan))
        rows.append({"metric": name, "estimate": point[name], "ci_low": float(low), "ci_high": float(high),
                     "level": level, "n_resamples": n_resamples, "seed": seed})
    return pd.DataFrame(rows)
