import numpy as np
import pytest

from medclf.metrics import binary_metrics, choose_threshold, classification_metrics, confusion_table


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


def test_multiclass_and_confusion():
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.2, 0.2]])
    m = classification_metrics(y, probs, None, None)
    assert m["accuracy"] == pytest.approx(0.75) and m["recall_2"] == pytest.approx(0.5)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.7, 0.7, 0.2])), rel=1e-6)
    cm = confusion_table(y, probs.argmax(1), ["a", "b", "c"])
    assert cm.set_index(["true_label", "predicted_label"])["count"][("c", "a")] == 1 and cm["count"].sum() == 4
