"""Measure the content checks (medclf.imaging.content) on real images: how many real films would they refuse?

Decodes every image of the sets below with the scoring decoder (medclf.imaging.decode, middle
frame of a multi-frame DICOM), computes the three measures and the reason the default limits
give, and prints per set: n, refusals, the false-refusal rate with its 95% Wilson interval, and
the smallest spread / structure seen. Files the decoder rejects (not images, missing codecs) are
counted apart: they never reach the content checks.

  * chest: ../shared/data/chest_xray/train (Kermany train split, 5,216 JPEGs)
  * lung_ct, breast_us: ../shared/data/{lung_ct,breast_us} (real images of another domain: the
    content checks must pass them; refusing them is the domain guard's job)
  * dicom: every file pydicom.data.get_testdata_files() lists (pydicom's test files + pydicom-data)
  * synthetic: blank, grey, saturated, noise images (the checks must refuse them)

    PYTHONPATH=. python benchmarks/content_checks.py [--shared ../shared] [--out measures.csv]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd

from medclf.imaging.decode import DecodeError, open_images
from medclf.imaging.content import ContentLimits, content_reason, measures
from medclf.monitor.drift import wilson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files_under(folder: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                  if f.lower().endswith((".jpeg", ".jpg", ".png")))


def dicom_files() -> list[str]:
    from pydicom.data import get_testdata_files

    return sorted(p for p in get_testdata_files() if os.path.isfile(p)
                  and not p.endswith((".txt", ".json", ".dump", ".gz", ".icc", ".py")))


def synthetic(n: int = 50, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        side = int(rng.integers(64, 1024))
        out += [(f"blank{i}", np.zeros((side, side), np.float32)),
                (f"grey{i}", np.full((side, side), rng.uniform(0.05, 0.95), np.float32)),
                (f"saturated{i}", np.ones((side, side), np.float32)),
                (f"near_grey{i}", np.clip(rng.uniform(0.2, 0.8) + rng.normal(0, 0.005, (side, side)), 0, 1)),
                (f"uniform_noise{i}", rng.uniform(0, 1, (side, side)).astype(np.float32)),
                (f"gauss_noise{i}", np.clip(rng.normal(0.5, 0.2, (side, side)), 0, 1).astype(np.float32))]
    return out


def measure_file(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    try:
        images = open_images(data, path, "middle")
        image = images.image(images.frames[0]).image
    except DecodeError as exc:
        return {"path": path, "decoded": False, "reason": None, "note": exc.problem[:80]}
    except Exception as exc:  # a decoder library failure: counted apart, like scoring's error rows
        return {"path": path, "decoded": False, "reason": None, "note": type(exc).__name__}
    return {"path": path, "decoded": True, **measures(image), "reason": content_reason(image),
            "modality": images.meta.get("modality"), "shape": "x".join(map(str, image.shape))}


def summarise(name: str, rows: pd.DataFrame, want: str) -> dict:
    dec = rows[rows.decoded]
    k, n = int(dec.reason.notna().sum()), len(dec)
    lo, hi = wilson(k, n) if n else (float("nan"), float("nan"))
    return {"set": name, "files": len(rows), "decoded": n, "refused": k, "rate": k / n if n else float("nan"),
            "ci_low": lo, "ci_high": hi, "want": want,
            "min_spread": float(dec.spread.min()) if n else float("nan"),
            "p001_structure": float(dec.structure.quantile(0.001)) if n else float("nan"),
            "min_structure": float(dec.structure.min()) if n else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="CSV of every image's measures")
    p.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"), help="the shared/ folder (read-only data)")
    p.add_argument("--limit", type=int, default=0, help="at most this many files per set (0: all)")
    args = p.parse_args(argv)
    limits = ContentLimits()
    data = os.path.join(args.shared, "data")
    print(f"limits: spread >= {limits.min_spread}, structure >= {limits.min_structure}")
    sets = {"chest_kermany_train": (files_under(os.path.join(data, "chest_xray", "train")), "pass"),
            "lung_ct": (files_under(os.path.join(data, "lung_ct")), "pass"),
            "breast_us": (files_under(os.path.join(data, "breast_us")), "pass"),
            "dicom_pydicom": (dicom_files(), "pass")}
    frames, summary = [], []
    for name, (paths, want) in sets.items():
        if args.limit:
            paths = paths[:args.limit]
        start = time.time()
        rows = pd.DataFrame([measure_file(path) for path in paths]).assign(set=name)
        for col in ("decoded", "reason", "spread", "structure", "peak"):
            if col not in rows:
                rows[col] = np.nan
        print(f"{name}: {len(paths)} files in {time.time() - start:.0f}s", file=sys.stderr)
        frames.append(rows)
        summary.append(summarise(name, rows, want))
    syn = pd.DataFrame([{"path": name, "decoded": True, **measures(img), "reason": content_reason(img)}
                        for name, img in synthetic()]).assign(set="synthetic")
    frames.append(syn)
    summary.append(summarise("synthetic_blank_grey_noise", syn, "refuse"))
    table = pd.DataFrame(summary)
    pd.set_option("display.width", 200)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    every = pd.concat(frames, ignore_index=True)
    refused_real = every[(every.set != "synthetic") & every.reason.notna()]
    if len(refused_real):
        print("\nreal images refused:")
        print(refused_real[["set", "path", "spread", "structure", "reason"]].to_string(index=False))
    not_decoded = every[~every.decoded]
    print(f"\nnot decoded (never reach the checks): {len(not_decoded)}")
    if args.out:
        every.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
