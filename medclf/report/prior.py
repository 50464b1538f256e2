"""`medclf prior`: the EM prior estimate (medclf.model.prior_shift) over a predictions folder's rows."""

from __future__ import annotations

from typing import Optional

import numpy as np

from medclf.data.predictions import prob_column, read_predictions
from medclf.model.prior_shift import calibration_prior, em_prior, moved_threshold


def prior_report(predictions: str, card, site_calibration=None, scoring_run: Optional[str] = None,
                 train_prior: Optional[list] = None) -> dict:
    """The new archive's estimated class shares from the `ok` rows of `card`'s model (one scoring run
    with `scoring_run`; only rows scored with `site_calibration` when one is given), and the moved
    threshold (binary)."""
    from medclf.model.site_calibration import SiteCalibrationError

    df = read_predictions(predictions)
    rows = (df["model_id"] == card.model_id) & (df["status"] == "ok")
    if scoring_run:
        rows &= df["run_id"] == scoring_run
    if "calibration_id" in df.columns:
        wanted = site_calibration.calibration_id if site_calibration is not None else None
        rows &= df["calibration_id"].isna() if wanted is None else df["calibration_id"] == wanted
    df = df[rows]
    if df.empty:
        raise SiteCalibrationError(f"{predictions}: no scored rows of model {card.model_id}"
                                   + (f" in run {scoring_run}" if scoring_run else "")
                                   + (f" with calibration {site_calibration.calibration_id}" if site_calibration else
                                      " without a site calibration"))
    probs = df[[prob_column(c) for c in card.classes]].to_numpy(np.float64)
    pi0 = np.asarray(train_prior, float) if train_prior else calibration_prior(card, site_calibration)
    if len(pi0) != len(card.classes):
        raise SiteCalibrationError(f"--train-prior needs {len(card.classes)} shares ({card.classes}), got {len(pi0)}")
    pi0 = pi0 / pi0.sum()
    est = em_prior(probs, pi0)
    report = {"predictions": predictions, "model_id": card.model_id, "scoring_run": scoring_run,
              "calibration_id": site_calibration.calibration_id if site_calibration else None, "n": int(len(probs)),
              "method": "EM (Saerens, Latinne & Decaestecker 2002) over calibrated probabilities",
              "train_prior": dict(zip(card.classes, pi0.tolist())),
              "estimated_prior": dict(zip(card.classes, est.prior.tolist())),
              "iterations": est.iterations, "converged": est.converged}
    threshold = site_calibration.threshold if site_calibration is not None else card.threshold
    if card.positive_index is not None and threshold is not None and len(card.classes) == 2:
        moved = moved_threshold(threshold, card.positive_index, pi0, est.prior)
        p_pos = probs[:, card.positive_index]
        report.update(threshold=threshold, moved_threshold=moved,
                      positive_rate_at_threshold=float((p_pos >= threshold).mean()),
                      positive_rate_at_moved_threshold=float((p_pos >= moved).mean()),
                      threshold_rule="the stored threshold compared against Bayes-adjusted posteriors "
                                     "(equivalently moved_threshold on the scored probabilities)")
    return report
