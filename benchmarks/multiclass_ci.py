"""Validation accuracy, macro-F1 and per-class recall of trained multi-class runs, with 95% image
bootstrap CIs (1,000 resamples, seed 0): each run's model (with its temperature) scores its own
validation split (`splits.parquet`) through the shared decode + preprocessing path.

    python benchmarks/multiclass_ci.py runs/lung-320-lr3e4 runs/breast-320
    python benchmarks/multiclass_ci.py --ensemble runs/lung-l1-224-lr3e4 runs/lung-320-lr3e4

`--ensemble` also reports the mean of the runs' calibrated probabilities (each model at its own input
size), for runs that share one validation split (train them with one `data.split_seed`); it refuses
runs whose validation rows or classes differ. It then gives the paired bootstrap difference, ensemble
minus the mean of the single runs, in macro-F1 and in log loss (the same resampled images for both).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss, recall_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medclf.imaging.decode import decode  # noqa: E402
from medclf.model.artifact import load_artifact  # noqa: E402
from medclf.model.networks import class_probabilities, plain_model, predicting_model
from medclf.imaging.preprocess import preprocess_gray, to_model_input  # noqa: E402


def with_ci(metric, y: np.ndarray, pred: np.ndarray, resamples: list) -> str:
    values = [metric(y[i], pred[i]) for i in resamples]  # nan: a resample without the class (patient bootstrap)
    return f"{metric(y, pred):.3f} ({np.nanpercentile(values, 2.5):.3f}-{np.nanpercentile(values, 97.5):.3f})"


def validation_probs(run: str, hflip_tta=None) -> tuple[pd.DataFrame, np.ndarray, list]:
    """The run's validation rows (sorted by real path, so runs of one split line up), its calibrated
    class probabilities for them, and its classes. `hflip_tta`: None scores as the model card says;
    True/False as if its `test_time_hflip` were that (mean logits of each image and its mirror image,
    or the image alone; the card's temperature either way)."""
    model, card = load_artifact(os.path.join(run, "model"))
    if hflip_tta is not None:
        model = predicting_model(plain_model(model), hflip_tta)
    splits = pd.read_parquet(os.path.join(run, "splits.parquet"))
    val = splits[splits.split == "val"]
    val = val.assign(key=[os.path.realpath(p) for p in val.path]).sort_values("key").reset_index(drop=True)
    x = np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, card.preprocess_spec) for p in val.path])
    with torch.inference_mode():
        probs = class_probabilities(model.eval()(to_model_input(torch.from_numpy(x))), card.temperature).numpy()
    return val, probs, list(card.classes)


def image_resamples(n: int, n_resamples: int, groups=None) -> list:
    """Bootstrap resamples of row indices: of images, or with `groups` (a patient id per row, some
    with several rows) of whole patients, so that correlated images of one patient do not narrow the CI."""
    rng = np.random.default_rng(0)
    if groups is None or len(set(groups)) == n:
        return [rng.choice(n, n) for _ in range(n_resamples)]
    _, patient = np.unique(np.asarray(groups), return_inverse=True)
    rows_of = [np.flatnonzero(patient == g) for g in range(patient.max() + 1)]
    return [np.concatenate([rows_of[g] for g in rng.choice(len(rows_of), len(rows_of))])
            for _ in range(n_resamples)]


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    return f1_score(y, pred, average="macro")


def mean_log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    return log_loss(y, probs, labels=range(probs.shape[1]))


def report(name: str, y: np.ndarray, probs: np.ndarray, classes: list, n_resamples: int, groups=None) -> None:
    report_predictions(name, y, probs.argmax(1), classes, n_resamples, f" log loss {mean_log_loss(y, probs):.4f}",
                       groups)


def report_predictions(name: str, y: np.ndarray, pred: np.ndarray, classes: list, n_resamples: int,
                       extra: str = "", groups=None) -> None:
    resamples = image_resamples(len(y), n_resamples, groups)
    print(f"{name}: n={len(y)} accuracy {with_ci(accuracy_score, y, pred, resamples)} "
          f"macro-F1 {with_ci(macro_f1, y, pred, resamples)}{extra}")
    for k, cls in enumerate(classes):
        recall = with_ci(lambda a, b, k=k: recall_score(a == k, b == k, zero_division=np.nan), y, pred, resamples)
        print(f"  recall {cls} (n={int((y == k).sum())}): {recall}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (with model/ and splits.parquet)")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--ensemble", action="store_true", help="also report the runs' mean probabilities")
    args = ap.parse_args()
    scored = {run: validation_probs(run) for run in args.runs}
    for run, (val, probs, classes) in scored.items():
        report(run, val.label.map(classes.index).to_numpy(), probs, classes, args.resamples)
    if args.ensemble:
        val, _, classes = scored[args.runs[0]]
        for run, (v, _, c) in scored.items():
            if list(v.key) != list(val.key) or c != classes:
                raise SystemExit(f"{run}: validation rows or classes differ from {args.runs[0]}'s; "
                                 "an ensemble needs one split")
        y = val.label.map(classes.index).to_numpy()
        members = [probs for _, probs, _ in scored.values()]
        mean = np.mean(members, axis=0)
        report("mean of " + " + ".join(args.runs), y, mean, classes, args.resamples)
        paired_gain(y, mean, members, args.resamples)


def paired_gain(y: np.ndarray, ensemble: np.ndarray, members: list, n_resamples: int) -> None:
    """Ensemble minus the average single run, on the same resampled images each time: a gain the
    members' own spread explains is not a gain."""
    def gains(rows: np.ndarray) -> tuple[float, float]:
        f1 = macro_f1(y[rows], ensemble[rows].argmax(1)) - np.mean([macro_f1(y[rows], m[rows].argmax(1)) for m in members])
        nll = mean_log_loss(y[rows], ensemble[rows]) - np.mean([mean_log_loss(y[rows], m[rows]) for m in members])
        return f1, nll
    point = gains(np.arange(len(y)))
    spread = np.array([gains(rows) for rows in image_resamples(len(y), n_resamples)])
    low, high = np.percentile(spread, [2.5, 97.5], axis=0)
    print(f"ensemble minus mean single run: macro-F1 {point[0]:+.3f} ({low[0]:+.3f} to {high[0]:+.3f}), "
          f"log loss {point[1]:+.4f} ({low[1]:+.4f} to {high[1]:+.4f})")


if __name__ == "__main__":
    main()
