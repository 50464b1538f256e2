"""Temperature fitting never ends silently on its search bounds (issue 36, item 5): a bound hit is
detected, the search widened once, and with no finite optimum T = 1 is kept with a warning. No Ray."""

import logging

import numpy as np
import pytest

from medclf.model.calibration import (_LOG_T_BOUNDS, fit_temperature, fit_temperature_checked,
                                      negative_log_likelihood, softmax_with_temperature)


def _labels(logits: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(logits.shape[1], p=p) for p in softmax_with_temperature(logits, 1.0)])


def test_interior_optimum_is_fitted_without_warning(caplog):
    true = np.random.default_rng(1).normal(0, 1.5, (3000, 2))
    with caplog.at_level(logging.WARNING, logger="medclf.model.calibration"):
        fit = fit_temperature_checked(true * 2.0, _labels(true))
    assert fit.status == "fitted" and fit.temperature == pytest.approx(2.0, rel=0.15)
    assert not caplog.records


def test_optimum_beyond_the_first_range_is_found_by_widening(caplog):
    """A model 60x too sure of itself: the best T (~60) lies past the first bound (20)."""
    true = np.random.default_rng(2).normal(0, 1.5, (4000, 2))
    with caplog.at_level(logging.WARNING, logger="medclf.model.calibration"):
        fit = fit_temperature_checked(true * 60.0, _labels(true, 2))
    assert np.exp(_LOG_T_BOUNDS[1]) < fit.temperature
    assert fit.status == "widened" and fit.temperature == pytest.approx(60.0, rel=0.15)
    assert "widened" in caplog.text
    # and better than stopping at the old bound
    y = _labels(true, 2)
    assert negative_log_likelihood(true * 60, y, fit.temperature) < negative_log_likelihood(true * 60, y, 20.0)


def test_perfectly_separated_validation_falls_back_to_one(caplog):
    """The demo's case: validation separated, log loss -> 0 as T -> 0; the old fit returned 0.05."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    gap = np.where(y == 1, 1.0, -1.0) * rng.uniform(0.5, 3.0, 300)
    logits = np.stack([np.zeros(300), gap], 1)
    with caplog.at_level(logging.WARNING, logger="medclf.model.calibration"):
        fit = fit_temperature_checked(logits, y)
    assert fit.status == "fallback" and fit.temperature == 1.0
    assert "perfectly separated" in fit.message and "perfectly separated" in caplog.text
    assert fit_temperature(logits, y) == 1.0


def test_scores_without_signal_fall_back_to_one(caplog):
    """Scores unrelated (here: opposed) to the labels: the loss falls as T grows, no finite T."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    gap = np.where(y == 1, -1.0, 1.0) * rng.uniform(0.5, 3.0, 400)  # confidently wrong
    with caplog.at_level(logging.WARNING, logger="medclf.model.calibration"):
        fit = fit_temperature_checked(np.stack([np.zeros(400), gap], 1), y)
    assert fit.status == "fallback" and fit.temperature == 1.0
    assert "little or no signal" in caplog.text


def test_one_class_is_a_fallback_too():
    fit = fit_temperature_checked(np.zeros((5, 2)), np.zeros(5, int))
    assert (fit.temperature, fit.status) == (1.0, "fallback")
