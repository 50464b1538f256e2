"""Does label-free BatchNorm adaptation (medclf.model.adapt) help THIS model? Measured at the end of
training on its own validation part (the family part when there is one), unshifted and under each
acquisition shift of medclf.data.augment: ROC AUC with the training statistics vs with statistics
re-estimated on that (shifted) set's own images (labels are used only to score, never to adapt).

The rule (docs/adaptation.md; version 3, session 22; saturation checked first since session 24):
  positive      when validation is not saturated, some BatchNorm layer is adaptable, the mean AUC change
                over all the sets (unshifted and shifted) is above MIN_MEAN_GAIN, and no set loses more
                than MAX_LOSS (about two standard errors of an AUC on a few hundred validation images: a
                smaller bound is noise);
  inconclusive  when validation is saturated (every set's unadapted AUC >= SATURATED_AUC, so no gain can
                show) and adaptation does no measurable harm (no set loses more than SATURATED_MAX_LOSS,
                mean change >= -SATURATED_MAX_MEAN_LOSS): validation cannot tell whether adaptation
                would help at a new site. Two pneumonia models both land here, the EfficientNet-Lite0
                that one label-free pass helped on the maintainers' held-back test and the scratch
                ResNet18 it hurt there; so it is not positive;
  negative      otherwise (also: nothing to adapt).
The verdict and every number go into the artifact's card (`adaptation`). Scoring treats every verdict
but positive alike: `auto` keeps the training statistics, and `bn` needs score.adapt_override.
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch

MIN_MEAN_GAIN = 0.0
MAX_LOSS = 0.03
# Validation from the training archive saturates (the pneumonia model: AUC 0.998-0.999 on every set), so a
# gain cannot show there; the verdict then asks only that adaptation do no harm, with bounds a
# saturated AUC resolves (its standard error on ~1,400 films is ~0.001).
SATURATED_AUC = 0.995
SATURATED_MAX_LOSS = 0.005
SATURATED_MAX_MEAN_LOSS = 0.002
RULE = (f"when every set's AUC without adaptation is >= {SATURATED_AUC} (saturated: no gain can show): "
        f"inconclusive if no set loses more than {SATURATED_MAX_LOSS} and the mean change is >= "
        f"-{SATURATED_MAX_MEAN_LOSS}, else negative; otherwise positive when the mean AUC change over all sets > "
        f"{MIN_MEAN_GAIN} and no set loses more than {MAX_LOSS}, else negative")


def decide(sets: list[dict]) -> tuple[str, str, str]:
    """(verdict, basis, why) from the per-set AUCs without (`auc_none`) and with (`auc_bn`) adaptation."""
    deltas = np.array([s["auc_bn"] - s["auc_none"] for s in sets], float)
    before = np.array([s["auc_none"] for s in sets], float)
    if not len(deltas) or np.isnan(deltas).any():
        return "negative", "undefined", "AUC undefined (one class only in validation)"
    mean_gain, worst = float(deltas.mean()), float(deltas.min())
    numbers = f"mean AUC change over {len(deltas)} sets {mean_gain:+.4f}, worst set {worst:+.4f}"
    # Saturation is decided first: there a mean change of +0.0001 (the 6-epoch default's) is as much noise as
    # the 3-epoch model's -0.0003, and must not read as a gain.
    if before.min() >= SATURATED_AUC:
        if worst >= -SATURATED_MAX_LOSS and mean_gain >= -SATURATED_MAX_MEAN_LOSS:
            return "inconclusive", "no harm on saturated validation", (
                f"{numbers}; validation is saturated (lowest AUC without adaptation {before.min():.4f} >= "
                f"{SATURATED_AUC}): no gain can show, and adaptation does no measurable harm")
        return "negative", "harm on saturated validation", (
            f"{numbers}; validation is saturated and adaptation loses more than the rule allows (fails the rule)")
    if mean_gain > MIN_MEAN_GAIN and worst >= -MAX_LOSS:
        return "positive", "gain", f"{numbers} (a gain shows: meets the rule)"
    return "negative", "no gain", f"{numbers} (fails the rule)"


def _auc(y: np.ndarray, probs: np.ndarray, positive_index: Optional[int]) -> float:
    from sklearn.metrics import roc_auc_score

    if positive_index is not None:
        pos = (y == positive_index).astype(int)
        return float(roc_auc_score(pos, probs[:, positive_index])) if len(np.unique(pos)) == 2 else float("nan")
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    return float(np.mean([roc_auc_score((y == c).astype(int), probs[:, c]) for c in present]))


def _probs(model: torch.nn.Module, x: torch.Tensor, temperature: float) -> np.ndarray:
    from medclf.imaging.preprocess import to_model_input
    from medclf.model.networks import class_probabilities

    with torch.inference_mode():
        return np.concatenate([class_probabilities(model(to_model_input(x[i:i + 64])), temperature).numpy()
                               for i in range(0, len(x), 64)])


def measure_verdict(model: torch.nn.Module, arch: str, transfer: str, val_x: np.ndarray, y: np.ndarray,
                    positive_index: Optional[int], temperature: float, mean: float, std: float,
                    sample: int = 300, seed: int = 0, shifts: Optional[list[str]] = None) -> dict:
    """The card's `adaptation` record: per set (as is + each shift) AUC without and with `bn`, the
    verdict and the layers. `val_x`: preprocessed validation images (N, 1, S, S); `model` unchanged."""
    from medclf.data.augment import ACQUISITION_SHIFTS, acquisition_shift
    from medclf.model.adapt import adaptable_layers, fit_bn_statistics, tensor_batches

    adapt, skipped = adaptable_layers(model, arch, transfer)
    record = {"method": "bn", "transfer": transfer, "adapted_layers": adapt, "skipped_layers": skipped,
              "rule": RULE, "n": int(len(y)), "sample": int(min(sample, len(y))),
              "seed": seed, "sets": []}
    if not adapt:
        return {**record, "verdict": "negative", "why": "nothing to adapt: " + (
            "no BatchNorm layer" if not skipped else "every BatchNorm layer is frozen")}
    x_all = torch.from_numpy(np.ascontiguousarray(val_x, np.float32))
    pick = np.sort(np.random.default_rng(seed).permutation(len(x_all))[:sample])
    for kind in ["as is", *(shifts if shifts is not None else ACQUISITION_SHIFTS)]:
        x = acquisition_shift(x_all, kind, mean, std)
        before = _auc(y, _probs(model, x, temperature), positive_index)
        adapted = copy.deepcopy(model).eval()
        fit_bn_statistics(adapted, arch, transfer, tensor_batches(x[pick].numpy()))
        after = _auc(y, _probs(adapted, x, temperature), positive_index)
        record["sets"].append({"shift": kind, "auc_none": before, "auc_bn": after, "delta": after - before})
    verdict, basis, why = decide(record["sets"])
    deltas = np.array([s["delta"] for s in record["sets"]], float)
    extra = {} if np.isnan(deltas).any() else {"mean_gain": float(deltas.mean()), "worst_delta": float(deltas.min())}
    return {**record, "verdict": verdict, "basis": basis, "why": why, **extra}


def verdict_line(record: dict) -> str:
    sets = ", ".join(f"{s['shift']} {s['auc_none']:.3f}->{s['auc_bn']:.3f}" for s in record.get("sets", []))
    return (f"adaptation verdict {record['verdict']}: {record['why']}; {len(record['adapted_layers'])} layer(s) "
            f"adaptable, {len(record['skipped_layers'])} frozen kept" + (f"; AUC none->bn: {sets}" if sets else ""))
