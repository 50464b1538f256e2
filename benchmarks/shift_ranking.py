"""Rank trained pneumonia recipes on validation under acquisition shifts, not only as it is.

    python benchmarks/shift_ranking.py RUN_DIR [RUN_DIR ...] [--out shift_ranking.csv]

Every recipe saturates on the training archive's own validation (family and patient parts: ROC AUC
~0.999), so those parts cannot rank recipes the way the held-back Kermany test did. This script asks
whether the same validation images, put through the acquisition shifts of `medclf.data.augment`
(gamma, contrast + blur, zoom), rank them better. Per run and condition: ROC AUC with a 95% stratified
bootstrap CI, specificity at 95% sensitivity (threshold set on that condition, so it does not depend
on each recipe's threshold rule), specificity at the run's stored threshold, and the mean calibrated
P(positive) of the normal films. Runs must share one validation split (compare like with like); the
script refuses runs whose validation rows differ. No Ray: images are decoded in this process.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pandas as pd
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medclf.data.augment import ACQUISITION_SHIFTS, acquisition_shift  # noqa: E402
from medclf.imaging.decode import decode  # noqa: E402
from medclf.report.metrics import binary_metrics, bootstrap_ci  # noqa: E402
from medclf.model.decision import choose_threshold  # noqa: E402
from medclf.model.artifact import load_artifact  # noqa: E402
from medclf.model.networks import class_probabilities
from medclf.imaging.preprocess import preprocess_gray, to_model_input  # noqa: E402
from medclf.train.inputs import validation_groups  # noqa: E402

CONDITIONS = ("as is", *ACQUISITION_SHIFTS)


def validation_rows(run_dir: str) -> pd.DataFrame:
    splits = pd.read_parquet(os.path.join(run_dir, "splits.parquet"))
    val = splits[splits.split == "val"]
    val = val.assign(path=[os.path.realpath(p) for p in val.path]).sort_values("path").reset_index(drop=True)
    return val.assign(group=validation_groups(val))


def positive_scores(model, card, x: torch.Tensor, batch: int = 128) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([class_probabilities(model(to_model_input(x[i:i + batch])), card.temperature)
                               [:, card.positive_index].numpy() for i in range(0, len(x), batch)])


def rank_run(run_dir: str, val: pd.DataFrame, n_resamples: int) -> list[dict]:
    model, card = load_artifact(os.path.join(run_dir, "model"))
    model.eval()
    spec = card.preprocess_spec
    pixels = torch.from_numpy(np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec)
                                        for p in val.path]))
    y = (val.label == card.positive_class).astype(int).to_numpy()
    print(f"[shift] {run_dir}: {len(val)} validation images decoded; scoring the conditions", flush=True)
    rows = []
    for group in ("family", "patient"):
        keep = np.array(val.group == group)
        if not keep.any():
            continue
        for kind in CONDITIONS if group == "family" else ("as is",):
            p = positive_scores(model, card, acquisition_shift(pixels[keep], kind, spec.mean, spec.std))
            yy = y[keep]
            ci = bootstrap_ci(yy, p, card.threshold, n_resamples=n_resamples).set_index("metric")
            at_95 = binary_metrics(yy, p, choose_threshold(yy, p, "target_sensitivity", 0.95))
            rows.append({
                "run": os.path.basename(os.path.normpath(run_dir)), "part": group, "condition": kind,
                "n": int(keep.sum()), "roc_auc": ci.loc["roc_auc", "estimate"],
                "roc_auc_low": ci.loc["roc_auc", "ci_low"], "roc_auc_high": ci.loc["roc_auc", "ci_high"],
                "spec_at_sens95": at_95["specificity"],
                "spec_at_stored": ci.loc["specificity", "estimate"],
                "sens_at_stored": ci.loc["sensitivity", "estimate"],
                "mean_p_normal": float(p[yy == 0].mean()),
                "threshold": card.threshold, "arch": card.arch, "image_size": spec.image_size,
            })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (jobs/train.py or benchmarks/train_pneumonia.py)")
    p.add_argument("--out", default="shift_ranking.csv")
    p.add_argument("--resamples", type=int, default=1000)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    vals = {r: validation_rows(r) for r in args.runs}
    first = vals[args.runs[0]]
    for r, v in vals.items():
        if list(v.path) != list(first.path) or list(v.group) != list(first.group):
            raise SystemExit(f"{r}: its validation rows differ from {args.runs[0]}'s; rank runs of one split")
    table = pd.DataFrame([row for r in args.runs for row in rank_run(r, first, args.resamples)])
    table.to_csv(args.out, index=False)

    family = table[table.part == "family"]
    worst = family[family.condition != "as is"].groupby("run").agg(
        worst_shift_auc=("roc_auc", "min"), worst_shift_spec_at_sens95=("spec_at_sens95", "min"),
        mean_shift_auc=("roc_auc", "mean"))
    as_is = table[table.condition == "as is"].pivot(index="run", columns="part", values="roc_auc").add_suffix("_auc")
    summary = as_is.join(worst).sort_values("worst_shift_auc", ascending=False)
    pd.set_option("display.width", 200)
    print(table.drop(columns=["arch", "threshold"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print()
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\nrows: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
