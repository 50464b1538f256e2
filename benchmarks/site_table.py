"""Issue 32 item 4's one table: none vs bn vs bn + prior vs few-shot calibration (k = 30/60/120, and k = 60
on top of bn) vs an ensemble, on one model and one validation part, as it is and under each acquisition
shift of medclf.data.augment at two strengths. docs/adaptation.md has the rules, written before the run.

    PYTHONPATH=. python benchmarks/site_table.py --model RUN/model --splits RUN/splits.parquet \\
        --part patient --ensemble ENSEMBLE_ARTIFACT --out OUT

Rows per set:
  none        the card's temperature and threshold
  bn          statistics re-estimated on a seeded sample of the set's own films (scoring's fit_profile)
  bn + prior  bn's probabilities Bayes-adjusted to the prevalence EM estimates from them
              (medclf.model.prior_shift, as `medclf prior`), judged at the card's threshold
  k=30/60/120 `medclf calibrate`'s fit on k films drawn at random, judged on the rest, over --draws draws
              (benchmarks/site_calibration.py's few_shot); the interval is the 2.5-97.5 percentile over
              draws, what one site could get, not a bootstrap CI
  bn + k=60   the same fit on bn's logits (calibrate on top of a profile)
  ensemble    --ensemble's artifact, its own temperature and threshold
Every other interval: 95% stratified bootstrap (medclf.report.metrics.bootstrap_ci; ECE resampled alike).
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from adaptation import load_validation, logits_of, shifted_sets  # noqa: E402
from site_calibration import few_shot, point_and_ci  # noqa: E402

from medclf.imaging.decode import decode  # noqa: E402
from medclf.imaging.preprocess import preprocess_gray  # noqa: E402
from medclf.model.adapt import fit_profile  # noqa: E402
from medclf.model.artifact import load_artifact  # noqa: E402
from medclf.model.networks import class_probabilities  # noqa: E402
from medclf.model.prior_shift import calibration_prior, em_prior  # noqa: E402

METRICS = ("auc", "sens", "spec", "ece")


def bootstrap_row(name: str, method: str, y: np.ndarray, p: np.ndarray, threshold: float, resamples: int,
                  **extra) -> dict:
    return {"set": name, "method": method, "n": len(y), "interval": "bootstrap", "threshold": threshold,
            **point_and_ci(y, p, threshold, resamples), **extra}


def few_shot_row(name: str, method: str, logits: np.ndarray, labels: np.ndarray, card, k: int, draws: int,
                 seed: int) -> dict:
    r = few_shot(logits.astype(np.float64), labels, card, k, draws, seed)
    return {"set": name, "method": method, "n": len(labels) - k, "interval": f"over {r['draws']} draws",
            **{key: r[key] for m in METRICS for key in (m, f"{m}_lo", f"{m}_hi")},
            "threshold": r["threshold"], "refused": r["refused"], "d_ece": r["d_ece"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model artifact folder (binary, stored threshold)")
    ap.add_argument("--splits", required=True, help="the training run's splits.parquet")
    ap.add_argument("--part", default="patient", help="validation part (val_group): patient or family")
    ap.add_argument("--ensemble", help="an ensemble artifact to score on the same sets (its own operating point)")
    ap.add_argument("--sample", type=int, default=300, help="bn's adaptation sample per set (score.adapt_sample)")
    ap.add_argument("--k", nargs="+", type=int, default=[30, 60, 120])
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, help="a seeded class-stratified subset of this many films (a quick check)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strong", choices=["yes", "no"], default="yes", help="also the twice-as-far shifts")
    ap.add_argument("--out", default="site_table")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, card = load_artifact(args.model)
    if card.positive_index is None or card.threshold is None:
        raise SystemExit(f"{args.model}: a binary model with a stored threshold is needed")
    ensemble = load_artifact(args.ensemble) if args.ensemble else None
    if ensemble and (ensemble[1].classes != card.classes or ensemble[1].preprocess_spec != card.preprocess_spec):
        raise SystemExit(f"{args.ensemble}: its classes or preprocessing differ from {args.model}'s")
    pi, spec = card.positive_index, card.preprocess_spec
    val = load_validation(args.splits, args.part, args.limit, args.seed)
    labels = np.array([card.classes.index(label) for label in val["label"]])
    y = (labels == pi).astype(int)
    start = time.time()
    x = torch.from_numpy(np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec) for p in val["path"]]))
    print(f"{len(val)} {args.part} validation films ({int(y.sum())} {card.positive_class}); model {card.model_id}, "
          f"threshold {card.threshold:.4f}" + (f"; ensemble {ensemble[1].model_id}, threshold "
                                               f"{ensemble[1].threshold:.4f}" if ensemble else ""), flush=True)
    pi0 = calibration_prior(card)
    rows = []
    for name, xs in shifted_sets(x, spec.mean, spec.std, args.strong == "yes"):
        z_none = logits_of(model, xs).numpy()
        rows.append(bootstrap_row(name, "none", y, class_probabilities(torch.from_numpy(z_none), card.temperature)
                                  .numpy()[:, pi], card.threshold, args.resamples))
        adapted = copy.deepcopy(model)
        pick = np.sort(np.random.default_rng(args.seed).permutation(len(xs))[:args.sample])
        fit_profile(adapted, card, xs[pick].numpy(), args.seed)
        z_bn = logits_of(adapted, xs).numpy()
        p_bn = class_probabilities(torch.from_numpy(z_bn), card.temperature).numpy()
        rows.append(bootstrap_row(name, "bn", y, p_bn[:, pi], card.threshold, args.resamples))
        est = em_prior(p_bn, pi0)
        rows.append(bootstrap_row(name, "bn + prior", y, est.posteriors[:, pi], card.threshold, args.resamples,
                                  prior_est=float(est.prior[pi]), prior_true=float(y.mean())))
        for k in args.k:
            rows.append(few_shot_row(name, f"k={k}", z_none, labels, card, k, args.draws, 100 + k))
        if 60 in args.k:
            rows.append(few_shot_row(name, "bn + k=60", z_bn, labels, card, 60, args.draws, 160))
        if ensemble:
            ens_model, ens_card = ensemble
            p_ens = class_probabilities(logits_of(ens_model, xs), ens_card.temperature).numpy()[:, pi]
            rows.append(bootstrap_row(name, "ensemble", y, p_ens, ens_card.threshold, args.resamples))
        done = {r["method"]: r["auc"] for r in rows if r["set"] == name}
        print(f"{name}: AUC " + ", ".join(f"{m} {a:.4f}" for m, a in done.items())
              + f" ({time.time() - start:.0f}s)", flush=True)
    table = pd.DataFrame(rows)
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "site_table.csv"), index=False)
    text = markdown(table, card, ensemble[1] if ensemble else None, args, len(val))
    with open(os.path.join(args.out, "site_table.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def markdown(table: pd.DataFrame, card, ens_card, args, n: int) -> str:
    def cell(r, m):
        return f"{r[m]:.3f} ({r[f'{m}_lo']:.3f}–{r[f'{m}_hi']:.3f})"

    head = (f"Model {card.model_id} (threshold {card.threshold:.4f}, temperature {card.temperature:.3f})"
            + (f", ensemble {ens_card.model_id} (threshold {ens_card.threshold:.4f})" if ens_card else "")
            + f"; {args.part}-held-out validation part, {n} films; bn sample {args.sample}, seed {args.seed}; "
            f"few-shot {args.draws} draws; bootstrap {args.resamples} resamples.")
    lines = [head, "", "| set | method | n judged | ROC AUC | sensitivity | specificity | ECE | threshold | interval |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['set']} | {r['method']} | {r['n']} | {cell(r, 'auc')} | {cell(r, 'sens')} | "
                     f"{cell(r, 'spec')} | {cell(r, 'ece')} | {r['threshold']:.3f} | {r['interval']} |")
    wide = table.pivot(index="set", columns="method", values="auc")
    shifted = [s for s in wide.index if s != "as is"]
    lines += ["", "Mean AUC over the shifted sets (estimates averaged; the sets are the same films shifted, so no CI): "
              + ", ".join(f"{m} {wide.loc[shifted, m].mean():.4f}" for m in wide.columns)]
    if "k=60" in wide.columns:
        d = table[(table["method"] == "k=60") & (table["set"] != "as is")]
        lines.append(f"k=60 lowers mean ECE against none on the rest in {(d['d_ece'] < 0).sum()} of {len(d)} "
                     "shifted sets")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
