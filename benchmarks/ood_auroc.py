"""How well does `ood_score` tell a model's own kind of image from others? AUROC (95% bootstrap CI)
of in-domain held-in validation films vs each out-of-domain set, and the share of each set flagged
at the stored threshold, for several scores (Mahalanobis full / PCA, energy, 1 - max softmax).

    python benchmarks/ood_auroc.py --artifact RUN/model [--splits SPLITS]
        [--out /tmp/ood_bench] [--n 300] [--fit-group family] [--modalities CR DX]

The domain record is fitted with medclf.monitor.ood.add_domain on the `--fit-group` part of the run's
validation split (a COPY of the artifact, with domain.npz, goes to `--out`/model; the original is
never touched); in-domain test images are the other validation part, not used for fitting.
Out-of-domain sets: CT and MR slices of the pydicom + pydicom-data corpus (middle frame of
multi-frame files), phantom noise images (uniform, gaussian, constant, gradient, checkerboard,
blurred noise), and other modalities as JPEG/PNG (lung CT and breast ultrasound datasets: no
DICOM tag helps there). Every image goes through medclf.imaging.decode + preprocess_gray, as in scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medclf.config import load_config  # noqa: E402
from medclf.imaging.decode import DecodeError, decode  # noqa: E402
from medclf.report.metrics import bootstrap_ci  # noqa: E402
from medclf.model.artifact import load_artifact  # noqa: E402
from medclf.monitor.ood import _score, add_domain, features_and_logits, fit_gaussian, out_of_fold_scores  # noqa: E402
from medclf.imaging.preprocess import preprocess_gray  # noqa: E402


def images_of(folder: str, n: int, rng) -> list[str]:
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith((".png", ".jpg", ".jpeg")) and "_mask" not in f)
    return sorted(rng.choice(files, min(n, len(files)), replace=False).tolist())


def corpus_slices(modalities=("CT", "MR")) -> list[str]:
    """pydicom + pydicom-data files of these modalities that hold a decodable image."""
    import pydicom
    from pydicom.data import get_testdata_files

    out = []
    for path in sorted({f for f in get_testdata_files("*.dcm") if os.path.isfile(f)}):
        try:
            modality = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).get("Modality", ""))
        except Exception:
            continue
        if modality in modalities:
            out.append(path)
    return out


def noise_arrays(n: int, size: int, rng) -> list[np.ndarray]:
    """Phantom noise images in [0, 1]: six kinds, round robin."""
    yy, xx = np.mgrid[0:size, 0:size] / size

    def blurred():
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(rng.random((size, size)), sigma=rng.uniform(2, 12))
        return (img - img.min()) / (np.ptp(img) + 1e-9)

    kinds = [lambda: rng.random((size, size)),
             lambda: np.clip(rng.normal(0.5, 0.2, (size, size)), 0, 1),
             lambda: np.full((size, size), rng.random()),
             lambda: (np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy) / 1.5 + 0.1,
             lambda: ((xx * rng.integers(2, 16)).astype(int) + (yy * rng.integers(2, 16)).astype(int)) % 2 * 1.0,
             blurred]
    return [np.clip(kinds[i % len(kinds)](), 0, 1).astype(np.float32) for i in range(n)]


def preprocess_files(paths: list[str], spec) -> tuple[np.ndarray, list[str]]:
    xs, kept = [], []
    for p in paths:
        try:
            xs.append(preprocess_gray(decode(open(p, "rb").read(), p).image, spec))
            kept.append(p)
        except DecodeError:
            pass  # a corrupt corpus file is the decode benchmark's business, not this one
    return np.stack(xs), kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True, help="a trained model artifact folder (e.g. runs/<id>/model)")
    ap.add_argument("--splits", default=None, help="the run's splits.parquet (default: beside the artifact)")
    ap.add_argument("--out", default="/tmp/ood_bench")
    ap.add_argument("--n", type=int, default=300, help="images per set")
    ap.add_argument("--fit-group", default="family", help="val_group the domain is fitted on")
    ap.add_argument("--modalities", nargs="*", default=["CR", "DX"])
    ap.add_argument("--quantile", type=float, default=0.99)
    ap.add_argument("--pca", type=int, nargs="*", default=[64, 256])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--reuse-features", action="store_true", help="take --out/features.npz of an earlier run")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t0 = time.time()

    splits = pd.read_parquet(args.splits or os.path.join(os.path.dirname(args.artifact), "splits.parquet"))
    val = splits[splits.split == "val"]
    fit = val[val.val_group == args.fit_group].sample(n=min(2 * args.n, (val.val_group == args.fit_group).sum()),
                                                      random_state=0)
    held = val[val.val_group != args.fit_group]
    held = held.sample(n=min(args.n, len(held)), random_state=0)
    cfg = load_config(None, [f"data.modalities=[{', '.join(args.modalities)}]", f"ood.quantile={args.quantile}"])
    guarded = os.path.join(args.out, "model")
    domain = add_domain(args.artifact, guarded, cfg, list(fit.path), list(fit.label))
    model, card = load_artifact(guarded)
    spec = card.preprocess_spec
    print(f"domain fitted on {len(fit)} {args.fit_group} validation images in {time.time() - t0:.0f}s -> {guarded}: "
          f"{domain.record.model_dump(exclude={'input_stats'})}", flush=True)

    sets: dict[str, np.ndarray] = {}
    x, _ = preprocess_files(list(held.path), spec)
    sets["in-domain (held-in validation chest films)"] = x
    x, kept = preprocess_files(corpus_slices(), spec)
    sets[f"CT/MR slices, pydicom corpus ({len(kept)} files)"] = x
    sets["phantom noise (6 kinds, 512 px)"] = np.stack([preprocess_gray(a, spec) for a in noise_arrays(args.n, 512, rng)])
    sets["lung CT (JPEG)"] = preprocess_files(images_of(os.path.join(args.data, "lung_ct"), args.n, rng), spec)[0]
    sets["breast ultrasound (PNG)"] = preprocess_files(images_of(os.path.join(args.data, "breast_us"), args.n, rng),
                                                       spec)[0]
    print(f"sets decoded in {time.time() - t0:.0f}s: " + ", ".join(f"{k}: {len(v)}" for k, v in sets.items()),
          flush=True)

    # Features once per set; every score variant is computed from them.
    fit_y = np.array([card.classes.index(v) for v in fit.label])
    cached = os.path.join(args.out, "features.npz")
    if args.reuse_features and os.path.exists(cached):
        with np.load(cached) as z:
            feats = {name: (z[f"f{i}"], z[f"l{i}"]) for i, name in enumerate(sets)}
            fit_f, fit_l = z["fit_f"], z["fit_l"]
        sets = {}
    else:
        fit_f, fit_l = features_and_logits(model, card.arch, np.stack(preprocess_files(list(fit.path), spec)[0]))
        feats = {}
    print(f"fit-set features in {time.time() - t0:.0f}s", flush=True)
    for name, x in sets.items():
        feats[name] = features_and_logits(model, card.arch, x)
        print(f"{name}: features in {time.time() - t0:.0f}s", flush=True)
    np.savez(cached, fit_f=fit_f, fit_l=fit_l, fit_y=fit_y,
             **{f"f{i}": f for i, (f, _) in enumerate(feats.values())},
             **{f"l{i}": lg for i, (_, lg) in enumerate(feats.values())})  # to re-analyse without the model

    variants = {"mahalanobis (all 1280 dims)": ("mahalanobis", None),
                **{f"mahalanobis (PCA {k})": ("mahalanobis", k) for k in args.pca},
                "energy": ("energy", None), "max_softmax": ("max_softmax", None)}
    rows = []
    for variant, (kind, pca) in variants.items():
        arrays = fit_gaussian(fit_f, fit_y, pca) if kind == "mahalanobis" else {}
        threshold = float(np.quantile(out_of_fold_scores(kind, fit_f, fit_l, fit_y, pca), args.quantile))
        scores = {name: _score(kind, arrays, f, lg) for name, (f, lg) in feats.items()}
        inside_name = next(iter(feats))
        inside = scores[inside_name]
        rows.append({"score": variant, "set": inside_name, "n": len(inside), "auroc": None, "ci": None,
                     "flagged": float((inside > threshold).mean())})
        for name, s in list(scores.items())[1:]:
            y = np.r_[np.zeros(len(inside)), np.ones(len(s))]
            # bootstrap_ci wants probabilities: a monotone map (AUROC unchanged) with the threshold at 0.5
            z = np.r_[inside, s] - threshold
            p = 1 / (1 + np.exp(-np.clip(z / (np.std(z) + 1e-12), -50, 50)))
            ci = bootstrap_ci(y, p, 0.5, args.resamples, seed=0).set_index("metric")
            rows.append({"score": variant, "set": name, "n": len(s), "auroc": ci.loc["roc_auc", "estimate"],
                         "ci": (ci.loc["roc_auc", "ci_low"], ci.loc["roc_auc", "ci_high"]),
                         "flagged": float((s > threshold).mean())})
    table = pd.DataFrame(rows)
    os.makedirs(args.out, exist_ok=True)
    table.to_json(os.path.join(args.out, "ood_auroc.json"), orient="records", indent=2)
    print(f"\nmodel {card.model_id} ({args.artifact}); threshold = {args.quantile:g} quantile of out-of-fold "
          f"scores on {len(fit)} {args.fit_group} validation images; {time.time() - t0:.0f}s in all\n")
    print("| score | set | n | AUROC (95% CI) | flagged at threshold |")
    print("|---|---|---|---|---|")
    for r in rows:
        auc = "-" if r["auroc"] is None else f"{r['auroc']:.3f} ({r['ci'][0]:.3f}-{r['ci'][1]:.3f})"
        print(f"| {r['score']} | {r['set']} | {r['n']} | {auc} | {100 * r['flagged']:.1f}% |")
    print(json.dumps({"stored_record": domain.record.model_dump()}, default=float))


if __name__ == "__main__":
    main()
