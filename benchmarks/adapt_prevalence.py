"""Issue 32: does label-free BatchNorm adaptation carry the archive's class prevalence into the model's
operating point, and does re-weighting the sample to the training prevalence (EM prior, Saerens et al.
2002; medclf.model.prior_shift.prevalence_weights) stop that?

Archives are drawn from one validation part of a training run at several prevalences (seeded, without
replacement). Drawing from one part changes the prevalence and nothing else (p(x|y) is the same), so the
unadapted model's sensitivity and specificity at its stored threshold do not move with it, and a sound
adaptation should not make them move either. Each archive is scored as it is and under one acquisition
shift (medclf.data.augment), three ways: `none`, `bn` (statistics of a seeded sample of the archive, as
`score.adapt: bn` fits them) and `bn weighted` (the same sample, each image weighted by the unadapted
model's EM-adjusted posteriors to the training split's class shares). Labels only score.

    nice python benchmarks/adapt_prevalence.py --model RUN/model --splits RUN/splits.parquet --out OUT

Output: OUT/adapt_prevalence.csv and .md (AUC, sensitivity, specificity with 95% stratified bootstrap CIs,
and the EM estimate of each archive's prevalence).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.adaptation import load_validation, probabilities  # noqa: E402
from medclf.data.augment import acquisition_shift  # noqa: E402
from medclf.imaging.decode import decode  # noqa: E402
from medclf.imaging.preprocess import preprocess_gray  # noqa: E402
from medclf.model.adapt import fit_profile  # noqa: E402
from medclf.model.artifact import load_artifact  # noqa: E402
from medclf.model.prior_shift import calibration_prior, training_prior  # noqa: E402
from medclf.report.metrics import bootstrap_ci  # noqa: E402


def draw(y: np.ndarray, n: int, prevalence: float, seed: int) -> np.ndarray:
    """Indices of an archive of `n` images with round(n * prevalence) positives, seeded."""
    rng = np.random.default_rng(seed)
    k = round(n * prevalence)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if k > len(pos) or n - k > len(neg):
        raise SystemExit(f"an archive of {n} at prevalence {prevalence} needs {k} positives and {n - k} negatives; "
                         f"the part has {len(pos)} and {len(neg)}")
    return np.sort(np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, n - k, replace=False)]))


def measure(y, p, threshold, resamples) -> dict:
    ci = bootstrap_ci(y, p, threshold, resamples, seed=0).set_index("metric")
    return {m: (ci.loc[m, "estimate"], ci.loc[m, "ci_low"], ci.loc[m, "ci_high"])
            for m in ("roc_auc", "sensitivity", "specificity")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--splits", required=True)
    ap.add_argument("--part", default="family")
    ap.add_argument("--prevalence", type=float, nargs="+", default=[0.25, 0.5, 0.8])
    ap.add_argument("--n", type=int, default=400, help="images per archive")
    ap.add_argument("--sample", type=int, default=300, help="adaptation sample (score.adapt_sample)")
    ap.add_argument("--shifts", nargs="+", default=["as is", "low contrast + blur"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_adapt_prevalence")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, card = load_artifact(args.model)
    spec, pos = card.preprocess_spec, card.positive_index
    pi_cal, pi_train = calibration_prior(card), training_prior(card)
    val = load_validation(args.splits, args.part, None, 0)
    y_all = (val["label"] == card.positive_class).to_numpy().astype(int)
    start = time.time()
    x_all = torch.from_numpy(np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec)
                                       for p in val["path"]]))
    print(f"{len(val)} {args.part} images decoded in {time.time() - start:.0f}s; model {card.model_id}, threshold "
          f"{card.threshold:.4f}; calibration prior {pi_cal[pos]:.3f}, training prior {pi_train[pos]:.3f}", flush=True)
    rows = []
    for seed in args.seeds:
        for prevalence in args.prevalence:
            idx = draw(y_all, args.n, prevalence, seed)
            y = y_all[idx]
            for shift in args.shifts:
                x = x_all[idx] if shift == "as is" else acquisition_shift(x_all[idx], shift, spec.mean, spec.std)
                pick = np.sort(np.random.default_rng(seed).permutation(len(x))[:args.sample])
                answers = {"none": probabilities(model, x, card.temperature)[:, pos]}
                for method, weighting in (("bn", "none"), ("bn weighted", "prior")):
                    adapted = copy.deepcopy(model)
                    profile, _ = fit_profile(adapted, card, x[pick].numpy(), seed, weighting=weighting)
                    answers[method] = probabilities(adapted, x, card.temperature)[:, pos]
                how = profile.extra  # the weighted fit's record: EM's estimate of the sample's prevalence
                for method, p in answers.items():
                    m = measure(y, p, card.threshold, args.resamples)
                    rows.append({"seed": seed, "prevalence": prevalence, "shift": shift, "method": method,
                                 "n": len(y), "em_prevalence": how["sample_prior"][pos],
                                 "weight_range": "-".join(f"{v:.2f}" for v in how["weight_range"]),
                                 **{f"{k}{s}": v[i] for k, v in m.items() for i, s in enumerate(("", "_lo", "_hi"))}})
                print(f"seed {seed} prevalence {prevalence} {shift}: EM {how['sample_prior'][pos]:.3f}; " + "; ".join(
                    f"{r['method']} AUC {r['roc_auc']:.4f} sens {r['sensitivity']:.3f} spec {r['specificity']:.3f}"
                    for r in rows[-3:]) + f" ({time.time() - start:.0f}s)", flush=True)
    table = pd.DataFrame(rows)
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "adapt_prevalence.csv"), index=False)
    text = markdown(table, card, args)
    with open(os.path.join(args.out, "adapt_prevalence.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def markdown(table: pd.DataFrame, card, args) -> str:
    def cell(r, m):
        return f"{r[m]:.3f} ({r[m + '_lo']:.3f}–{r[m + '_hi']:.3f})"

    lines = [f"Model {card.model_id}, {args.part} validation part, archives of {args.n} images, bn sample "
             f"{args.sample}, threshold {card.threshold:.4f}; 95% stratified bootstrap CIs ({args.resamples}).", "",
             "| seed | prevalence | shift | adapt | EM prevalence | ROC AUC | sensitivity | specificity |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['seed']} | {r['prevalence']} | {r['shift']} | {r['method']} | {r['em_prevalence']:.3f} | "
                     f"{cell(r, 'roc_auc')} | {cell(r, 'sensitivity')} | {cell(r, 'specificity')} |")
    lines += ["", "Spread over prevalences (max - min), mean over seeds:", "",
              "| shift | adapt | sensitivity spread | specificity spread | mean AUC |", "|---|---|---|---|---|"]
    for (shift, method), g in table.groupby(["shift", "method"], sort=False):
        spread = g.groupby("seed").agg(s=("sensitivity", np.ptp), c=("specificity", np.ptp)).mean()
        lines.append(f"| {shift} | {method} | {spread['s']:.3f} | {spread['c']:.3f} | {g['roc_auc'].mean():.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
