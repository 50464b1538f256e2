"""Validation accuracy, macro-F1 and per-class recall of trained multi-class runs, with 95% image
bootstrap CIs (1,000 resamples, seed 0): each run's model (with its temperature) scores its own
validation split (`splits.parquet`) through the shared decode + preprocessing path.

    python benchmarks/multiclass_ci.py runs/lung-320-lr3e4 runs/breast-320
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score, recall_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medclf.decode import decode  # noqa: E402
from medclf.models import class_probabilities, load_artifact  # noqa: E402
from medclf.preprocess import preprocess_gray, to_model_input  # noqa: E402


def with_ci(metric, y: np.ndarray, pred: np.ndarray, resamples: list) -> str:
    values = [metric(y[i], pred[i]) for i in resamples]
    return f"{metric(y, pred):.3f} ({np.percentile(values, 2.5):.3f}-{np.percentile(values, 97.5):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (with model/ and splits.parquet)")
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    for run in args.runs:
        model, card = load_artifact(os.path.join(run, "model"))
        splits = pd.read_parquet(os.path.join(run, "splits.parquet"))
        val = splits[splits.split == "val"]
        x = np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, card.preprocess_spec) for p in val.path])
        with torch.inference_mode():
            probs = class_probabilities(model.eval()(to_model_input(torch.from_numpy(x))), card.temperature).numpy()
        y, pred = val.label.map(card.classes.index).to_numpy(), probs.argmax(1)
        rng = np.random.default_rng(0)
        resamples = [rng.choice(len(y), len(y)) for _ in range(args.resamples)]
        print(f"{run}: n={len(y)} accuracy {with_ci(accuracy_score, y, pred, resamples)} "
              f"macro-F1 {with_ci(lambda a, b: f1_score(a, b, average='macro'), y, pred, resamples)}")
        for k, name in enumerate(card.classes):
            recall = with_ci(lambda a, b, k=k: recall_score(a == k, b == k), y, pred, resamples)
            print(f"  recall {name} (n={int((y == k).sum())}): {recall}")


if __name__ == "__main__":
    main()
