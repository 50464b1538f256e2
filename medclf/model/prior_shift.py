"""Label-free class-prior re-estimation (Saerens, Latinne & Decaestecker 2002, Neural Computation 14).

A new archive may hold another share of positives than the data the model was calibrated on. If
only the prior changed (p(x|y) the same), calibrated posteriors p(y|x) can be re-weighted to the new
prior, and that prior can be found without labels by EM:
    E: p_s(y|x) ∝ p(y|x) * pi_s(y) / pi_0(y)        M: pi_{s+1}(y) = mean over images of p_s(y|x)
from pi_0 (the calibration set's prior) until the prior moves by less than `tol`.

It needs CALIBRATED posteriors (the card's temperature, or a site calibration) and pi_0 = the class
shares of the films that calibration was fitted on; EM also returns the adjusted posteriors.

The threshold moves with it: the stored threshold t is compared against Bayes-adjusted posteriors,
which for a binary task is the same as comparing the original posterior with
    t' = sigmoid(logit(t) - log(pi_new(pos)/pi_0(pos)) + log(pi_new(neg)/pi_0(neg))).
Caveat: a rule chosen for a sensitivity target is not a posterior rule; at a fixed score threshold a
pure prior shift leaves sensitivity unchanged, so moving it trades sensitivity for specificity as
the prevalence falls (and the reverse). The benchmark measures both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PriorEstimate:
    prior: np.ndarray          # the new archive's estimated class shares
    train_prior: np.ndarray    # pi_0
    posteriors: np.ndarray     # p(y|x) re-weighted to `prior`
    iterations: int
    converged: bool


def em_prior(probs: np.ndarray, train_prior, tol: float = 1e-6, max_iter: int = 1000) -> PriorEstimate:
    """Saerens et al.'s EM over calibrated posteriors `probs` (N, C) made under `train_prior` (C,)."""
    probs = np.asarray(probs, np.float64)
    pi0 = np.asarray(train_prior, np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(pi0):
        raise ValueError(f"probs must be (N, {len(pi0)}), got {probs.shape}")
    if not (np.all(pi0 > 0) and abs(pi0.sum() - 1) < 1e-6):
        raise ValueError(f"train_prior must be positive shares summing to 1, got {pi0.tolist()}")
    probs = probs[np.isfinite(probs).all(axis=1)]
    if len(probs) == 0:
        raise ValueError("no finite posteriors to estimate a prior from")
    pi = pi0.copy()
    for it in range(1, max_iter + 1):
        adjusted = reweight(probs, pi0, pi)
        new = adjusted.mean(axis=0)
        if np.abs(new - pi).max() < tol:
            return PriorEstimate(new, pi0, reweight(probs, pi0, new), it, True)
        pi = new
    return PriorEstimate(pi, pi0, reweight(probs, pi0, pi), max_iter, False)


def reweight(probs: np.ndarray, train_prior, new_prior) -> np.ndarray:
    """Posteriors made under `train_prior`, Bayes-adjusted to `new_prior` (rows sum to 1)."""
    w = np.asarray(probs, np.float64) * (np.asarray(new_prior, np.float64) / np.asarray(train_prior, np.float64))
    return w / w.sum(axis=1, keepdims=True)


def moved_threshold(threshold: float, positive_index: int, train_prior, new_prior) -> float:
    """The threshold on the ORIGINAL posterior equivalent to `threshold` on the re-weighted one (binary)."""
    t = min(max(float(threshold), 1e-12), 1 - 1e-12)
    neg = 1 - positive_index
    shift = (np.log(new_prior[positive_index] / train_prior[positive_index])
             - np.log(new_prior[neg] / train_prior[neg]))
    z = np.log(t / (1 - t)) - shift
    return float(1 / (1 + np.exp(-z)))


def calibration_prior(card, site_calibration=None) -> np.ndarray:
    """pi_0: the class shares of the films the probabilities were calibrated on: a site calibration's
    own sample, else the validation part the card's temperature was fitted on (binary cards record
    its confusion counts)."""
    if site_calibration is not None:
        counts = site_calibration.fitted_on.get("per_class", {})
        shares = np.array([counts.get(c, 0) for c in card.classes], float)
        if shares.sum() > 0 and (shares > 0).all():
            return shares / shares.sum()
    v = (card.metrics or {}).get("validation", {})
    if card.positive_index is not None and all(k in v for k in ("tp", "fn", "tn", "fp")):
        pos = v["tp"] + v["fn"]
        neg = v["tn"] + v["fp"]
        shares = np.zeros(len(card.classes))
        shares[card.positive_index], shares[1 - card.positive_index] = pos, neg
        return shares / shares.sum()
    raise ValueError(f"model {card.model_id}: its card does not record the class shares its calibration was fitted "
                     "on; pass them (--train-prior)")


def training_prior(card) -> np.ndarray:
    """The class shares of the model's training split (card provenance): the mix its BatchNorm running
    statistics were fitted on."""
    counts = ((card.provenance or {}).get("training_data", {}).get("images", {}) or {}).get("train", {})
    shares = np.array([counts.get(c, 0) for c in card.classes], float)
    if shares.sum() <= 0 or not (shares > 0).all():
        raise ValueError(f"model {card.model_id}: its card does not record the class counts of its training split")
    return shares / shares.sum()


def prevalence_weights(probs: np.ndarray, train_prior, target_prior) -> tuple[np.ndarray, PriorEstimate]:
    """Per-image importance weights that make a sample's class mix look like `target_prior`, without labels.

    The sample's own prior is found by EM (em_prior, from calibrated `probs` made under `train_prior`);
    with q_i its EM-adjusted posteriors, w_i = sum_c q_i(c) * target(c) / prior(c), the density ratio
    p_target(x) / p_sample(x) when only the prior differs. Mean 1."""
    probs = np.asarray(probs, np.float64)
    if not np.isfinite(probs).all():
        raise ValueError("prevalence weights need a finite posterior for every image")
    est = em_prior(probs, train_prior)
    w = (est.posteriors * (np.asarray(target_prior, np.float64) / est.prior)).sum(axis=1)
    return w / w.mean(), est
