"""Post-hoc calibration: temperature scaling fitted on validation, applied wherever scores are made.

A network trained with class weighting, label smoothing or on a narrow archive gives scores that
rank well but do not mean "probability of disease". Temperature scaling (Guo et al. 2017) divides
the logits by one number T fitted to minimise the validation log loss: the ranking (ROC AUC) and
the argmax are unchanged, the probabilities become honest. One parameter cannot overfit a few
hundred validation images, unlike isotonic regression, and it applies to multi-class models as is.

T is stored in the model artifact (`ModelCard.temperature`); `medclf.model.artifact.class_probabilities`
is the one function that turns logits into probabilities for scoring, Grad-CAM and validation.
How calibrated scores are is measured here too (calibration_table, expected_calibration_error).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

# Search range of log T: T from 0.05 (sharpen 20x) to 20 (flatten 20x). An optimum on a bound is not
# an optimum: the search is widened once (0.0025 to 400), and if it still ends on a bound there is no finite
# best T (validation perfectly separated: the loss falls towards T -> 0; or scores carrying no signal: it
# falls towards T -> infinity), so T = 1 is kept, with a warning, rather than a silent 0.05 or 20.
_LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))
_WIDENED = 2.0  # the widened range is the first one's log range times this
_AT_BOUND = 1e-2  # in log T: closer than this to a bound counts as on it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    status: str  # "fitted", "widened" (first range too narrow) or "fallback" (no finite optimum: T = 1)
    message: str = ""


def softmax_with_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities (N, C) from logits or log-probabilities (N, C): softmax(logits / T)."""
    return np.exp(log_softmax(np.asarray(logits, np.float64) / temperature, axis=1))


def negative_log_likelihood(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    logp = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(y)), np.asarray(y, int)].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 minimising the log loss of softmax(logits / T) against labels `y` (class indices);
    1.0 (with a logged warning) when there is no finite minimiser. See `fit_temperature_checked`."""
    return fit_temperature_checked(logits, y).temperature


def fit_temperature_checked(logits: np.ndarray, y: np.ndarray) -> TemperatureFit:
    """Fit T, detecting an optimum on the search bounds: widen once, else fall back to T = 1 and warn.

    `logits` may equally be log-probabilities: softmax is unchanged by a per-row constant.
    """
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, int)
    if len(y) == 0 or len(np.unique(y)) < 2:
        return TemperatureFit(1.0, "fallback", "one class in the calibration set: nothing to learn a scale from")
    if (logits.argmax(1) == y).all():  # every row right: the loss only falls as T -> 0 (no minimiser)
        return _fallback("validation is perfectly separated: the log loss keeps falling as T -> 0, so any fitted "
                         "T would be overconfident")
    log_t, bound = _search(logits, y, _LOG_T_BOUNDS)
    if bound is None:
        return TemperatureFit(float(np.exp(log_t)), "fitted")
    centre, half = np.mean(_LOG_T_BOUNDS), _WIDENED * (_LOG_T_BOUNDS[1] - _LOG_T_BOUNDS[0]) / 2
    widened = (centre - half, centre + half)
    log_t, bound = _search(logits, y, widened)
    first = f"T {np.exp(_LOG_T_BOUNDS[0]):.3g}-{np.exp(_LOG_T_BOUNDS[1]):.3g}"
    if bound is None:
        fit = TemperatureFit(float(np.exp(log_t)), "widened",
                             f"temperature {np.exp(log_t):.4g} lies outside the usual range ({first}); the search "
                             "was widened to find it")
    else:
        return _fallback("the log loss keeps falling as T -> 0, so any fitted T would be overconfident"
                         if bound == "lower" else
                         "the log loss keeps falling as T grows: the scores carry little or no signal on validation")
    log.warning("calibration: %s", fit.message)
    return fit


def _fallback(why: str) -> TemperatureFit:
    fit = TemperatureFit(1.0, "fallback", f"no finite best temperature ({why}); kept T = 1 (uncalibrated). "
                         "Check the validation split (size, leakage, label quality) before trusting probabilities")
    log.warning("calibration: %s", fit.message)
    return fit


def _search(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float]) -> tuple[float, str | None]:
    """log T minimising the log loss within `bounds`, and which bound it sits on ("lower"/"upper"/None)."""
    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, y, float(np.exp(log_t))),
                             bounds=bounds, method="bounded", options={"xatol": 1e-4})
    x = float(result.x)
    bound = "lower" if x - bounds[0] < _AT_BOUND else "upper" if bounds[1] - x < _AT_BOUND else None
    return x, bound


def calibration_table(y_true: np.ndarray, p_pos: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Reliability diagram data: equal-width probability bins with count, mean score, observed rate."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        inside = which == b
        n = int(inside.sum())
        rows.append({"bin": b, "bin_low": edges[b], "bin_high": edges[b + 1], "count": n,
                     "mean_predicted": float(p[inside].mean()) if n else np.nan,
                     "fraction_positive": float(y[inside].mean()) if n else np.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(y_true: np.ndarray, p_pos: np.ndarray, n_bins: int = 10) -> float:
    """ECE: bin-size-weighted mean |observed rate - mean predicted probability|."""
    table = calibration_table(y_true, p_pos, n_bins)
    used = table[table["count"] > 0]
    return float((used["count"] * (used["fraction_positive"] - used["mean_predicted"]).abs()).sum() / len(y_true))
