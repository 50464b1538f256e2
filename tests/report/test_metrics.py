import numpy as np
import pytest

from medclf.report.metrics import binary_metrics, classification_metrics, confusion_table
from medclf.model.decision import choose_threshold


def test_binary_metrics_against_hand_count():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7])
    m = binary_metrics(y, p, 0.5)
    # At 0.5: TP=3 (0.9,0.8,0.7), FN=1 (0.3), FP=1 (0.6), TN=3.
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 3)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4) and m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(3 / 4) and m["npv"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.75)
    # ROC AUC by pair counting: of 16 (pos, neg) pairs, the positive scores higher in 14.
    assert m["roc_auc"] == pytest.approx(14 / 16)


def test_threshold_rules():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.55, 0.8, 0.9])
    assert choose_threshold(y, p, "argmax") == 0.5
    t = choose_threshold(y, p, "youden")
    m = binary_metrics(y, p, t)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(2 / 3)
    t95 = choose_threshold(y, p, "target_sensitivity", 1.0)
    assert t95 == pytest.approx(0.55) and binary_metrics(y, p, t95)["sensitivity"] == 1.0


def test_youden_takes_the_middle_of_a_separating_gap():
    # Every threshold in (0.2, 0.8] separates the classes; the rule returns the logit midpoint
    # (0.5 here), not an edge that the first shift in scores would cross.
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.8, 0.9])
    assert choose_threshold(y, p, "youden") == pytest.approx(0.5)
    p = np.array([0.01, 0.02, 0.5, 0.9])  # gap (0.02, 0.5]: logit midpoint ~0.125
    t = choose_threshold(y, p, "youden")
    assert 0.02 < t < 0.5 and t == pytest.approx(1 / (1 + np.sqrt(49)), rel=1e-6)


def test_multiclass_and_confusion():
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.2, 0.2]])
    m = classification_metrics(y, probs, None, None)
    assert m["accuracy"] == pytest.approx(0.75) and m["recall_2"] == pytest.approx(0.5)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.7, 0.7, 0.2])), rel=1e-6)
    cm = confusion_table(y, probs.argmax(1), ["a", "b", "c"])
    assert cm.set_index(["true_label", "predicted_label"])["count"][("c", "a")] == 1 and cm["count"].sum() == 4


def test_calibration_brier_and_ece_by_hand():
    from medclf.report.metrics import brier_score
    from medclf.model.calibration import calibration_table, expected_calibration_error

    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.85, 0.95, 0.95])
    assert brier_score(y, p) == pytest.approx(np.mean((p - y) ** 2))
    table = calibration_table(y, p, n_bins=2)  # bins [0, .5), [.5, 1]
    assert list(table["count"]) == [2, 3]
    assert table["mean_predicted"].tolist() == pytest.approx([0.1, (0.85 + 0.95 + 0.95) / 3])
    assert table["fraction_positive"].tolist() == pytest.approx([0.5, 2 / 3])
    # ECE = 2/5 * |0.5 - 0.1| + 3/5 * |2/3 - 0.91667|
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.4 * 0.4 + 0.6 * abs(2 / 3 - 2.75 / 3))


def test_bootstrap_ci_contains_estimate_is_seeded_and_matches_sklearn_auc():
    from medclf.report.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.3).astype(int)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, 1000), 0, 1)
    ci = bootstrap_ci(y, p, 0.5, n_resamples=500, seed=3).set_index("metric")
    assert (ci.ci_low <= ci.estimate).all() and (ci.estimate <= ci.ci_high).all()
    assert (ci.ci_high - ci.ci_low).between(0.005, 0.2).all()  # a real interval, not a point or [0, 1]
    assert ci.equals(bootstrap_ci(y, p, 0.5, n_resamples=500, seed=3).set_index("metric"))
    # With one "resample" equal to the data itself, the rank AUC is sklearn's AUC.
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    order = np.concatenate([np.flatnonzero(y == 1), np.flatnonzero(y == 0)])
    ranks = rankdata(p[order])
    n_pos = int(y.sum())
    rank_auc = (ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos))
    assert rank_auc == pytest.approx(roc_auc_score(y, p))
    assert ci.loc["roc_auc", "estimate"] == pytest.approx(roc_auc_score(y, p))


def test_pr_points():
    from medclf.report.metrics import pr_points

    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    pr = pr_points(y, probs, ["a", "b"], 1)
    assert set(pr["class"]) == {"b"} and pr.recall.max() == 1.0 and pr.precision.iloc[-1] == 1.0
