"""The model card: what a model is for, what it learned from, how well it did on what, where it fails.

`model.json` (medclf.model.artifact.ModelCard) holds the facts as data: intended and out-of-scope use
(config section `model_card`), training data (source, images per class and split, the split
scheme and what its figures mean), validation metrics with 95% CIs per validation scheme,
calibration, the threshold and its rule, the most confident validation errors, software versions
and the training config's hash. `render` writes them as `MODEL_CARD.md` beside it, for people.
"""

from __future__ import annotations

import hashlib
import json
import platform
from typing import Optional

import numpy as np
import pandas as pd
# At import, not in software_versions: torchvision imports torch._dynamo, which reads the working
# directory; a `ray job submit` driver's working directory can be gone by the time the card is written
# (a two-raylet cluster on one machine cleared it: tests/project/test_cluster_jobs.py).
import torchvision

from medclf import storage
from medclf.config import Config

CARD_MARKDOWN = "MODEL_CARD.md"

SCHEME_MEANING = {
    "family": "whole acquisition families and a contiguous range of patient numbers, held out together: the "
              "closest stand-in for a new archive the training data allows (still the same hospital and era)",
    "patient": "a random share of the training archive's patients: no patient on both sides, but the same "
               "archive, so expect lower figures on a new one",
}


def software_versions() -> dict[str, str]:
    import ray
    import torch

    from medclf import __version__

    return {"medclf": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "ray": ray.__version__, "numpy": np.__version__, "python": platform.python_version()}


def config_sha256(cfg: Config) -> str:
    """Hash of the resolved training config (canonical JSON): two models with the same hash were
    trained with the same settings."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def split_scheme(cfg: Config) -> str:
    d = cfg.data
    if d.val_scheme == "family":
        parts = [f"families held out whole: {', '.join(d.holdout_families)}"] if d.holdout_families else []
        if d.holdout_id_fraction:
            parts.append(f"{d.holdout_id_fraction:.0%} of each other family's patients at the {d.holdout_id_end} end "
                         "of the numbering")
        return f"family ({'; '.join(parts)}), plus a random {d.val_fraction:.0%} of the remaining patients"
    return f"patient (a random, label-stratified {d.val_fraction:.0%} of patients)"


def provenance(cfg: Config, df: pd.DataFrame, classes: list[str]) -> dict:
    """Training data and software: where the images came from, how many per class and split."""
    splits = [cfg.data.train_split, cfg.data.val_split]
    counts = {s: {c: int(((df["split"] == s) & (df["label"] == c)).sum()) for c in classes} for s in splits}
    return {
        "training_data": {"source": cfg.data.manifest or cfg.data.root, "images": counts,
                          "patients": int(df[df["split"].isin(splits)]["patient_id"].nunique()),
                          "split_scheme": split_scheme(cfg)},
        "software": software_versions(),
        "config_sha256": config_sha256(cfg),
    }


def failure_modes(paths: list[str], y: np.ndarray, probs: np.ndarray, classes: list[str],
                  threshold: Optional[float], positive_index: Optional[int], show_paths: bool = False,
                  n: int = 8) -> list[dict]:
    """The most confident validation errors (what the report's gallery shows), most confident first.
    Files are named by a short hash unless `show_paths` (names often carry a patient's)."""
    from medclf.model.decision import predict_labels

    predicted = np.array([classes.index(p) for p in predict_labels(probs, classes, positive_index, threshold)])
    wrong = np.flatnonzero(predicted != y)
    order = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:n]
    return [{"file": paths[i] if show_paths else "file-" + hashlib.sha256(paths[i].encode()).hexdigest()[:10],
             "true": classes[y[i]], "predicted": classes[predicted[i]],
             "probability": round(float(probs[i, predicted[i]]), 4)} for i in order]


def _metrics_table(metrics: dict) -> list[str]:
    rows = ["| metric | value | 95% CI |", "|---|---|---|"]
    for key in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "macro_f1",
                "roc_auc", "pr_auc", "ece", "brier"):
        if key in metrics and metrics[key] is not None:
            low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            ci = f"{low:.3f}-{high:.3f}" if low is not None and high is not None else ""
            rows.append(f"| {key} | {metrics[key]:.4f} | {ci} |")
    recalls = [k for k in metrics if k.startswith("recall_")]
    for key in recalls:
        rows.append(f"| {key} | {metrics[key]:.4f} | |")
    return rows


# Every MODEL_CARD.md has these sections, in this order (issue 15; tests/model/test_model_card.py).
REQUIRED_SECTIONS = ("## Intended use", "## Out-of-scope use", "## Training data", "## Validation results",
                     "## Calibration and threshold", "## Known failure modes", "## Drift reference", "## Software")


def _ensemble_lines(card) -> list[str]:
    """An ensemble's members and its figures on the labelled films it was made on; [] for a single model."""
    members = ((card.config or {}).get("ensemble") or {}).get("members")
    if not members:
        return []
    lines = ["## Ensemble members", "",
             "Probabilities are the mean of these members' calibrated probabilities (each at its own temperature); "
             "the threshold, out-of-scope guard and drift reference were fitted on "
             f"`{card.config['ensemble'].get('labelled', 'labelled films')}`.", "",
             "| member | arch | temperature | test-time mirror |", "|---|---|---|---|"]
    lines += [f"| {m['model_id']} | {m['arch']} | {m['temperature']:.3f} | {'yes' if m['test_time_hflip'] else 'no'} |"
              for m in members]
    films = (card.metrics or {}).get("labelled_films")
    if isinstance(films, dict):
        lines += ["", f"On the {films.get('n', '?')} labelled films (in sample: the threshold was chosen on them):", "",
                  *_metrics_table(films)]
    return lines + [""]


def render(card) -> str:
    """MODEL_CARD.md text from a ModelCard."""
    use, prov = card.intended_use or {}, card.provenance or {}
    data, software = prov.get("training_data", {}), prov.get("software", {})
    lines = [f"# Model card: {card.model_id}", "",
             f"{card.arch}, classes {', '.join(card.classes)}"
             + (f" (positive: {card.positive_class})" if card.positive_class else "")
             + f"; created {card.created_at}.", "",
             "## Intended use", "", use.get("intended_use") or "Not stated (config `model_card.intended_use`).", "",
             "## Out-of-scope use", "", use.get("out_of_scope_use") or "Not stated (config `model_card.out_of_scope_use`).",
             ""]
    if use.get("population"):
        lines += ["Training population: " + use["population"], ""]
    lines += ["## Training data", "", f"Source: `{data.get('source')}`; {data.get('patients', '?')} patients.", "",
              "| split | " + " | ".join(card.classes) + " |", "|---|" + "---|" * len(card.classes)]
    for split, counts in data.get("images", {}).items():
        lines.append(f"| {split} | " + " | ".join(str(counts.get(c, 0)) for c in card.classes) + " |")
    lines += ["", f"Validation scheme: {data.get('split_scheme', 'not recorded')}.", "",
              "## Validation results", "",
              "Every figure below is validation carved from the training archive, with 95% bootstrap CIs. None is a "
              "measurement on a new hospital's images; expect lower figures there.", ""]
    for key, metrics in card.metrics.items():
        if not key.startswith("validation_") or not isinstance(metrics, dict):
            continue
        scheme = key.removeprefix("validation_")
        chosen = " (epoch, calibration and threshold chosen here)" if card.metrics.get("selected_on", "").startswith(
            scheme) else ""
        lines += [f"### {scheme} part{chosen}: {metrics.get('n', '?')} images", "",
                  f"What it means: {SCHEME_MEANING.get(scheme, scheme)}.", "", *_metrics_table(metrics), ""]
    cal = card.calibration or {}
    lines += ["## Calibration and threshold", "",
              f"Temperature {card.temperature:.3f} ({cal.get('method', 'none')}, fitted on {cal.get('fitted_on', '-')}"
              + (f"; ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}" if "ece_before" in cal else "") + ").",
              "Probabilities in predictions are calibrated: softmax(logits / temperature)."
              + (" The logits are the mean over the image and its left-right mirror image (test-time "
                 "augmentation, `test_time_hflip`), in validation as in scoring." if card.test_time_hflip else ""), "",
              (f"Decision: {card.positive_class} when its probability >= {card.threshold:.4f} ({card.threshold_rule})."
               if card.threshold is not None else "Decision: the most probable class."), ""]
    lines += _ensemble_lines(card)
    lines += ["## Known failure modes", ""]
    if card.failure_modes:
        lines += ["The most confident validation errors (the report's gallery shows them):",
                  "", "| file | true | predicted | probability |", "|---|---|---|---|"]
        lines += [f"| {e['file']} | {e['true']} | {e['predicted']} | {e['probability']:.3f} |" for e in card.failure_modes]
        lines.append("")
    else:
        lines += ["No validation image was misclassified; that is a statement about a small validation set, "
                  "not a guarantee.", ""]
    domain = getattr(card, "domain", None)
    if domain:
        lines += ["## Out-of-scope guard", "", "Inputs outside the training domain are answered `out_of_scope` "
                  "(see model.json `domain`).", ""]
    reference = getattr(card, "reference", None)
    lines += ["## Drift reference", ""]
    if reference:
        lines += [f"Measured on {reference['n']} validation images (model.json `reference`, reference.npz): input "
                  "intensity, size and format/modality mix, calibrated scores, ood_score and "
                  f"{reference['emb_pcs']} principal components of the embedding. `medclf drift` compares nightly "
                  "predictions with it (docs/usage.md, 'Drift reports')"
                  + (f"; validation prevalence {reference['prevalence']:.3f}, predicted-positive rate "
                     f"{reference['predicted_positive_rate']:.3f}." if reference.get("predicted_positive_rate")
                     is not None else "."), ""]
    else:
        lines += ["None recorded (a model trained before drift reports): `medclf drift` cannot judge this model.", ""]
    lines += ["## Software", "", ", ".join(f"{k} {v}" for k, v in software.items()) or "not recorded", "",
              f"Training config sha256: `{prov.get('config_sha256', 'not recorded')}`", ""]
    return "\n".join(lines)


def write(card, model_path: str) -> str:
    path = storage.join(model_path, CARD_MARKDOWN)
    storage.write_bytes(path, render(card).encode())
    return path


PUBLIC_CARD_FIELDS = ("model_id", "created_at", "artifact_version", "arch", "classes", "positive_class", "threshold",
                      "threshold_rule", "temperature", "test_time_hflip", "metrics", "intended_use")


def public_card(card) -> dict:
    """What an endpoint may tell a caller about its model: what it is, what it is for, how well it did.
    Not the config, the training data's source paths, the failure-mode files or the domain statistics
    (paths and settings of the site; secrets are redacted in the config anyway, this keeps them out twice)."""
    out = {name: getattr(card, name) for name in PUBLIC_CARD_FIELDS}
    out["software"] = dict((card.provenance or {}).get("software") or {})
    return out
