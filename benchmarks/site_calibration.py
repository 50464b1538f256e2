"""Few-shot site calibration and the EM prior on the pneumonia model's family-held-out validation part,
scored as a stand-in new archive, as it is and under each acquisition shift of medclf.data.augment.

    # 1. raw logits of every family-validation film under each condition (GPU if there is one)
    python benchmarks/site_calibration.py logits --run RUN_DIR --out logits.npz
    #    or, for a machine without ../shared: pack the films + model + code, run `logits` there
    python benchmarks/site_calibration.py pack --run RUN_DIR --dest FOLDER
    python FOLDER/code/benchmarks/site_calibration.py logits --packed FOLDER --out logits.npz
    # 2. the analysis (CPU, seconds to minutes)
    python benchmarks/site_calibration.py analyse --logits logits.npz --model RUN_DIR/model --out table.csv

Rows per condition (docs/site_calibration.md has the shipping rules, written before the run):
  none          the card's temperature and threshold on all films; 95% CI: stratified bootstrap
  EM prior      label-free: prevalence re-estimated by EM (medclf.model.prior_shift), the stored
                threshold compared against Bayes-adjusted posteriors; 95% CI: bootstrap
  k=30/60/120   `medclf calibrate`'s fit (medclf.model.site_fit.fit, the model's own threshold rule,
                map auto) on k films drawn at random, judged on the rest; repeated draws; the interval
                is the 2.5-97.5 percentile over draws (what one site could get), with the paired
                difference to `none` on the same rest
  k=60 T-only   as k=60 with map=temperature (does the Platt option help?)
  k=60 keep     as k=60, the model's threshold kept (does re-choosing the threshold help?)
Also the EM estimate on subsamples of known prevalence (0.3 and 0.8), per condition.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONDITIONS_NOTE = "as is = the family validation part the card's temperature and threshold were chosen on"


def family_rows(run_dir: str) -> pd.DataFrame:
    splits = pd.read_parquet(os.path.join(run_dir, "splits.parquet"))
    rows = splits[(splits.split == "val") & (splits.val_group == "family")]
    return rows.sort_values("path").reset_index(drop=True)[["path", "label"]]


def cmd_pack(args) -> int:
    """Copy the family films, the model and this repo's medclf + benchmarks into `dest`."""
    rows = family_rows(args.run)
    os.makedirs(os.path.join(args.dest, "images"), exist_ok=True)
    names = []
    for i, p in enumerate(rows.path):
        name = f"{i:05d}{os.path.splitext(p)[1]}"
        shutil.copyfile(p, os.path.join(args.dest, "images", name))
        names.append(f"images/{name}")
    rows.assign(path=names).to_parquet(os.path.join(args.dest, "rows.parquet"), index=False)
    shutil.copytree(os.path.join(args.run, "model"), os.path.join(args.dest, "model"), dirs_exist_ok=True)
    for sub in ("medclf", "benchmarks"):
        shutil.copytree(os.path.join(ROOT, sub), os.path.join(args.dest, "code", sub), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    print(f"packed {len(rows)} films + model + code -> {args.dest}")
    return 0


def cmd_logits(args) -> int:
    import torch

    from medclf.data.augment import ACQUISITION_SHIFTS, acquisition_shift
    from medclf.imaging.decode import decode
    from medclf.imaging.preprocess import preprocess_gray, to_model_input
    from medclf.model.artifact import load_artifact

    if args.packed:
        rows = pd.read_parquet(os.path.join(args.packed, "rows.parquet"))
        paths = [os.path.join(args.packed, p) for p in rows.path]
        model_path = os.path.join(args.packed, "model")
    else:
        rows = family_rows(args.run)
        paths, model_path = list(rows.path), os.path.join(args.run, "model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, card = load_artifact(model_path, device)
    spec = card.preprocess_spec
    pixels = torch.from_numpy(np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec) for p in paths]))
    conditions = ["as is", *ACQUISITION_SHIFTS]
    out = np.zeros((len(conditions), len(paths), len(card.classes)), np.float32)
    with torch.inference_mode():  # float32 as scoring on CPU does (no autocast)
        for c, kind in enumerate(conditions):
            for i in range(0, len(paths), 256):
                x = acquisition_shift(pixels[i:i + 256].to(device), kind, spec.mean, spec.std)
                out[c, i:i + 256] = model(to_model_input(x)).float().cpu().numpy()
            print(f"[logits] {kind}: {len(paths)} films on {device}", flush=True)
    y = np.array([card.classes.index(lab) for lab in rows.label])
    np.savez(args.out, logits=out, y=y, conditions=np.array(conditions), model_id=card.model_id)
    print(f"-> {args.out}")
    return 0


# ------------------------------------------------------------------ analysis

def ece_fast(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """medclf.model.calibration.expected_calibration_error, vectorised (same bins: equal width, last closed)."""
    b = np.clip(np.digitize(p, np.linspace(0, 1, n_bins + 1)[1:-1]), 0, n_bins - 1)
    sp = np.bincount(b, weights=p, minlength=n_bins)
    sy = np.bincount(b, weights=y, minlength=n_bins)
    return float(np.abs(sy - sp).sum() / len(y))


def point_and_ci(y: np.ndarray, p: np.ndarray, threshold: float, resamples: int, seed: int = 0) -> dict:
    """AUC, sensitivity, specificity (medclf's stratified bootstrap) and ECE (same resamples' scheme)."""
    from medclf.report.metrics import bootstrap_ci

    ci = bootstrap_ci(y, p, threshold, n_resamples=resamples, seed=seed).set_index("metric")
    out = {}
    for name, key in (("auc", "roc_auc"), ("sens", "sensitivity"), ("spec", "specificity")):
        out[name] = ci.loc[key, "estimate"]
        out[f"{name}_lo"], out[f"{name}_hi"] = ci.loc[key, "ci_low"], ci.loc[key, "ci_high"]
    rng = np.random.default_rng(seed + 1)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    eces = [ece_fast(y[idx], p[idx]) for idx in
            (np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(resamples))]
    out["ece"] = ece_fast(y, p)
    out["ece_lo"], out["ece_hi"] = np.percentile(eces, [2.5, 97.5])
    return out


def over_draws(values: list[dict]) -> dict:
    """Mean and 2.5-97.5 percentile over draws of each figure."""
    df = pd.DataFrame(values)
    out = {}
    for col in df.columns:
        v = df[col].dropna().to_numpy(float)
        out[col] = float(v.mean()) if len(v) else np.nan
        out[f"{col}_lo"], out[f"{col}_hi"] = (np.percentile(v, [2.5, 97.5]) if len(v) else (np.nan, np.nan))
    return out


class _CountedWarnings(logging.Filter):
    """Swallows a logger's records and counts them: the fit warns on every perfectly separated draw."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record) -> bool:
        self.count += 1
        return False


def few_shot(logits, y, card, k: int, draws: int, seed: int, **fit_kwargs) -> dict:
    from sklearn.metrics import roc_auc_score

    from medclf.model.site_calibration import SiteCalibrationError
    from medclf.model.site_fit import fit

    pi = card.positive_index
    none_p = _softmax(logits / card.temperature)[:, pi]
    rng = np.random.default_rng(seed)
    results, refused, platt = [], 0, 0
    quiet = _CountedWarnings()
    calibration_log = logging.getLogger("medclf.model.calibration")
    calibration_log.addFilter(quiet)
    try:
        for _ in range(draws):
            idx = rng.permutation(len(y))
            fit_idx, rest = idx[:k], idx[k:]
            try:
                cal = fit(logits[fit_idx], y[fit_idx], card, n_resamples=0, **fit_kwargs)
            except SiteCalibrationError:
                refused += 1
                continue
            platt += cal.map == "platt"
            p = cal.probabilities(logits[rest])[:, pi]
            yr = (y[rest] == pi).astype(int)
            called, base = p >= cal.threshold, none_p[rest] >= card.threshold
            r = {"auc": roc_auc_score(yr, p), "sens": called[yr == 1].mean(), "spec": 1 - called[yr == 0].mean(),
                 "ece": ece_fast(yr, p), "threshold": cal.threshold, "temperature": cal.temperature}
            r.update(d_sens=r["sens"] - base[yr == 1].mean(), d_spec=r["spec"] - (1 - base[yr == 0].mean()),
                     d_ece=r["ece"] - ece_fast(yr, none_p[rest]))
            results.append(r)
    finally:
        calibration_log.removeFilter(quiet)
    out = over_draws(results)
    out.update(draws=len(results), refused=refused, platt_chosen=platt, calibration_warnings=quiet.count)
    return out


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def em_rows(logits, y, card, resamples: int, seed: int) -> tuple[dict, list[dict]]:
    from medclf.model.prior_shift import calibration_prior, em_prior, moved_threshold

    pi = card.positive_index
    probs = _softmax(logits / card.temperature)
    pi0 = calibration_prior(card)
    est = em_prior(probs, pi0)
    moved = moved_threshold(card.threshold, pi, pi0, est.prior)
    yp = (y == pi).astype(int)
    row = point_and_ci(yp, probs[:, pi], moved, resamples, seed)
    row["ece"] = ece_fast(yp, est.posteriors[:, pi])  # the re-weighted posteriors' calibration
    row.pop("ece_lo"), row.pop("ece_hi")
    row.update(threshold=moved, prior_est=float(est.prior[pi]), prior_true=float(yp.mean()),
               prior_train=float(pi0[pi]))
    known = []
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(yp == 1), np.flatnonzero(yp == 0)
    for prevalence in (0.3, 0.8):
        n = int(min(400, len(pos) / prevalence, len(neg) / (1 - prevalence)))
        n_pos = int(round(prevalence * n))
        errs = []
        for _ in range(50):
            idx = np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n - n_pos, replace=False)])
            errs.append(em_prior(probs[idx], pi0).prior[pi] - prevalence)
        errs = np.array(errs)
        known.append({"prevalence": prevalence, "n": n, "em_error_mean": float(errs.mean()),
                      "em_error_lo": float(np.percentile(errs, 2.5)), "em_error_hi": float(np.percentile(errs, 97.5)),
                      "naive_error_mean": float(np.mean([probs[np.concatenate([rng.choice(pos, n_pos, replace=False),
                                                                               rng.choice(neg, n - n_pos, replace=False)]),
                                                               pi].mean() - prevalence for _ in range(20)]))})
    return row, known


def analyse_condition(logits, y, card, cond: str, args) -> tuple[list, list]:
    pi = card.positive_index
    p = _softmax(logits / card.temperature)[:, pi]
    rows = [{"condition": cond, "method": "none", "n": len(y), "threshold": card.threshold,
             **point_and_ci((y == pi).astype(int), p, card.threshold, args.resamples)}]
    em, known = em_rows(logits, y, card, args.resamples, 0)
    rows.append({"condition": cond, "method": "EM prior", "n": len(y), **em})
    for k in args.k:
        rows.append({"condition": cond, "method": f"k={k}", "n": len(y) - k,
                     **few_shot(logits, y, card, k, args.draws, 100 + k)})
        print(f"[analyse] {cond} k={k} done", flush=True)
    if 60 in args.k:
        rows.append({"condition": cond, "method": "k=60 T-only", "n": len(y) - 60,
                     **few_shot(logits, y, card, 60, args.draws, 160, map_choice="temperature")})
        rows.append({"condition": cond, "method": "k=60 keep", "n": len(y) - 60,
                     **few_shot(logits, y, card, 60, args.draws, 160, rule="keep")})
    return rows, [{"condition": cond, **k} for k in known]


def cmd_analyse(args) -> int:
    from medclf.model.artifact import load_card

    data = np.load(args.logits)
    card = load_card(args.model)
    if str(data["model_id"]) != card.model_id:
        raise SystemExit(f"{args.logits} holds logits of {data['model_id']}, not {card.model_id}")
    conditions = [(c, str(cond)) for c, cond in enumerate(data["conditions"])
                  if not args.conditions or str(cond) in args.conditions]
    jobs = [(data["logits"][c].astype(np.float64), data["y"], card, cond, args) for c, cond in conditions]
    if args.jobs > 1:  # one process per condition (the draws are independent)
        from multiprocessing import Pool

        with Pool(min(args.jobs, len(jobs))) as pool:
            done = pool.starmap(analyse_condition, jobs)
    else:
        done = [analyse_condition(*job) for job in jobs]
    rows = [r for part, _ in done for r in part]
    known_rows = [r for _, part in done for r in part]
    table = pd.DataFrame(rows)
    table.to_csv(args.out, index=False)
    known = pd.DataFrame(known_rows)
    known.to_csv(os.path.splitext(args.out)[0] + "_em_known_prior.csv", index=False)
    pd.set_option("display.width", 250)
    show = ["condition", "method", "n"] + [c for m in ("auc", "sens", "spec", "ece") for c in (m, f"{m}_lo", f"{m}_hi")]
    print(table[show].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    extra = [c for c in ("threshold", "prior_est", "prior_true", "d_sens", "d_spec", "d_ece", "d_ece_lo", "d_ece_hi",
                         "draws", "refused", "platt_chosen") if c in table]
    print(table[["condition", "method", *extra]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(known.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"rows -> {args.out}; note: {CONDITIONS_NOTE}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--run", required=True)
    a.add_argument("--dest", required=True)
    a = sub.add_parser("logits")
    a.add_argument("--run")
    a.add_argument("--packed")
    a.add_argument("--out", required=True)
    a = sub.add_parser("analyse")
    a.add_argument("--logits", required=True)
    a.add_argument("--model", required=True)
    a.add_argument("--out", default="site_calibration.csv")
    a.add_argument("--k", nargs="+", type=int, default=[30, 60, 120])
    a.add_argument("--draws", type=int, default=100)
    a.add_argument("--resamples", type=int, default=1000)
    a.add_argument("--conditions", nargs="*")
    a.add_argument("--jobs", type=int, default=1, help="processes (one per condition)")
    args = p.parse_args(argv)
    return {"pack": cmd_pack, "logits": cmd_logits, "analyse": cmd_analyse}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
