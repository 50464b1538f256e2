"""How close do validation images sit to training images? Near-copies across a split, by split scheme.

    python benchmarks/slice_neighbours.py --config configs/lung_ct.yaml --set data.root=../shared/data/lung_ct [--blocks 10 20 40]

An archive without patient ids (lung CT, breast ultrasound) is split by image. Where its files are
numbered in acquisition order, neighbouring numbers are slices of one scan, and an image split puts
a near-copy of many validation slices in training: validation then measures recall of seen patients.
Per class this prints how similar adjacent numbers are against random pairs (Pearson r of 32 px
thumbnails through the shared decode + preprocessing), how often a file's nearest neighbour is
within 3 numbers, how the numbering's gaps run (scattered single gaps: the archive's missing part
was drawn by image; long gaps: by patient), exact duplicate files, and, for label-stratified 5-fold
splits by image and by blocks of N consecutive numbers (data.patient_block), the share of
validation images with a training image above r = 0.8 / 0.9 / 0.95.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from medclf import storage  # noqa: E402
from medclf.config import PreprocessConfig, load_config  # noqa: E402
from medclf.data.labelled import _patient_number, discover  # noqa: E402
from medclf.imaging.decode import decode  # noqa: E402
from medclf.imaging.preprocess import preprocess_gray  # noqa: E402


def thumbnails(paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """Standardised 32 px thumbnails (rows: zero mean, unit variance) and each file's SHA-256."""
    spec, rows, digests = PreprocessConfig(image_size=32), [], []
    for p in paths:
        data = storage.read_bytes(p)
        digests.append(hashlib.sha256(data).hexdigest())
        x = preprocess_gray(decode(data, p).image, spec).ravel().astype(np.float64)
        rows.append((x - x.mean()) / (x.std() + 1e-9))
    return np.stack(rows), digests


def folds_by_group(labels: np.ndarray, groups: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """Label-stratified folds of whole groups (as benchmarks/kfold_cv.py draws them)."""
    rng, fold = np.random.default_rng(seed), np.empty(len(groups), dtype=int)
    for label in sorted(set(labels)):
        members = rng.permutation(list(dict.fromkeys(groups[labels == label])))
        for i, g in enumerate(members):
            fold[groups == g] = i % k
    return fold


def gap_runs(numbers: np.ndarray) -> list[int]:
    """Lengths of the runs of numbers missing between the smallest and the largest."""
    present, runs, run = set(numbers.tolist()), [], 0
    for n in range(int(numbers.min()), int(numbers.max()) + 1):
        if n in present:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--blocks", type=int, nargs="+", default=[10, 20, 40])
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    df = discover(cfg.data.model_copy(update={"patient_block": None}))
    df = df[df["split"] == cfg.data.train_split].reset_index(drop=True)
    numbers = np.array([_patient_number(os.path.basename(q).rsplit(".", 1)[0]) for q in df["path"]])
    labels = df["label"].to_numpy()
    x, digests = thumbnails(list(df["path"]))
    r = x @ x.T / x.shape[1]
    np.fill_diagonal(r, -np.inf)
    rng = np.random.default_rng(0)

    print(f"{cfg.data.root or cfg.data.manifest}: {len(df)} images")
    for label in sorted(set(labels)):
        rows = np.flatnonzero(labels == label)
        by_number = {int(numbers[i]): i for i in rows}
        adjacent = [r[i, by_number[n + 1]] for n, i in by_number.items() if n + 1 in by_number]
        pairs = rng.choice(rows, size=(2000, 2))
        random_r = [r[a, b] for a, b in pairs if a != b]
        inside = r[np.ix_(rows, rows)]
        nearest = numbers[rows[inside.argmax(1)]]
        runs = gap_runs(numbers[rows])
        print(f"  {label}: {len(rows)} files, numbers {numbers[rows].min()}-{numbers[rows].max()}; "
              f"r adjacent numbers median {np.median(adjacent):.3f}, random pairs {np.median(random_r):.3f}; "
              f"nearest neighbour within 3 numbers {np.mean(np.abs(nearest - numbers[rows]) <= 3):.2f}; "
              f"{sum(runs)} numbers missing in {len(runs)} gaps, longest {max(runs, default=0)}")

    groups_of = defaultdict(list)
    for i, d in enumerate(digests):
        groups_of[d].append(i)
    same = [g for g in groups_of.values() if len(g) > 1]
    conflicts = [g for g in same if len(set(labels[g])) > 1]
    print(f"  exact duplicate files: {len(same)} groups ({sum(map(len, same))} files), "
          f"{len(conflicts)} across classes" + "".join(
              f"\n    label conflict: {', '.join(os.path.basename(df['path'][i]) for i in g)}" for g in conflicts))

    schemes = [("by image", np.arange(len(df)).astype(str))] + [
        (f"blocks of {b}", np.array([f"{lab}#{n // b}" for lab, n in zip(labels, numbers)])) for b in args.blocks]
    for name, groups in schemes:
        fold = folds_by_group(labels, groups)
        closest = np.array([r[i, fold != fold[i]].max() for i in range(len(df))])
        print(f"  5 folds {name} ({len(set(groups))} groups): validation images with a training image at "
              f"r > 0.8 {np.mean(closest > 0.8):.2f}, > 0.9 {np.mean(closest > 0.9):.2f}, "
              f"> 0.95 {np.mean(closest > 0.95):.2f}; median closest r {np.median(closest):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
