"""The HTML reports in a real browser (issue 36, item 8): headless Chromium loads summary.html and
drift.html at a 1280 x 800 viewport and measures them. Every image must load, nothing may be wider than
the page, and the first screen must say what was evaluated (model, data, n) and the headline figures
with their 95% CIs. The first-screen screenshots are kept under pytest's tmp dir (path printed)."""
import os
import re

import pytest

from tests.report.browser import VIEWPORT, chromium, inspect
from tests.monitor.test_drift import drift_model, pool  # noqa: F401 (fixtures)
from tests.report.test_evaluate import CLASSES, scored  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(chromium() is None, reason="no Chromium binary on PATH (apt-get install chromium, "
                                                         "or `make system-deps`)")
CI = re.compile(r"\d\.\d{3} \(95% CI \d\.\d{3}[-–]\d\.\d{3}\)")


def check_page(page: str, screenshot: str, must_say: list[str]) -> dict:
    found = inspect(page, screenshot)
    print(f"screenshot of {os.path.basename(page)}: {screenshot}")
    assert found["images"], f"{page}: no <img> at all"
    broken = [i["src"] for i in found["images"] if not (i["complete"] and i["naturalWidth"] > 0)]
    assert not broken, f"{page}: images that did not load: {broken}"
    assert found["scrollWidth"] <= VIEWPORT[0], f"{page}: {found['scrollWidth']} px wide; too wide: {found['wider']}"
    first = found["firstScreen"]
    for text in must_say:
        assert text in first, f"{page}: the first screen does not say {text!r}: {first[:600]}"
    assert CI.search(first), f"{page}: no headline figure with its 95% CI on the first screen: {first[:600]}"
    from PIL import Image

    assert Image.open(screenshot).size == VIEWPORT
    return found


@pytest.mark.timeout(300)
def test_evaluation_report_in_a_browser(scored, tmp_path):
    from medclf.report.evaluate import run_evaluation

    pred, labels, y, p = scored
    out = str(tmp_path / "report")
    run_evaluation(pred, out, CLASSES, "POSITIVE", labels, bootstrap_resamples=200)
    found = check_page(os.path.join(out, "summary.html"), str(tmp_path / "summary_first_screen.png"),
                       ["small_cnn-abc", pred, f"{len(y)}", "ROC AUC", "sensitivity", "specificity"])
    assert len(found["images"]) == 7


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_drift_report_in_a_browser(drift_model, pool, tmp_path):
    """A real drift report: the shared tiny model with a drift reference (tests/monitor/test_drift.py's
    fixtures, which train it with Ray), two nights of scored phantoms, the second brightened."""
    from medclf.config import DriftConfig
    from medclf.data.phantoms import write_shifted
    from medclf.model.artifact import load_card
    from medclf.monitor.drift import run_drift
    from tests.monitor.test_drift import score_table, write_night

    predictions = str(tmp_path / "predictions")
    base = pool.path.tolist()
    write_night(predictions, score_table(drift_model, base[:200]), "2026-11-01", "night0")
    shifted = write_shifted(base[200:400], str(tmp_path / "gamma"), gamma=0.6)
    write_night(predictions, score_table(drift_model, shifted), "2026-11-02", "night1")
    out = str(tmp_path / "drift")
    run_drift(DriftConfig(), drift_model, predictions, out, run_id="night1")
    found = check_page(os.path.join(out, "drift.html"), str(tmp_path / "drift_first_screen.png"),
                       [load_card(drift_model).model_id, predictions, "n = 200 rows", "positive rate",
                        "DRIFT: "])
    assert len(found["images"]) == 2  # histograms and the two-night time series
