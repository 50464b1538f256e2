"""Issue 32 item 4: label-free BatchNorm adaptation (score.adapt=bn) vs none, measured on the
family-held-out validation part of a training run scored as a new archive, as it is and under each
acquisition shift of medclf.data.augment at two strengths (the shift itself, and a stronger one).

For each set: ROC AUC, sensitivity and specificity at the model's stored threshold, and ECE, each
with a 95% stratified bootstrap CI (medclf.report.metrics.bootstrap_ci; ECE resampled the same way).
`bn` adapts on a seeded sample of that set's own images (score.adapt_sample, default 300), exactly as
scoring would (medclf.model.adapt.fit_profile); labels only score. The result table goes to --out
(CSV and Markdown) for docs/adaptation.md.

    nice python benchmarks/adaptation.py --model RUN/model --splits RUN/splits.parquet --out bench_adapt

Slow on a shared 2-core machine (EfficientNet-Lite0 at 224 px: several images/s): --limit N scores a
seeded, class-stratified subset of N validation images (say so when you report it).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medclf.data.augment import ACQUISITION_SHIFTS, acquisition_shift  # noqa: E402
from medclf.imaging.decode import decode  # noqa: E402
from medclf.imaging.preprocess import preprocess_gray, to_model_input  # noqa: E402
from medclf.model.adapt import fit_profile  # noqa: E402
from medclf.model.artifact import load_artifact  # noqa: E402
from medclf.model.networks import class_probabilities
from medclf.report.metrics import bootstrap_ci  # noqa: E402
from medclf.model.calibration import expected_calibration_error  # noqa: E402


def strong_shift(x: torch.Tensor, kind: str, mean: float, std: float) -> torch.Tensor:
    """The same shift, twice as far from 'as is' (gamma 0.7 -> 0.49, 1.4 -> 1.96; contrast x0.75 -> x0.5625
    with the blur applied twice; zoom 0.9 -> 0.81, 1.1 -> 1.21)."""
    from torchvision.transforms.v2 import functional as TF

    if kind.startswith("gamma"):
        v = (x * std + mean).clamp(0, 1).clamp_min(1e-6) ** (float(kind.split()[1]) ** 2)
        return (v - mean) / std
    if kind.startswith("zoom"):
        floor = x.amin(dim=(1, 2, 3), keepdim=True)
        scale = float(kind.split()[1]) ** 2
        return TF.affine(x - floor, angle=0.0, translate=[0, 0], scale=scale, shear=[0.0], fill=0.0) + floor
    return acquisition_shift(acquisition_shift(x, kind, mean, std), kind, mean, std)


def shifted_sets(x: torch.Tensor, mean: float, std: float, strong: bool = True):
    yield "as is", x
    for kind in ACQUISITION_SHIFTS:
        yield f"{kind} (x1)", acquisition_shift(x, kind, mean, std)
        if strong:
            yield f"{kind} (x2)", strong_shift(x, kind, mean, std)


def logits_of(model, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(to_model_input(x[i:i + batch])).float() for i in range(0, len(x), batch)])


def probabilities(model, x: torch.Tensor, temperature: float) -> np.ndarray:
    return class_probabilities(logits_of(model, x), temperature).numpy()


def ece_ci(y: np.ndarray, p: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Stratified bootstrap percentile CI of the ECE (the resampling bootstrap_ci uses)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    values = [expected_calibration_error(y[idx], p[idx]) for idx in
              (np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(resamples))]
    return tuple(np.percentile(values, [2.5, 97.5]))


def measure(name: str, method: str, y: np.ndarray, p: np.ndarray, threshold: float, resamples: int) -> dict:
    ci = bootstrap_ci(y, p, threshold, resamples, seed=0).set_index("metric")
    row = {"set": name, "adapt": method, "n": len(y)}
    for metric in ("roc_auc", "sensitivity", "specificity"):
        row[metric] = ci.loc[metric, "estimate"]
        row[f"{metric}_ci"] = (ci.loc[metric, "ci_low"], ci.loc[metric, "ci_high"])
    row["ece"] = expected_calibration_error(y, p)
    row["ece_ci"] = ece_ci(y, p, min(resamples, 300), 0)
    return row


def load_validation(splits: str, part: str, limit: int | None, seed: int) -> pd.DataFrame:
    df = pd.read_parquet(splits)
    df = df[(df["split"] == "val") & (df.get("val_group", pd.Series("patient", df.index)).fillna("patient") == part)]
    if df.empty:
        raise SystemExit(f"{splits}: no validation rows of part {part!r}")
    if limit and limit < len(df):
        frac = limit / len(df)
        keep = [g.sample(max(1, round(len(g) * frac)), random_state=seed).index for _, g in df.groupby("label")]
        df = df.loc[sorted(np.concatenate(keep))]
    return df.reset_index(drop=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model artifact folder")
    ap.add_argument("--splits", required=True, help="the training run's splits.parquet")
    ap.add_argument("--part", default="family", help="validation part (val_group): family or patient")
    ap.add_argument("--sample", type=int, default=300, help="adaptation sample per set (score.adapt_sample)")
    ap.add_argument("--limit", type=int, default=None, help="score a seeded stratified subset of this many images")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_adaptation")
    ap.add_argument("--strong", choices=["yes", "no"], default="yes", help="also the twice-as-far shifts")
    ap.add_argument("--methods", choices=["none,bn", "none"], default="none,bn",
                    help="'none' only: a model that is not adapted (an ensemble) or a member measured alone")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, card = load_artifact(args.model)
    if card.positive_index is None or card.threshold is None:
        raise SystemExit("a binary model with a stored threshold is needed")
    spec = card.preprocess_spec
    val = load_validation(args.splits, args.part, args.limit, args.seed)
    y = (val["label"] == card.positive_class).to_numpy().astype(int)
    start = time.time()
    x = torch.from_numpy(np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec) for p in val["path"]]))
    print(f"{len(val)} {args.part} validation images ({int(y.sum())} {card.positive_class}) decoded in "
          f"{time.time() - start:.0f}s; model {card.model_id}, threshold {card.threshold:.4f}", flush=True)
    # a candidate stored by benchmarks/refit_adaptation.py --operating-point (measured, rejected; the product ignores it)
    point = (card.adaptation or {}).get("operating_point")
    rows = []
    for name, xs in shifted_sets(x, spec.mean, spec.std, args.strong == "yes"):
        p_none = probabilities(model, xs, card.temperature)[:, card.positive_index]
        rows.append(measure(name, "none", y, p_none, card.threshold, args.resamples))
        if args.methods == "none":
            print(f"{name}: AUC none {rows[-1]['roc_auc']:.4f} ({time.time() - start:.0f}s)", flush=True)
            continue
        adapted = copy.deepcopy(model)
        pick = np.sort(np.random.default_rng(args.seed).permutation(len(xs))[:args.sample])
        profile, fit = fit_profile(adapted, card, xs[pick].numpy(), args.seed)
        z_bn = logits_of(adapted, xs)
        p_bn = class_probabilities(z_bn, card.temperature).numpy()[:, card.positive_index]
        rows.append(measure(name, "bn", y, p_bn, card.threshold, args.resamples))
        if point:  # the rejected candidate: temperature and threshold fitted on validation adapted to itself
            p_op = class_probabilities(z_bn, point["temperature"]).numpy()[:, card.positive_index]
            rows.append(measure(name, "bn + adapted operating point", y, p_op, point["threshold"], args.resamples))
        print(f"{name}: AUC none {rows[-2 - bool(point)]['roc_auc']:.4f} bn {rows[-1]['roc_auc']:.4f} "
              f"({len(fit.adapted)} layers adapted, {len(fit.skipped)} kept; {time.time() - start:.0f}s)", flush=True)
    table = pd.DataFrame(rows)
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "adaptation.csv"), index=False)
    with open(os.path.join(args.out, "adaptation.md"), "w") as f:
        f.write(markdown(table, card, args, len(val)))
    print(markdown(table, card, args, len(val)))
    return 0


def markdown(table: pd.DataFrame, card, args, n: int) -> str:
    def cell(row, metric, digits=3):
        lo, hi = row[f"{metric}_ci"]
        return f"{row[metric]:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"

    point = (card.adaptation or {}).get("operating_point") or {}
    adapted = (f" (adapted operating point: temperature {point['temperature']:.3f}, threshold {point['threshold']:.4f}, "
               f"{point.get('fitted_on', '')})" if point.get("threshold") is not None else "")
    lines = [f"Model {card.model_id}, {args.part}-held-out validation part ({n} images), threshold "
             f"{card.threshold:.4f}, temperature {card.temperature:.3f}{adapted}; bn sample {args.sample} per set, seed {args.seed}; 95% stratified bootstrap CIs "
             f"({args.resamples} resamples; ECE {min(args.resamples, 300)}).", "",
             "| set | adapt | ROC AUC | sensitivity | specificity | ECE |", "|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['set']} | {r['adapt']} | {cell(r, 'roc_auc')} | {cell(r, 'sensitivity')} | "
                     f"{cell(r, 'specificity')} | {cell(r, 'ece')} |")
    if "bn" not in set(table["adapt"]):
        return "\n".join(lines) + "\n"
    delta = table.pivot(index="set", columns="adapt", values="roc_auc")
    d = (delta["bn"] - delta["none"])
    lines += ["", f"AUC change bn - none: mean {d.mean():+.4f}, worst {d.min():+.4f} ({d.idxmin()}), "
                  f"as is {d.get('as is', math.nan):+.4f}"]
    wide = table.set_index(["set", "adapt"])
    for s in dict.fromkeys(table["set"]):  # shipping rule 3: bn's upper AUC bound below none's estimate
        if (s, "bn") in wide.index and wide.loc[(s, "bn"), "roc_auc_ci"][1] < wide.loc[(s, "none"), "roc_auc"]:
            lines.append(f"{s}: bn loses AUC beyond its CI")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
