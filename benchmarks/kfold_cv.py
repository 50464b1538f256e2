"""k-fold cross-validation of one multi-class recipe: every image of the training archive is scored
once by a model that never saw it, so the figures rest on all the images (lung CT: 98 benign slices
instead of the 20 of one validation split) and the spread between folds shows the recipe's noise.

    python benchmarks/kfold_cv.py --config configs/lung_ct.yaml --folds 5 --run-root runs

Folds are drawn per label (stratified, seed 0) over the images the config lists, written as
manifests (`<run-root>/<prefix>-manifests/fold<k>.parquet`: fold k is the `val` split, the rest
`train`), and each fold is trained with `medclf train --manifest` (the config's recipe unchanged;
re-running resumes or skips finished folds). The held-out fold is the run's validation split, so
early stopping picks each fold model's epoch on the images it is then scored on: an optimistic bias
that `--set train.select_by=last` removes (on lung, keeping the last epoch instead scored +0.002,
-0.014 to +0.021: docs/benchmarks.md, session 17). Then each fold's model (with its temperature) scores
its own validation fold through the shared decode + preprocessing path (benchmarks/multiclass_ci.py),
and the pooled out-of-fold predictions give accuracy, macro-F1 and per-class recall with 95% image
bootstrap CIs (1,000 resamples, seed 0).

It also tests a decision rule argmax does not give: additive biases on the classes' log
probabilities, cross-fitted (for fold k, chosen to maximise macro-F1 on the other folds'
out-of-fold predictions, then applied to fold k), reported against argmax as a paired bootstrap
difference. `--baseline PREFIX` compares with another recipe's folds (the same manifests: same
seed, folds and data), paired on the same images. Like the shipped configs' split, folds are by
image: lung and breast file names carry no patient id, so slices of one patient can fall in two
folds and every figure is optimistic. `--set data.patient_block=20` draws lung folds by runs of
20 consecutive file numbers instead (a stand-in for patients: see docs/benchmarks.md).
`--hflip-tta` also scores the same models with test-time augmentation by mirror image
(`model.test_time_hflip`) and without, paired (and the baseline both ways, with `--baseline`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from medclf.config import load_config  # noqa: E402
from medclf.data.labelled import discover  # noqa: E402
from multiclass_ci import image_resamples, macro_f1, report, report_predictions, validation_probs  # noqa: E402

BIAS_GRID = np.round(np.arange(-1.5, 1.51, 0.25), 2)  # log-probability offsets per non-first class


def fold_manifests(config: str, overrides: list[str], folds: int, out_dir: str) -> list[str]:
    """One manifest per fold (absolute paths, label, split, patient_id), stratified by label. Folds
    are drawn by patient id (all of a patient's images in one fold; with data.patient_block, runs of
    consecutive slices); where every image is its own patient this is the image-level draw."""
    cfg = load_config(config, overrides)
    df = discover(cfg.data)
    df = df[df["split"] == cfg.data.train_split].reset_index(drop=True)
    rng = np.random.default_rng(0)
    patient_label = df.groupby("patient_id", sort=False)["label"].agg(lambda s: s.value_counts().index[0])
    fold_of = {}
    for label in sorted(patient_label.unique()):
        patients = rng.permutation(np.asarray(patient_label.index[patient_label == label]))
        fold_of.update(zip(patients, np.arange(len(patients)) % folds))
    fold = df["patient_id"].map(fold_of).to_numpy()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k in range(folds):
        manifest = df[["path", "label", "patient_id"]].assign(
            split=np.where(fold == k, cfg.data.val_split, cfg.data.train_split))
        path = os.path.join(out_dir, f"fold{k}.parquet")
        manifest.to_parquet(path, index=False)
        paths.append(path)
    return paths


def train_fold(config: str, overrides: list[str], manifest: str, run_root: str, run_id: str) -> None:
    if os.path.exists(os.path.join(run_root, run_id, "model", "model.json")):
        print(f"{run_id}: trained already", flush=True)
        return
    cmd = [sys.executable, "-m", "medclf.cli", "train", "--config", config, "--manifest", manifest,
           "--run-id", run_id, "--run-root", run_root]
    for item in overrides:
        cmd += ["--set", item]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def best_biases(y: np.ndarray, log_probs: np.ndarray) -> np.ndarray:
    """The offsets (first class fixed at 0) with the highest macro-F1 on these predictions; ties go
    to the smallest offsets, so no evidence means argmax."""
    candidates = sorted(itertools.product(BIAS_GRID, repeat=log_probs.shape[1] - 1),
                        key=lambda b: float(np.abs(b).sum()))
    scored = [(macro_f1(y, (log_probs + np.r_[0.0, b]).argmax(1)), -float(np.abs(b).sum()), b)
              for b in candidates]
    return np.r_[0.0, max(scored, key=lambda s: s[:2])[2]]


def cross_fitted_predictions(y: np.ndarray, log_probs: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, list]:
    pred, chosen = np.empty(len(y), dtype=int), []
    for k in np.unique(fold):
        rest = fold != k
        biases = best_biases(y[rest], log_probs[rest])
        pred[~rest] = (log_probs[~rest] + biases).argmax(1)
        chosen.append(biases)
    return pred, chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--run-root", default=os.path.join(ROOT, "runs"))
    p.add_argument("--prefix", help="run id prefix [config file name + '-cv']")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--baseline", metavar="PREFIX",
                   help="run id prefix of another recipe's folds (same data): paired difference, image by image")
    p.add_argument("--baseline-folds", type=int, metavar="K",
                   help="the baseline's number of folds [--folds]: 10 folds against 5 measures training on "
                        "90%% of the archive (and validating on 10%%) against 80%%")
    p.add_argument("--hflip-tta", action="store_true",
                   help="also score each image with its mirror image (mean probabilities) and give the "
                        "paired difference against the plain scores of the same models")
    args = p.parse_args(argv)
    prefix = args.prefix or os.path.splitext(os.path.basename(args.config))[0] + "-cv"
    manifests = fold_manifests(args.config, args.overrides, args.folds,
                               os.path.join(args.run_root, f"{prefix}-manifests"))
    runs = [os.path.join(args.run_root, f"{prefix}{k}") for k in range(args.folds)]
    for manifest, run in zip(manifests, runs):
        train_fold(args.config, args.overrides, manifest, args.run_root, os.path.basename(run))

    keys, y, probs, fold, classes, patients = out_of_fold(runs, args.resamples)
    if len(set(patients)) < len(keys):
        print(f"CIs resample whole patients ({len(set(patients))} of them), not images")
    fold_f1 = [macro_f1(y[fold == k], probs[fold == k].argmax(1)) for k in range(args.folds)]
    print(f"macro-F1 per fold: {', '.join(f'{f:.3f}' for f in fold_f1)} "
          f"(mean {np.mean(fold_f1):.3f}, sd {np.std(fold_f1, ddof=1):.3f})")
    report(f"all {args.folds} folds pooled (out-of-fold)", y, probs, classes, args.resamples, patients)
    if args.baseline:
        compare_with_baseline(args, prefix, keys, y, probs, classes, patients)
    if args.hflip_tta:
        # the same models, each image scored as is and as the mean over it and its mirror image
        plain = out_of_fold(runs, args.resamples, quiet=True, hflip_tta=False)[2]
        tta_keys, _, tta_probs, _, _, _ = out_of_fold(runs, args.resamples, quiet=True, hflip_tta=True)
        assert list(tta_keys) == list(keys)
        report("hflip test-time augmentation, pooled", y, tta_probs, classes, args.resamples, patients)
        paired_difference("hflip TTA minus plain", y, tta_probs.argmax(1), plain.argmax(1), args.resamples,
                          patients)
        if args.baseline:
            compare_with_baseline(args, prefix, keys, y, tta_probs, classes, patients, hflip_tta=True)

    log_probs = np.log(np.clip(probs, 1e-12, 1.0))
    biased, chosen = cross_fitted_predictions(y, log_probs, fold)
    print("cross-fitted log-probability offsets per fold (" + ", ".join(classes) + "): "
          + "; ".join(" ".join(f"{b:+.2f}" for b in biases) for biases in chosen))
    report_predictions("pooled, cross-fitted offsets", y, biased, classes, args.resamples, groups=patients)
    paired_difference("cross-fitted offsets minus argmax", y, biased, probs.argmax(1), args.resamples, patients)
    return 0


def compare_with_baseline(args, prefix: str, keys: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: list,
                          patients: np.ndarray, hflip_tta=None) -> None:
    """The baseline recipe's out-of-fold predictions on the same images, and the paired difference."""
    base_runs = [os.path.join(args.run_root, f"{args.baseline}{k}") for k in range(args.baseline_folds or args.folds)]
    base_keys, _, base_probs, _, _, _ = out_of_fold(base_runs, args.resamples, quiet=True, hflip_tta=hflip_tta)
    if sorted(base_keys) != sorted(keys):
        raise SystemExit(f"{args.baseline}: its folds hold other images than {prefix}'s")
    position = {key: i for i, key in enumerate(base_keys)}
    base_probs = base_probs[[position[key] for key in keys]]  # paired image by image
    both = " (both with hflip TTA)" if hflip_tta else ""
    report(f"baseline {args.baseline}{both}, pooled", y, base_probs, classes, args.resamples, patients)
    paired_difference(f"{prefix} minus {args.baseline}{both}", y, probs.argmax(1), base_probs.argmax(1),
                      args.resamples, patients)


def out_of_fold(runs: list[str], n_resamples: int, quiet: bool = False, hflip_tta=None):
    """Each fold's model on its own validation fold, pooled: (image keys, labels, calibrated
    probabilities, fold of each image, classes, patient ids), in fold then path order. `hflip_tta`:
    None scores as each model's card says, True/False with/without the mirror-image mean."""
    parts, classes = [], None
    for k, run in enumerate(runs):
        val, probs, run_classes = validation_probs(run, hflip_tta)
        if classes not in (None, run_classes):
            raise SystemExit(f"{run}: classes {run_classes} differ from the other folds' {classes}")
        classes = run_classes
        y = val.label.map(classes.index).to_numpy()
        if not quiet:
            report(f"fold {k} ({run})", y, probs, classes, n_resamples, val.patient_id.to_numpy())
        parts.append((val.key.to_numpy(), y, probs, np.full(len(y), k), val.patient_id.to_numpy()))
    keys, y, probs, fold, patients = (np.concatenate(a) for a in zip(*parts))
    return keys, y, probs, fold, classes, patients


def paired_difference(name: str, y: np.ndarray, pred: np.ndarray, other: np.ndarray, n_resamples: int,
                      groups=None) -> None:
    """Macro-F1 of `pred` minus that of `other` on the same images, with a paired bootstrap CI."""
    diffs = [macro_f1(y[r], pred[r]) - macro_f1(y[r], other[r])
             for r in image_resamples(len(y), n_resamples, groups)]
    print(f"{name}: macro-F1 {macro_f1(y, pred) - macro_f1(y, other):+.3f} "
          f"({np.percentile(diffs, 2.5):+.3f} to {np.percentile(diffs, 97.5):+.3f})")


if __name__ == "__main__":
    sys.exit(main())
