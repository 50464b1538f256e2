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


def test_saturated_validation_without_harm_is_inconclusive():
    # the 3-epoch pneumonia Lite0's numbers (every set 0.998-0.999); the scratch ResNet18 looks the same,
    # and one label-free pass helped the first and hurt the second on the maintainers' held-back test
    verdict, basis, why = decide(sets((0.9991, 0.9988), (0.9990, 0.9988), (0.9991, 0.9988), (0.9983, 0.9986),
                                      (0.9991, 0.9991), (0.9992, 0.9977)))
    assert (verdict, basis) == ("inconclusive", "no harm on saturated validation") and "saturated" in why


def test_a_tiny_mean_gain_on_saturated_validation_is_not_positive():
    # the 6-epoch pneumonia default of session 24: mean +0.0001, worst -0.0002, every set 0.999. Before the
    # saturation clause came first, this read as a gain and made the shipped default "positive".
    verdict, basis, _ = decide(sets((0.99926, 0.99942), (0.99907, 0.99932), (0.99935, 0.99949), (0.99917, 0.99942),
                                    (0.99935, 0.99949), (0.99913, 0.99891)))
    assert (verdict, basis) == ("inconclusive", "no harm on saturated validation")


@pytest.mark.parametrize("after", [(0.999, 0.990), (0.994, 0.994)])  # one set loses 0.009; mean -0.005
def test_saturated_validation_with_harm_is_negative(after):
    verdict, basis, _ = decide(sets((0.999, after[0]), (0.999, after[1])))
    assert (verdict, basis) == ("negative", "harm on saturated validation")


def test_one_unsaturated_set_takes_the_no_harm_clause_away():
    verdict, _, _ = decide(sets((0.999, 0.998), (0.990, 0.989)))  # 0.990 < 0.995: a gain could show, none did
    assert verdict == "negative"


def test_undefined_auc_is_negative():
    assert decide(sets((float("nan"), 0.9)))[0] == "negative"


def test_scoring_treats_an_inconclusive_verdict_as_not_positive(tmp_path):
    """auto keeps the training statistics (decided before any image is read); bn needs the override and
    says why."""
    from medclf.config import ConfigError, load_config
    from medclf.model.artifact import ModelCard
    from medclf.score.adaptation import check_adapt_config, prepare_adaptation
    from tests.conftest import TINY

    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], preprocess={}, positive_class="POSITIVE",
                     threshold=0.5, adaptation={"verdict": "inconclusive", "basis": "no harm on saturated validation"})
    auto = load_config(None, TINY + ["score.adapt=auto"])
    decision = prepare_adaptation(auto, card, str(tmp_path / "no_model"), ["never-read.png"], str(tmp_path), "r")
    assert not decision.adapted and "verdict is inconclusive" in decision.reason
    with pytest.raises(ConfigError, match="inconclusive.*saturated.*adapt_override"):
        check_adapt_config(load_config(None, TINY + ["score.adapt=bn"]).score, card)
    check_adapt_config(load_config(None, TINY + ["score.adapt=bn", "score.adapt_override=true"]).score, card)
