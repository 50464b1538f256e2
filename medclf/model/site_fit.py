"""Few-shot site calibration: fit a site's temperature (or Platt map) and threshold on k labelled films.

`medclf calibrate --model M --labelled FOLDER|MANIFEST --out FILE`:
  1. the labelled sample is listed and counted, and refused before any image is read when k is too
     small or a class is missing or too rare (`check_sample`);
  2. every film goes through the scoring path (decode -> preprocess -> the artifact's model) to its
     RAW logits; a film that cannot be decoded is counted and left out, and the counts are checked again;
  3. `fit` re-fits the temperature on those logits (Guo et al. 2017; one parameter), and a Platt map
     (scale + bias on the positive class's logit) only where its cross-validated log loss on the same
     films is measurably lower (by more than 2 standard errors of the per-film difference);
  4. the threshold is chosen by a named rule (by default the model's own, e.g. target_sensitivity
     0.95) on the newly calibrated probabilities;
  5. the report gives k, the per-class counts, ECE / log loss before and after (in sample), and the
     95% CI of sensitivity and specificity that k allows: out-of-bag bootstrap, the threshold re-chosen
     on each resample and judged on the films that resample left out.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax

from medclf.model.calibration import expected_calibration_error, fit_temperature
from medclf.model.site_calibration import SiteCalibration, SiteCalibrationError, finish
from medclf.model.decision import choose_threshold

log = logging.getLogger(__name__)

# Fewer films than this and one film moves the temperature and the threshold by more than the
# calibration could gain; fewer of a class than MIN_PER_CLASS and sensitivity or specificity is
# known to no better than +-20 points (and the bootstrap CI is undefined).
MIN_FILMS = 20
MIN_PER_CLASS = 5
THRESHOLD_RULES = ("model", "youden", "target_sensitivity", "argmax", "keep")
MAP_CHOICES = ("auto", "temperature", "platt")


def check_sample(labels: list, classes: list, source: str, min_films: int = MIN_FILMS,
                 min_per_class: int = MIN_PER_CLASS) -> dict:
    """Per-class counts of a labelled sample; refuses (SiteCalibrationError, saying why) a sample
    that cannot be fitted: unknown labels, fewer than `min_films` films, a class with fewer than
    `min_per_class` (a sample holding one class cannot tell a threshold or a scale)."""
    counts = {c: 0 for c in classes}
    unknown = sorted({str(lab) for lab in labels if lab not in counts})
    if unknown:
        raise SiteCalibrationError(f"{source}: labels {unknown} are not the model's classes {classes}")
    for lab in labels:
        counts[lab] += 1
    k = len(labels)
    present = [c for c in classes if counts[c]]
    if len(present) < 2:
        raise SiteCalibrationError(
            f"{source}: the sample holds only class {present or '(none)'} ({k} film(s)); calibration needs films of "
            f"every class ({classes}): a temperature and a threshold are fitted on how the classes separate")
    if k < min_films:
        raise SiteCalibrationError(
            f"{source}: k={k} labelled films is too few to calibrate (at least {min_films}): with fewer, one film "
            "moves the temperature and threshold more than calibration can gain")
    rare = {c: n for c, n in counts.items() if n < min_per_class}
    if rare:
        raise SiteCalibrationError(
            f"{source}: too few films of class(es) {rare} (at least {min_per_class} each): sensitivity and "
            f"specificity could not be told to better than +-{100 // min_per_class} points")
    return counts


def _nll(log_probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-film negative log-likelihood."""
    return -log_probs[np.arange(len(y)), y]


def fit_platt(logits: np.ndarray, y: np.ndarray, positive_index: int) -> tuple[float, float]:
    """Binary Platt scaling on the logit difference d = z_pos - z_neg: p = sigmoid(d / T + b).
    Returns (T, b); T > 0 (fitted as log T), a weak L2 pull on b keeps a separable sample finite."""
    d = logits[:, positive_index] - logits[:, 1 - positive_index]
    t = (y == positive_index).astype(float)

    def loss(params):
        z = d / np.exp(params[0]) + params[1]
        return float(np.mean(np.logaddexp(0, z) - t * z)) + 1e-4 * params[1] ** 2

    start = np.log(fit_temperature(logits, y))
    result = minimize(loss, x0=[start, 0.0], method="L-BFGS-B", bounds=[(np.log(0.05), np.log(20.0)), (-20, 20)])
    return float(np.exp(result.x[0])), float(result.x[1])


def _map_log_probs(logits, temperature, bias):
    return log_softmax(np.asarray(logits, np.float64) / temperature + np.asarray(bias, np.float64), axis=1)


def _platt_bias(n_classes: int, positive_index: int, b: float) -> list:
    bias = [0.0] * n_classes
    bias[positive_index] = b
    return bias


def compare_maps(logits: np.ndarray, y: np.ndarray, positive_index: Optional[int], folds: int = 5,
                 seed: int = 0) -> dict:
    """Cross-validated (stratified `folds`-fold) per-film log loss of temperature vs Platt on the
    same films: their means and the mean difference with its standard error."""
    if positive_index is None or logits.shape[1] != 2:
        return {"platt_possible": False}
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), int)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(len(idx)) % folds
    loss_t, loss_p = np.empty(len(y)), np.empty(len(y))
    for f in range(folds):
        test, train = fold == f, fold != f
        t = fit_temperature(logits[train], y[train])
        loss_t[test] = _nll(_map_log_probs(logits[test], t, [0.0] * logits.shape[1]), y[test])
        tp, b = fit_platt(logits[train], y[train], positive_index)
        loss_p[test] = _nll(_map_log_probs(logits[test], tp, _platt_bias(2, positive_index, b)), y[test])
    diff = loss_t - loss_p  # > 0: Platt better
    return {"platt_possible": True, "folds": folds, "cv_log_loss_temperature": float(loss_t.mean()),
            "cv_log_loss_platt": float(loss_p.mean()), "cv_gain_platt": float(diff.mean()),
            "cv_gain_se": float(diff.std(ddof=1) / np.sqrt(len(diff)))}


def resolve_rule(card, rule: str, target_sensitivity: Optional[float]) -> tuple[str, float]:
    """The threshold rule to use: `model` means the rule the model was trained with (its config)."""
    train = (card.config or {}).get("train", {})
    if rule == "model":
        rule = train.get("threshold", "youden") if card.threshold is not None else "argmax"
    target = target_sensitivity if target_sensitivity is not None else float(train.get("target_sensitivity", 0.95))
    return rule, target


def oob_ci(y_pos: np.ndarray, p_pos: np.ndarray, rule: str, target: float, n_resamples: int = 1000,
           seed: int = 0, level: float = 0.95) -> dict:
    """What the threshold rule achieves on films it was not chosen on, and how well k tells it:
    stratified bootstrap resamples of the k films, the threshold re-chosen on each, sensitivity and
    specificity measured on that resample's out-of-bag films (pooled counts per resample)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y_pos == 1), np.flatnonzero(y_pos == 0)
    sens, spec = [], []
    for _ in range(n_resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        out = np.setdiff1d(np.arange(len(y_pos)), idx)
        if not ((y_pos[out] == 1).any() and (y_pos[out] == 0).any()):
            continue
        th = choose_threshold(y_pos[idx], p_pos[idx], rule, target)
        called = p_pos[out] >= th
        sens.append(called[y_pos[out] == 1].mean())
        spec.append(1 - called[y_pos[out] == 0].mean())
    tail = (1 - level) / 2 * 100
    out = {"method": "out-of-bag bootstrap, threshold re-chosen per resample", "n_resamples": len(sens),
           "level": level, "seed": seed}
    for name, values in (("sensitivity", sens), ("specificity", spec)):
        values = np.asarray(values)
        out[name] = float(values.mean()) if len(values) else float("nan")
        low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (np.nan, np.nan)
        out[f"{name}_ci"] = [float(low), float(high)]
    return out


def fit(logits: np.ndarray, y: np.ndarray, card, rule: str = "model", target_sensitivity: Optional[float] = None,
        map_choice: str = "auto", source: str = "", failed: int = 0, n_resamples: int = 1000, seed: int = 0,
        adaptation_id: Optional[str] = None) -> SiteCalibration:
    """A SiteCalibration from the raw logits (k, C) of k labelled films (`y`: class indices) of a new site."""
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, int)
    counts = check_sample([card.classes[i] for i in y], card.classes, source or "labelled sample")
    positive_index = card.positive_index
    rule, target = resolve_rule(card, rule, target_sensitivity)
    if map_choice not in MAP_CHOICES:
        raise SiteCalibrationError(f"map {map_choice!r} is not one of {MAP_CHOICES}")
    comparison = compare_maps(logits, y, positive_index, seed=seed)
    if map_choice == "platt" and not comparison["platt_possible"]:
        raise SiteCalibrationError("map=platt needs a binary model with a positive class")
    use_platt = map_choice == "platt" or (
        map_choice == "auto" and comparison["platt_possible"]
        and comparison["cv_gain_platt"] > 2 * comparison["cv_gain_se"])
    if use_platt:
        temperature, b = fit_platt(logits, y, positive_index)
        bias = _platt_bias(logits.shape[1], positive_index, b)
    else:
        temperature, bias = fit_temperature(logits, y), [0.0] * logits.shape[1]
    probs = np.exp(_map_log_probs(logits, temperature, bias))
    before = np.exp(_map_log_probs(logits, card.temperature, [0.0] * logits.shape[1]))
    report = {"map_comparison": comparison, "map_rule": "platt only when its cross-validated log loss is lower "
              "by more than 2 standard errors (map=auto)",
              "log_loss_before": float(_nll(np.log(np.clip(before, 1e-12, 1)), y).mean()),
              "log_loss_after": float(_nll(np.log(np.clip(probs, 1e-12, 1)), y).mean()),
              "in_sample": True}
    threshold, rule_text = None, "argmax"
    if positive_index is not None and len(card.classes) == 2:
        y_pos = (y == positive_index).astype(int)
        p_pos = probs[:, positive_index]
        if rule == "keep":
            threshold = card.threshold
            rule_text = f"kept from the model ({card.threshold_rule})"
        else:
            threshold = choose_threshold(y_pos, p_pos, rule, target)
            rule_text = (rule + (f" {target:g}" if rule == "target_sensitivity" else "")
                         + f" on k={len(y)} site films, site-calibrated")
        report.update(
            ece_before=expected_calibration_error(y_pos, before[:, positive_index]),
            ece_after=expected_calibration_error(y_pos, p_pos),
            sensitivity_in_sample=float((p_pos[y_pos == 1] >= threshold).mean()),
            specificity_in_sample=float((p_pos[y_pos == 0] < threshold).mean()),
            model_threshold=card.threshold)
        if rule != "keep" and n_resamples > 0:  # 0: skipped (a benchmark drawing many samples)
            report["out_of_bag"] = oob_ci(y_pos, p_pos, rule, target, n_resamples, seed)
    cal = SiteCalibration(
        model_id=card.model_id, classes=list(card.classes), positive_class=card.positive_class,
        map="platt" if use_platt else "temperature", temperature=float(temperature), bias=[float(b) for b in bias],
        threshold=None if threshold is None else float(threshold), threshold_rule=rule_text,
        fitted_on={"source": source, "k": int(len(y)), "per_class": counts, "failed_to_decode": int(failed)},
        report=report, adaptation_id=adaptation_id)
    return finish(cal)


def labelled_sample(labelled: str, classes: list, extensions: list) -> tuple[list, list]:
    """(paths, labels) of a folder of class subfolders (`<dir>/<CLASS>/<file>`) or a manifest with
    path and label columns, listed only: no image is read (labels are checked by check_sample)."""
    from medclf import storage
    from medclf.imaging.manifest import DatasetError, read_manifest

    if labelled.lower().endswith((".parquet", ".csv")):
        df = read_manifest(labelled)
        if "label" not in df.columns:
            raise DatasetError(f"{labelled}: manifest has no 'label' column")
        return list(df["path"]), [str(v) for v in df["label"]]
    if not storage.exists(labelled):
        raise DatasetError(f"{labelled}: labelled folder not found")
    paths = sorted(storage.list_files(labelled, extensions))
    if not paths:
        raise DatasetError(f"{labelled}: no image files ({', '.join(extensions)}) found")
    local = not storage.is_remote(labelled)
    root = (os.path.abspath(labelled) if local else labelled).rstrip("/")
    labels = []
    for p in paths:
        q = os.path.abspath(p) if local else p
        parts = q[len(root):].strip("/").split("/") if q.startswith(root + "/") else []
        if len(parts) != 2:
            raise DatasetError(f"{p}: expected <folder>/<CLASS>/<file> under {labelled}")
        labels.append(parts[0])
    return paths, labels


def logits_of(model_path: str, paths: list, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, list]:
    """Raw logits of each file through the scoring path (decode -> preprocess -> the model), and a
    mask of the films that decoded; `errors`: one message per file that did not (naming it)."""
    import torch

    from medclf import storage
    from medclf.imaging.decode import DecodeError, decode
    from medclf.imaging.preprocess import preprocess_gray, to_model_input
    from medclf.model.artifact import load_artifact

    model, card = load_artifact(model_path)
    spec = card.preprocess_spec
    ok = np.zeros(len(paths), bool)
    errors, out = [], np.full((len(paths), len(card.classes)), np.nan)
    pending: list = []

    def flush():
        if pending:
            x = torch.from_numpy(np.stack([g for _, g in pending]))
            with torch.inference_mode():
                out[[i for i, _ in pending]] = model(to_model_input(x)).float().numpy()
            pending.clear()

    for i, path in enumerate(paths):
        try:
            pending.append((i, preprocess_gray(decode(storage.read_bytes(path), path).image, spec)))
            ok[i] = True
        except (DecodeError, OSError, ValueError) as exc:
            errors.append(str(exc) if isinstance(exc, DecodeError) else f"{path}: {exc}")
        if len(pending) >= batch_size:
            flush()
    flush()
    return out, ok, errors


def calibrate_site(model_path: str, labelled: str, extensions: list, rule: str = "model",
                   target_sensitivity: Optional[float] = None, map_choice: str = "auto", min_films: int = MIN_FILMS,
                   min_per_class: int = MIN_PER_CLASS, left_out: Callable[[str], None] = lambda message: None):
    """Steps 1-5 above for `medclf calibrate`: (the model's card, its SiteCalibration). `left_out` hears
    each film that failed to decode as it is left out, before the counts are checked again."""
    from medclf.model.artifact import load_card

    card = load_card(model_path)
    paths, labels = labelled_sample(labelled, card.classes, extensions)
    # refused here, before any image is read, when k or a class count is too small
    check_sample(labels, card.classes, labelled, min_films, min_per_class)
    logits, ok, errors = logits_of(model_path, paths)
    for message in errors:
        left_out(message)
    y = np.array([card.classes.index(lab) for lab in labels])
    check_sample([labels[i] for i in np.flatnonzero(ok)], card.classes,
                 f"{labelled} (after {len(errors)} film(s) failed to decode)", min_films, min_per_class)
    return card, fit(logits[ok], y[ok], card, rule, target_sensitivity, map_choice, source=labelled,
                     failed=len(errors))
