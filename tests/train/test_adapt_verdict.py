"""The adaptation verdict's rule (medclf.train.adapt_verdict.decide, docs/adaptation.md, version 3), on
per-set AUCs given directly. No Ray, no images."""

from __future__ import annotations

import pytest

from medclf.train.adapt_verdict import decide


def sets(*pairs):
    return [{"shift": f"set {i}", "auc_none": a, "auc_bn": b, "delta": b - a} for i, (a, b) in enumerate(pairs)]


def test_a_gain_makes_it_positive():
    verdict, basis, why = decide(sets((0.90, 0.95), (0.80, 0.82), (0.93, 0.92)))
    assert (verdict, basis) == ("positive", "gain") and "meets" in why


def test_a_set_losing_more_than_0_03_makes_it_negative_even_with_a_mean_gain():
    verdict, basis, _ = decide(sets((0.70, 0.90), (0.90, 0.86)))
    assert (verdict, basis) == ("negative", "no gain")


def test_no_gain_on_unsaturated_validation_is_negative():
    verdict, basis, why = decide(sets((0.95, 0.949), (0.96, 0.9605), (0.97, 0.969)))
    assert (verdict, basis) == ("negative", "no gain") and "fails" in why


def test_saturated_validation_without_harm_is_positive():
    # the 3-epoch pneumonia model's numbers (card of /work/runs_s20/pneu-e3): every set 0.998-0.999
    verdict, basis, why = decide(sets((0.9991, 0.9988), (0.9990, 0.9988), (0.9991, 0.9988), (0.9983, 0.9986),
                                      (0.9991, 0.9991), (0.9992, 0.9977)))
    assert (verdict, basis) == ("positive", "no harm on saturated validation") and "saturated" in why


@pytest.mark.parametrize("after", [(0.999, 0.990), (0.994, 0.994)])  # one set loses 0.009; mean -0.005
def test_saturated_validation_with_harm_is_negative(after):
    verdict, basis, _ = decide(sets((0.999, after[0]), (0.999, after[1])))
    assert (verdict, basis) == ("negative", "harm on saturated validation")


def test_one_unsaturated_set_takes_the_no_harm_clause_away():
    verdict, _, _ = decide(sets((0.999, 0.998), (0.990, 0.989)))  # 0.990 < 0.995: a gain could show, none did
    assert verdict == "negative"


def test_undefined_auc_is_negative():
    assert decide(sets((float("nan"), 0.9)))[0] == "negative"
