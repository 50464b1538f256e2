"""Site adaptation before a scoring run (config `score.adapt`, `score.site_profile`; docs/adaptation.md).

The driver decodes a seeded sample of the run's own images with the scoring path itself
(medclf.imaging.stage: read -> decode -> preprocess), and, per `score.adapt`:
  none  nothing; rows get adaptation_id null.
  bn    fit a site profile (medclf.model.adapt) on the sample, write it to `<output>/_site_profiles/`,
        and the inference actors load it. Refused before any work when the model's stored verdict
        (card `adaptation`) is not positive, unless score.adapt_override.
  auto  score the sample with the unadapted model, compare it with the model's drift reference
        (medclf.monitor.drift.compare), and adapt only when a drift flag trips AND the verdict is
        positive; otherwise exactly `none`.
Labels are never read: the sample is the input files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from medclf import storage
from medclf.config import Config, ConfigError

log = logging.getLogger(__name__)

PROFILES_FOLDER = "_site_profiles"  # '_' prefix: Arrow's dataset discovery skips it inside the predictions


@dataclass
class AdaptDecision:
    mode: str
    adapted: bool
    reason: str
    profile_path: Optional[str] = None
    profile_id: Optional[str] = None
    flags: list = field(default_factory=list)

    def __str__(self) -> str:
        what = f"profile {self.profile_id[:12]} ({self.profile_path})" if self.adapted else "training statistics"
        return f"score.adapt={self.mode}: {what}; {self.reason}"


def verdict_of(card) -> str:
    """positive | negative | absent (an artifact trained before the verdict existed)."""
    return str((card.adaptation or {}).get("verdict") or "absent")


def check_adapt_config(sc, card) -> None:
    """Refuse `bn` (or a given site profile) on a model whose verdict is not positive, before any work;
    on an ensemble always (its members' BatchNorms were never adapted together: not offered)."""
    from medclf.model.ensemble import ENSEMBLE_ARCH

    if (sc.adapt == "bn" or sc.site_profile) and card.arch == ENSEMBLE_ARCH:
        raise ConfigError(f"score.adapt=bn / score.site_profile: label-free adaptation is not offered for an ensemble "
                          f"({card.model_id}), even with score.adapt_override; use score.adapt=none or auto (auto "
                          "never adapts it)")
    if sc.site_profile:
        from medclf.model.site_profile import read_profile

        read_profile(sc.site_profile, card.model_id)  # exists, intact, and this model's
    if (sc.adapt == "bn" or sc.site_profile) and verdict_of(card) != "positive" and not sc.adapt_override:
        verdict = verdict_of(card)
        why = {"absent": "it was trained before adaptation was measured",
               "inconclusive": "its validation is saturated, so it cannot show whether adaptation helps"}.get(
            verdict, "adaptation did not restore its AUC under the acquisition shifts of its validation")
        raise ConfigError(f"score.adapt=bn: model {card.model_id}'s adaptation verdict is {verdict} ({why}); "
                          "set score.adapt_override=true to adapt anyway, or use score.adapt=auto")


def sample_paths(paths: list[str], n: int, seed: int) -> list[str]:
    """A seeded sample of `n` input files (all of them when fewer), in listing order."""
    if len(paths) <= n:
        return list(paths)
    keep = np.sort(np.random.default_rng(seed).choice(len(paths), n, replace=False))
    return [paths[i] for i in keep]


def decode_sample(cfg: Config, card, paths: list[str]) -> dict:
    """The sample's rows as scoring decodes them (one batch dict of medclf.imaging.stage; `pixels` for
    every decoded image), with the run's own decode settings."""
    from medclf.imaging.privacy import uid_key
    from medclf.imaging.stage import _file_rows, _rows_to_batch
    from medclf.model.records import input_gate

    sc, pre = cfg.score, card.preprocess_spec
    rows = []
    for path in paths:
        rows += list(_file_rows(path, pre, None, sc.frames, int(sc.max_file_mb * 1024**2),
                                (sc.uids, uid_key(sc.uid_key)), input_gate(card)))
    rows = rows[: max(sc.adapt_sample, 1) * 4]  # multi-frame files: a bounded number of frames
    return _rows_to_batch(rows, pre.image_size) if rows else {}


def prepare_adaptation(cfg: Config, card, model_path: str, paths: list[str], output: str, run_id: str,
                       source: str = "") -> AdaptDecision:
    """Decide and, where adapting, fit and write the run's site profile (see the module docstring)."""
    from medclf.model.adapt import fit_profile
    from medclf.model.site_profile import read_profile, write_profile
    from medclf.model.artifact import load_artifact

    sc = cfg.score
    if sc.site_profile:
        profile = read_profile(sc.site_profile, card.model_id)
        return AdaptDecision(sc.adapt, True, f"the given site profile ({profile.summary()})", sc.site_profile,
                             profile.profile_id)
    if sc.adapt == "none":
        return AdaptDecision("none", False, "adaptation off")
    if sc.adapt == "auto" and verdict_of(card) != "positive":
        return AdaptDecision("auto", False, f"not adapted: the model's adaptation verdict is {verdict_of(card)}")
    batch = decode_sample(cfg, card, sample_paths(paths, sc.adapt_sample, cfg.run.seed))
    ok = np.array([s is None for s in batch.get("status", [])], bool)
    if not ok.any():
        return AdaptDecision(sc.adapt, False, "not adapted: no image of the sample decoded")
    flags: list = []
    if sc.adapt == "auto":
        flags = sample_drift_flags(cfg, card, model_path, batch, run_id)
        if flags is None:
            return AdaptDecision("auto", False, "not adapted: the model has no drift reference to compare with")
        if not flags:
            return AdaptDecision("auto", False, f"not adapted: the sample ({int(ok.sum())} images) shows no drift "
                                 "against the model's validation reference")
    model, _ = load_artifact(model_path)
    warning = prevalence_warning(model, card, batch["pixels"][ok])  # before fit_profile adapts the model in place
    profile, fit = fit_profile(model, card, batch["pixels"][ok], cfg.run.seed, source=source)
    if not fit.adapted:
        return AdaptDecision(sc.adapt, False, f"not adapted: {fit.note}")
    where = write_profile(profile, storage.join(output, PROFILES_FOLDER))
    log.info("%s; adapted: %s; skipped: %s", profile.summary(), ", ".join(fit.adapted),
             "; ".join(f"{k} ({v})" for k, v in fit.skipped.items()) or "none")
    reason = (f"{len(fit.adapted)} BatchNorm layer(s) re-estimated on {fit.n_images} image(s), "
              f"{len(fit.skipped)} frozen layer(s) kept")
    if sc.adapt == "auto":
        reason = f"drift flagged ({', '.join(flags)}) and the verdict is positive: {reason}"
    if warning:
        log.warning("%s", warning)
        reason = f"{reason}; WARNING: {warning}"
    return AdaptDecision(sc.adapt, True, reason, where, profile.profile_id, flags)


PREVALENCE_GAP = 0.3  # estimated positive share this far from the training split's: say so


def prevalence_warning(model, card, pixels) -> Optional[str]:
    """A warning when the sample's prevalence, estimated without labels (EM over the unadapted model's
    calibrated posteriors), is far from the training split's: statistics re-estimated on it then carry it
    into the answers (docs/adaptation.md: at 25% pneumonia against 80% in training, plain `bn` took
    specificity at the stored threshold from 1.00 to 0.73-0.79). None when close, or when the card lacks
    the class shares the estimate needs (a multi-class card, an old one)."""
    from medclf.model.adapt import sample_posteriors
    from medclf.model.prior_shift import em_prior

    if card.positive_index is None:
        return None
    try:
        probs, pi_cal, pi_train = sample_posteriors(model, card, pixels)
    except ValueError:
        return None
    pos = card.positive_index
    estimate, training = float(em_prior(probs, pi_cal).prior[pos]), float(pi_train[pos])
    if abs(estimate - training) < PREVALENCE_GAP:
        return None
    negative = card.classes[1 - pos]
    effect = (f"{negative} films then score higher (more false positives)" if estimate < training else
              f"{card.positive_class} films then score lower (more missed positives)")
    return (f"the sample's estimated {card.positive_class} share, {estimate:.2f}, is far from the training split's "
            f"{training:.2f}; BatchNorm statistics re-estimated on it carry that share into the answers: {effect}. "
            "Check the positive rate, or score with score.adapt=none")


def sample_drift_flags(cfg: Config, card, model_path: str, batch: dict, run_id: str) -> Optional[list[str]]:
    """Names of the drift statistics that flag on the sample scored with the unadapted model (the rows
    scoring would write), or None without a drift reference."""
    from medclf.monitor.drift import compare
    from medclf.score.predictor import Predictor

    # float32 on the driver's CPU whatever score.precision says: the reference was measured in float32
    predictor = Predictor(model_path, run_id, threads=max(1, int(cfg.score.torch_threads or 1)),
                          ood_action=cfg.ood.action)
    if predictor.reference is None:
        return None
    rows = predictor(batch).to_pandas()
    table = compare(rows, predictor.reference, predictor.domain, card, cfg.drift)
    flagged = list(table.loc[table["flag"].astype(bool), "statistic"])
    log.info("adaptation sample drift: %s", ", ".join(f"{r.statistic} p_adj={r.p_adjusted:.3g}" + (" FLAG" if r.flag
                                                      else "") for r in table.itertuples()))
    return flagged
