"""The decision rule: one place that turns class probabilities into a label (scoring, serving,
evaluation and the model card all call it), and the rule that picks its operating point on
validation scores (training, site calibration, evaluation)."""

from __future__ import annotations

from typing import Optional

import numpy as np


def predict_labels(probs: np.ndarray, classes: list[str], positive_index: Optional[int], threshold: Optional[float]):
    """Binary with a threshold: positive iff p(positive) >= threshold; otherwise argmax."""
    if positive_index is not None and threshold is not None and len(classes) == 2:
        negative_index = 1 - positive_index
        return [classes[positive_index] if p >= threshold else classes[negative_index] for p in probs[:, positive_index]]
    return [classes[int(i)] for i in np.nan_to_num(probs, nan=-1).argmax(axis=1)]


def choose_threshold(y_true: np.ndarray, p_pos: np.ndarray, rule: str, target_sensitivity: float = 0.95) -> float:
    """Operating point on validation scores.

    youden: maximise sensitivity + specificity - 1. A well-separated validation set has a whole
      interval of thresholds with the same best J; we take its middle in logit space (the
      largest margin to both classes) rather than an edge, because new data shifts scores and
      an edge threshold turns the first shift into errors.
    target_sensitivity: the highest threshold whose sensitivity reaches the target.
    argmax: 0.5 (what a plain argmax over two softmax outputs does).
    """
    y_true = np.asarray(y_true).astype(int)
    if rule == "argmax" or len(np.unique(y_true)) < 2:
        return 0.5
    from sklearn import metrics as skm  # here: 0.6 s to import, and the answering paths never fit

    fpr, tpr, thr = skm.roc_curve(y_true, p_pos, drop_intermediate=False)
    thr = np.clip(thr, 0.0, 1.0)  # sklearn's first threshold is +inf
    if rule == "youden":
        j = tpr - fpr
        best_idx = np.flatnonzero(j >= j.max() - 1e-12)
        first, last = int(best_idx[0]), int(best_idx[-1])
        # thresholds in (score below the plateau, thr[first]] all give the best J
        high = float(thr[first])
        low = float(thr[last + 1]) if last + 1 < len(thr) else float(thr[last])
        return float(_expit((_logit(high) + _logit(low)) / 2)) if high > low else high
    if rule == "target_sensitivity":
        reaching = np.flatnonzero(tpr >= target_sensitivity)
        return float(thr[int(reaching[0])])  # tpr rises as the threshold falls: the first is the highest
    raise ValueError(f"unknown threshold rule '{rule}'")


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return float(np.log(p / (1 - p)))


def _expit(z: float) -> float:
    return float(1 / (1 + np.exp(-z)))
