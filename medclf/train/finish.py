"""After training, on the driver (`finish_run`): from the kept epoch's weights and validation
scores, the calibration, decision threshold, metrics with CIs, model card and artifact (with the
out-of-scope domain and drift reference), history, curves and validation reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pandas as pd
import torch

from medclf import storage
from medclf.config import Config
from medclf.imaging.preprocess import to_model_input
from medclf.model import card as model_card
from medclf.model.artifact import ModelCard, save_artifact
from medclf.model.networks import build_model, class_probabilities, predicting_model
from medclf.model.calibration import softmax_with_temperature
from medclf.monitor.ood import embed, fit_domain
from medclf.monitor.reference import fit_reference
from medclf.ops.logs import say
from medclf.report.metrics import classification_metrics
from medclf.model.decision import choose_threshold
from medclf.train.inputs import TrainingInputs


@dataclass
class TrainResult:
    model_path: str
    history: pd.DataFrame
    card: ModelCard
    caches: Optional[dict] = None  # split name -> medclf.data.cache.SplitCache (built or reused)


def finish_run(cfg: Config, run_dir: str, inputs: TrainingInputs, state: dict, val_batches) -> TrainResult:
    """From the best epoch's weights and validation scores: calibration, threshold, metrics with CIs,
    the model artifact, history, curves and validation reports. `val_batches()`: the validation
    images as (rows, images) batches (feed)."""
    best, history, group = state["best"], pd.DataFrame(state["history"]), inputs.select_group
    model = build_model(cfg.model.arch, len(inputs.classes), "none", cfg.model.dropout)
    model.load_state_dict(best["state"])
    model = predicting_model(model, cfg.model.test_time_hflip)  # as validated, and as the artifact predicts
    log_probs, select, y = best["val_log_probs"].numpy(), inputs.val_groups == group, inputs.val_y
    temperature, calibration = fit_calibration(log_probs[select], y[select], inputs.positive_index,
                                               f"{group} validation")
    val_probs = softmax_with_temperature(log_probs, temperature).astype(np.float32)
    threshold, rule = decision_threshold(cfg, model.eval(), temperature, val_probs[select],
                                         lambda: gather_rows(val_batches(), select),
                                         y[select], inputs.positive_index, group)
    val_metrics = {}
    for part in dict.fromkeys([group, "patient"]):  # the selection part first
        rows = inputs.val_groups == part
        if rows.any():
            val_metrics[part] = metrics_with_ci(y[rows], val_probs[rows], inputs.positive_index, threshold, cfg)
            val_metrics[part].update(best_epoch=best["epoch"], n=int(rows.sum()))
    card = ModelCard(
        arch=cfg.model.arch, classes=inputs.classes, preprocess=cfg.preprocess.model_dump(),
        positive_class=inputs.positive, threshold=threshold, threshold_rule=rule, temperature=temperature,
        test_time_hflip=cfg.model.test_time_hflip, calibration=calibration, config=cfg.model_dump(mode="json"),
        metrics={"validation": val_metrics[group], "selected_on": f"{group} validation",
                 **{f"validation_{part}": m for part, m in val_metrics.items()}},
        intended_use=cfg.model_card.model_dump(),
        provenance=model_card.provenance(cfg, pd.concat([inputs.train, inputs.val]), inputs.classes),
        failure_modes=model_card.failure_modes(list(inputs.val["path"][select]), y[select], val_probs[select],
                                               inputs.classes, threshold, inputs.positive_index, cfg.report.show_paths))
    if cfg.train.adapt_verdict:  # does score.adapt=bn help this model? (medclf.train.adapt_verdict)
        from medclf.train.adapt_verdict import measure_verdict, verdict_line

        card.adaptation = measure_verdict(model.eval(), cfg.model.arch, cfg.model.transfer,
                                          gather_rows(val_batches(), select), y[select], inputs.positive_index,
                                          temperature, cfg.preprocess.mean, cfg.preprocess.std,
                                          cfg.score.adapt_sample, cfg.run.seed)
        say(verdict_line(card.adaptation))
    embedding = embed(model.eval(), cfg.model.arch, val_batches(), len(y))  # one pass, batch by batch
    domain = fit_domain(cfg, embedding, y, list(inputs.val["path"]))  # the out-of-scope guard (medclf.monitor.ood)
    card.domain = domain and domain.record.model_dump()
    reference = fit_reference(card, embedding, y, list(inputs.val["path"]), domain, cfg.run.seed)  # medclf.monitor.drift
    card.reference = reference.record.model_dump()
    files = {reference.record.file: reference.to_bytes(), **({domain.record.file: domain.to_bytes()} if domain else {})}
    model_path = storage.join(run_dir, "model")
    card = save_artifact(model, card, model_path, files)
    model_card.write(card, model_path)
    write_history(history, run_dir)
    for part in val_metrics:
        rows = inputs.val_groups == part
        folder = "validation_report" if part == group else f"validation_report_{part}"
        write_validation_report(cfg, inputs.val[rows], inputs.classes, val_probs[rows], card,
                                storage.join(run_dir, folder), f"{part}-level validation split")
    storage.write_bytes(storage.join(run_dir, "workers.json"), json.dumps(state["workers"], indent=2).encode())
    return TrainResult(model_path, history, card)


def gather_rows(batches: Iterable, rows: np.ndarray) -> np.ndarray:
    """The images of the rows selected by the mask `rows`, in row order, from (rows, images) batches."""
    position = np.cumsum(rows) - 1
    out = None
    for index, x in batches:
        keep = rows[index]
        if out is None:
            out = np.empty((int(rows.sum()), *x.shape[1:]), x.dtype)
        out[position[index[keep]]] = x[keep]
    return out


def fit_calibration(log_probs: np.ndarray, y: np.ndarray, positive_index, fitted_on: str) -> tuple[float, dict]:
    """Temperature fitted on validation log-probabilities; log loss and ECE before and after."""
    from medclf.model.calibration import fit_temperature_checked, negative_log_likelihood
    from medclf.model.calibration import expected_calibration_error

    fit = fit_temperature_checked(log_probs, y)  # warns itself when the fit sat on a bound
    temperature = fit.temperature

    def ece(t: float) -> float:
        probs = softmax_with_temperature(log_probs, t)
        if positive_index is not None:
            return expected_calibration_error((y == positive_index).astype(int), probs[:, positive_index])
        return expected_calibration_error((probs.argmax(1) == y).astype(int), probs.max(1))

    calibration = {"method": "temperature", "fitted_on": fitted_on, "n": int(len(y)), "status": fit.status,
                   **({"note": fit.message} if fit.message else {}),
                   "log_loss_before": negative_log_likelihood(log_probs, y, 1.0),
                   "log_loss_after": negative_log_likelihood(log_probs, y, temperature),
                   "ece_before": ece(1.0), "ece_after": ece(temperature)}
    how = "kept (no finite fit, see warning)" if fit.status == "fallback" else "fitted"
    say(f"calibration: temperature {temperature:.3f} {how} on {fitted_on} (n={len(y)}); ECE "
         f"{calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}, log loss "
         f"{calibration['log_loss_before']:.4f} -> {calibration['log_loss_after']:.4f}")
    return temperature, calibration


def decision_threshold(cfg: Config, model: torch.nn.Module, temperature: float, probs: np.ndarray, x,
                       y: np.ndarray, positive_index, group: str) -> tuple[Optional[float], str]:
    """The operating point on calibrated validation scores (`train.threshold`); None for multi-class.
    `x()`: the validation images, read only when the threshold is chosen on shifted copies of them."""
    if positive_index is None:
        return None, "argmax"
    y_pos = (y == positive_index).astype(int)
    scores, labels = probs[:, positive_index], y_pos
    if cfg.train.threshold_validation == "shifted":
        shifted = shifted_scores(model, x(), cfg, positive_index, temperature)
        scores = np.concatenate([scores, *shifted])
        labels = np.tile(y_pos, 1 + len(shifted))
    threshold = choose_threshold(labels, scores, cfg.train.threshold, cfg.train.target_sensitivity)
    rule = cfg.train.threshold + (f" {cfg.train.target_sensitivity:g}" if cfg.train.threshold == "target_sensitivity"
                                  else "") + f" on {cfg.train.threshold_validation} {group} validation, calibrated"
    say(f"decision threshold {threshold:.4f} ({rule})")
    return threshold, rule


def shifted_scores(model: torch.nn.Module, val_x: np.ndarray, cfg: Config, positive_index: int,
                   temperature: float = 1.0) -> list[np.ndarray]:
    """Calibrated positive-class scores of the validation images under each acquisition shift."""
    from medclf.data.augment import ACQUISITION_SHIFTS, acquisition_shift

    x_all = torch.from_numpy(val_x)
    out = []
    with torch.inference_mode():
        for kind in ACQUISITION_SHIFTS:
            x = acquisition_shift(x_all, kind, cfg.preprocess.mean, cfg.preprocess.std)
            out.append(np.concatenate([class_probabilities(model(to_model_input(x[i:i + 128])), temperature)
                                       [:, positive_index].numpy() for i in range(0, len(x), 128)]))
    return out


def metrics_with_ci(y: np.ndarray, probs: np.ndarray, positive_index, threshold, cfg: Config) -> dict:
    """Validation metrics at the stored operating point, with 95% bootstrap CIs for binary tasks."""
    from medclf.report.metrics import bootstrap_ci

    metrics = classification_metrics(y, probs, positive_index, threshold)
    y_pos = (y == positive_index).astype(int) if positive_index is not None else None
    if y_pos is not None and len(np.unique(y_pos)) == 2 and cfg.evaluate.bootstrap_resamples:
        ci = bootstrap_ci(y_pos, probs[:, positive_index], threshold, cfg.evaluate.bootstrap_resamples,
                          cfg.evaluate.bootstrap_seed)
        for r in ci.itertuples():
            metrics[f"{r.metric}_ci_low"], metrics[f"{r.metric}_ci_high"] = r.ci_low, r.ci_high
    return metrics


def write_validation_report(cfg: Config, val: pd.DataFrame, classes: list[str], val_probs: np.ndarray,
                            card: ModelCard, output: str, what: str) -> None:
    """The evaluation report (medclf.report.evaluate, same tables and plots) of the kept epoch on validation."""
    from medclf.report.evaluate import write_report
    from medclf.data.predictions import prob_column

    frame = pd.DataFrame({"path": val["path"].to_numpy(), "label": val["label"].to_numpy(), "status": "ok",
                          "threshold": np.nan if card.threshold is None else card.threshold,
                          "model_id": card.model_id})
    frame["format"] = [p.rsplit(".", 1)[-1].lower() for p in frame["path"]]
    for k, c in enumerate(classes):
        frame[prob_column(c)] = val_probs[:, k]
    ec = cfg.evaluate
    write_report(frame, output, classes, card.positive_class,
                 ec.bootstrap_resamples, ec.bootstrap_seed, None, ec.target_sensitivity,
                 {"predictions": f"{what} of {cfg.data.root or cfg.data.manifest}", "labels": "training labels",
                  "temperature": card.temperature})


def write_history(history: pd.DataFrame, run_dir: str) -> None:
    from medclf.report.plots import training_curves

    storage.write_bytes(storage.join(run_dir, "history.parquet"), history.to_parquet(index=False))
    storage.write_bytes(storage.join(run_dir, "curves.png"), training_curves(history))
