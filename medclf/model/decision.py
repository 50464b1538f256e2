"""The decision rule: one place that turns class probabilities into a label (scoring, serving,
evaluation and the model card all call it)."""

from __future__ import annotations

from typing import Optional

import numpy as np


def predict_labels(probs: np.ndarray, classes: list[str], positive_index: Optional[int], threshold: Optional[float]):
    """Binary with a threshold: positive iff p(positive) >= threshold; otherwise argmax."""
    if positive_index is not None and threshold is not None and len(classes) == 2:
        negative_index = 1 - positive_index
        return [classes[positive_index] if p >= threshold else classes[negative_index] for p in probs[:, positive_index]]
    return [classes[int(i)] for i in np.nan_to_num(probs, nan=-1).argmax(axis=1)]
