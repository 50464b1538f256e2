"""Classification metrics as pure functions over arrays (scikit-learn underneath).

Scores, never hard labels, feed ROC and PR curves. Binary tasks are evaluated at a decision
threshold on the positive class's probability; multi-class tasks by argmax, one-vs-rest AUC
and macro averages.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
from sklearn import metrics as skm


def choose_threshold(y_true: np.ndarray, p_pos: np.ndarray, rule: str, target_sensitivity: float = 0.95) -> float:
    """Operating point on validation scores.

    youden: maximise sensitivity + specificity - 1.
    target_sensitivity: the highest threshold whose sensitivity reaches the target.
    argmax: 0.5 (what a plain argmax over two softmax outputs does).
    """
    y_true = np.asarray(y_true).astype(int)
    if rule == "argmax" or len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thr = skm.roc_curve(y_true, p_pos)
    thr = np.clip(thr, 0.0, 1.0)  # sklearn's first threshold is +inf
    if rule == "youden":
        best = int(np.argmax(tpr - fpr))
    elif rule == "target_sensitivity":
        reaching = np.flatnonzero(tpr >= target_sensitivity)
        best = int(reaching[0])  # tpr rises as the threshold falls: the first is the highest threshold
    else:
        raise ValueError(f"unknown threshold rule '{rule}'")
    return float(thr[best])


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
    try:
        out["roc_auc"] = float(skm.roc_auc_score(y_true, probs, multi_class="ovr", labels=labels))
    except ValueError:
        out["roc_auc"] = float("nan")
    for k, r in enumerate(skm.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)):
        out[f"recall_{k}"] = float(r)
    return out


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, positive_index: Optional[int], threshold: Optional[float]
) -> dict:
    """Binary metrics when a positive class is set, multi-class ones otherwise; plus log loss."""
    n_classes = probs.shape[1]
    y_true = np.asarray(y_true).astype(int)
    # float32 softmax outputs miss 1.0 by ~1e-7; renormalise in float64 for log loss.
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    if positive_index is not None and n_classes == 2:
        out = binary_metrics((y_true == positive_index).astype(int), probs[:, positive_index],
                             0.5 if threshold is None else threshold)
    else:
        out = multiclass_metrics(y_true, probs, n_classes)
    eps = 1e-7
    clipped = np.clip(probs, eps, 1 - eps)
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
