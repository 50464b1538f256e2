"""Post-hoc calibration: temperature scaling fitted on validation, applied wherever scores are made.

A network trained with class weighting, label smoothing or on a narrow archive gives scores that
rank well but do not mean "probability of disease". Temperature scaling (Guo et al. 2017) divides
the logits by one number T fitted to minimise the validation log loss: the ranking (ROC AUC) and
the argmax are unchanged, the probabilities become honest. One parameter cannot overfit a few
hundred validation images, unlike isotonic regression, and it applies to multi-class models as is.

T is stored in the model artifact (`ModelCard.temperature`); `medclf.model.artifact.class_probabilities`
is the one function that turns logits into probabilities for scoring, Grad-CAM and validation.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

# Search range of log T: T from 0.05 (sharpen 20x) to 20 (flatten 20x).
_LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))


def softmax_with_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities (N, C) from logits or log-probabilities (N, C): softmax(logits / T)."""
    return np.exp(log_softmax(np.asarray(logits, np.float64) / temperature, axis=1))


def negative_log_likelihood(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    logp = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(y)), np.asarray(y, int)].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 minimising the log loss of softmax(logits / T) against labels `y` (class indices).

    `logits` may equally be log-probabilities: softmax is unchanged by a per-row constant.
    """
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, int)
    if len(y) == 0 or len(np.unique(y)) < 2:
        return 1.0  # nothing to learn a scale from
    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, y, float(np.exp(log_t))),
                             bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))
