"""Few-shot site calibration and EM prior re-estimation: pure functions on synthetic logits (no Ray).

The phantom / real-model checks (shifted archive, scoring with a calibration file) are in
tests/model/test_site_calibration_phantoms.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from medclf.model import prior_shift, site_calibration, site_fit
from medclf.model.artifact import ModelCard
from medclf.model.site_calibration import SiteCalibrationError
from medclf.model.calibration import expected_calibration_error

CLASSES = ["NORMAL", "POSITIVE"]


def card(threshold=0.5, rule="youden", temperature=1.0, **train):
    return ModelCard(arch="small_cnn", classes=CLASSES, preprocess={}, positive_class="POSITIVE", threshold=threshold,
                     threshold_rule=rule, temperature=temperature, model_id="small_cnn-0123456789ab",
                     config={"train": {"threshold": rule, **train}})


def synthetic(n, prior, scale=1.0, shift=0.0, seed=0):
    """Logits whose exact posterior under prior 0.5 is sigmoid(d): d ~ N(+-1, 1.4) scaled by `scale`
    (what an over-confident model does) plus `shift` (a site that moves every score)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prior).astype(int)
    mu = np.where(y == 1, 1.0, -1.0)
    x = rng.normal(mu, np.sqrt(1.4))
    d = 2 * x / 1.4  # log-likelihood ratio of the two Gaussians = exact log-odds under prior 0.5
    d = d * scale + shift
    return np.stack([-d / 2, d / 2], 1), y


def test_check_sample_refuses_one_class_and_too_few_before_any_work():
    with pytest.raises(SiteCalibrationError, match="only class.*POSITIVE"):
        site_fit.check_sample(["POSITIVE"] * 50, CLASSES, "site.csv")
    with pytest.raises(SiteCalibrationError, match="k=12 .*too few.*at least 20"):
        site_fit.check_sample(["POSITIVE"] * 6 + ["NORMAL"] * 6, CLASSES, "site.csv")
    with pytest.raises(SiteCalibrationError, match=r"too few films of class\(es\) \{'NORMAL': 3\}"):
        site_fit.check_sample(["POSITIVE"] * 40 + ["NORMAL"] * 3, CLASSES, "site.csv")
    with pytest.raises(SiteCalibrationError, match="not the model's classes"):
        site_fit.check_sample(["POSITIVE"] * 20 + ["CAT"] * 20, CLASSES, "site.csv")
    assert site_fit.check_sample(["POSITIVE"] * 15 + ["NORMAL"] * 5, CLASSES, "s") == {"NORMAL": 5, "POSITIVE": 15}


def test_fit_recovers_temperature_and_improves_ece_on_the_rest():
    logits, y = synthetic(2000, 0.5, scale=4.0, seed=1)  # over-confident by 4x
    fit_logits, fit_y, rest_logits, rest_y = logits[:120], y[:120], logits[120:], y[120:]
    cal = site_fit.fit(fit_logits, fit_y, card(), map_choice="temperature", n_resamples=200)
    assert 2.5 < cal.temperature < 6.0
    before = expected_calibration_error(rest_y, np.exp(rest_logits[:, 1]) / np.exp(rest_logits).sum(1))
    after = expected_calibration_error(rest_y, cal.probabilities(rest_logits)[:, 1])
    assert before > 0.1 and after < 0.05 and after < before / 3, (before, after)
    assert cal.fitted_on["k"] == 120 and sum(cal.fitted_on["per_class"].values()) == 120
    assert cal.threshold_rule.startswith("youden on k=120 site films")
    oob = cal.report["out_of_bag"]
    assert oob["sensitivity_ci"][0] < oob["sensitivity"] < oob["sensitivity_ci"][1]
    assert 0.6 < oob["specificity"] < 0.95


def test_model_rule_target_sensitivity_is_used_and_named():
    logits, y = synthetic(400, 0.5, seed=2)
    cal = site_fit.fit(logits, y, card(rule="target_sensitivity", target_sensitivity=0.9), n_resamples=100)
    assert cal.threshold_rule.startswith("target_sensitivity 0.9 on k=400")
    p = cal.probabilities(logits)[:, 1]
    assert (p[y == 1] >= cal.threshold).mean() >= 0.9
    keep = site_fit.fit(logits, y, card(threshold=0.3), rule="keep", n_resamples=50)
    assert keep.threshold == 0.3 and "kept from the model" in keep.threshold_rule


def test_platt_only_where_it_measurably_helps():
    logits, y = synthetic(300, 0.5, scale=1.0, shift=3.0, seed=3)  # every score moved up: a bias, not a scale
    auto = site_fit.fit(logits, y, card(), n_resamples=50)
    comp = auto.report["map_comparison"]
    assert comp["cv_gain_platt"] > 2 * comp["cv_gain_se"] and auto.map == "platt"
    assert auto.bias[1] == pytest.approx(-3.0, abs=0.6)
    logits, y = synthetic(300, 0.5, scale=3.0, seed=4)  # a pure scale: one temperature is enough
    plain = site_fit.fit(logits, y, card(), n_resamples=50)
    assert plain.map == "temperature" and plain.bias == [0.0, 0.0]


def test_file_round_trip_id_and_refusals(tmp_path):
    logits, y = synthetic(100, 0.5, scale=2.0, seed=5)
    cal = site_fit.fit(logits, y, card(), n_resamples=50)
    path = str(tmp_path / "site_calibration.json")
    site_calibration.save(cal, path)
    back = site_calibration.load(path, card())
    assert back.calibration_id == cal.calibration_id and back.calibration_id.startswith("sitecal-")
    np.testing.assert_allclose(back.probabilities(logits), cal.probabilities(logits))
    other = site_fit.fit(logits[:80], y[:80], card(), n_resamples=50)
    assert other.calibration_id != cal.calibration_id  # a changed calibration changes the id
    raw = json.loads(open(path).read())
    raw["threshold"] = 0.01
    open(path, "w").write(json.dumps(raw))
    with pytest.raises(SiteCalibrationError, match="does not match its content"):
        site_calibration.load(path)
    site_calibration.save(cal, path)
    stranger = card()
    stranger.model_id = "small_cnn-ffffffffffff"
    with pytest.raises(SiteCalibrationError, match="fitted for model small_cnn-0123456789ab"):
        site_calibration.load(path, stranger)
    with pytest.raises(SiteCalibrationError, match="not a site calibration file"):
        (tmp_path / "x.json").write_text("{}")
        site_calibration.load(str(tmp_path / "x.json"))


@pytest.mark.parametrize("true_prior", [0.2, 0.5, 0.8])
def test_em_recovers_a_known_prior(true_prior):
    """Posteriors exact under prior 0.5 (the calibration set); the new archive has `true_prior`."""
    logits, y = synthetic(6000, true_prior, seed=int(true_prior * 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    naive = probs[:, 1].mean()
    est = prior_shift.em_prior(probs, [0.5, 0.5])
    assert est.converged
    assert abs(est.prior[1] - y.mean()) < 0.03  # within 3 points of the sample's real share
    if true_prior != 0.5:
        assert abs(est.prior[1] - y.mean()) < abs(naive - y.mean())  # better than averaging the posteriors
    # the re-weighted posteriors are calibrated for the new prior
    assert expected_calibration_error(y, est.posteriors[:, 1]) < 0.03


def test_moved_threshold_equals_comparing_adjusted_posteriors():
    rng = np.random.default_rng(0)
    p = rng.random((500, 1))
    probs = np.hstack([1 - p, p])
    pi0, pi1 = np.array([0.3, 0.7]), np.array([0.6, 0.4])
    moved = prior_shift.moved_threshold(0.8, 1, pi0, pi1)
    adjusted = prior_shift.reweight(probs, pi0, pi1)[:, 1]
    assert moved > 0.8  # fewer positives in the new archive: the bar on the old score rises
    np.testing.assert_array_equal(adjusted >= 0.8, probs[:, 1] >= moved)


def test_calibration_prior_from_card_and_site_calibration():
    c = card()
    c.metrics = {"validation": {"tp": 30, "fn": 10, "tn": 50, "fp": 10}}
    np.testing.assert_allclose(prior_shift.calibration_prior(c), [0.6, 0.4])
    logits, y = synthetic(100, 0.3, seed=9)
    cal = site_fit.fit(logits, y, c, n_resamples=20)
    np.testing.assert_allclose(prior_shift.calibration_prior(c, cal)[1], y.mean())
    with pytest.raises(ValueError, match="--train-prior"):
        prior_shift.calibration_prior(card())
