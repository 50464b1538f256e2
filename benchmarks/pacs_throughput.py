"""Scoring throughput from a PACS (Orthanc over DICOMweb) against local files: same images, same run.

N real chest X-rays (../shared/data/chest_xray/train, Kermany train split, first N JPEGs in name
order) are converted to DICOM (16-bit MONOCHROME2, the phantoms' writer, native size), written to
a local folder and stored in a local Orthanc (127.0.0.1, started here). The same model (ResNet18 at
224 px, random weights: the weights do not change the cost) then scores them, alternating:
  local    run_scoring over the .dcm files on disk
  pacs     medclf.score.pacs: QIDO listing + WADO-RS reads, results=none
  pacs+sr  the same, plus one SR per image sent back by STOW-RS
each into a fresh output, `--repeats` times. Reported: images/s per repeat, mean and a 95% CI
(t over repeats). A systems measure on this machine (2 shared CPU cores), not a model result.

    .venv/bin/python benchmarks/pacs_throughput.py --n 100 --repeats 3
    .venv/bin/python benchmarks/pacs_throughput.py --shared ../../shared   # from a worktree under wt/
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")


def _ci(values: list[float]) -> tuple[float, float, float]:
    from scipy import stats

    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shared", default=SHARED, help="the shared data folder [../shared next to the checkout]")
    args = ap.parse_args()

    os.environ.setdefault("MEDCLF_DICOMWEB_USER", "bench")
    os.environ.setdefault("MEDCLF_DICOMWEB_PASSWORD", "bench-password")
    os.environ.setdefault("MEDCLF_UID_KEY", "bench-site-key")
    import pandas as pd
    import ray
    from PIL import Image

    from medclf.config import load_config
    from medclf.data.phantoms import dicom_bytes
    from medclf.ops.orthanc import LocalOrthanc
    from medclf.ops.runs import local_ray_options
    from medclf.score.batch import run_scoring
    from medclf.score.pacs import run_pacs_scoring
    from score_throughput import make_model

    jpegs = sorted(glob.glob(os.path.join(args.shared, "data", "chest_xray", "train", "*", "*.jpeg")))[: args.n]
    if len(jpegs) < args.n:
        sys.exit(f"need {args.n} JPEGs under {args.shared}/data/chest_xray/train, found {len(jpegs)}")
    tmp = tempfile.mkdtemp(prefix="medclf-pacs-bench-")
    folder = os.path.join(tmp, "dicom")
    os.makedirs(folder)
    files = []
    for i, jpeg in enumerate(jpegs):
        image = np.asarray(Image.open(jpeg).convert("L"), np.float32) / 255.0
        path = os.path.join(folder, f"{i:05d}.dcm")
        with open(path, "wb") as f:
            f.write(dicom_bytes(image, f"P{i:05d}", i, seed=11))
        files.append(path)
    manifest = os.path.join(tmp, "local.csv")
    pd.DataFrame({"path": files}).to_csv(manifest, index=False)
    model = make_model(tmp, "resnet18", 224)
    cfg = load_config(None, ["score.batch_size=16", "score.decode_batch_size=8", "score.cpus_per_actor=1",
                             "ood.enabled=false", f"run.root={tmp}/runs"])
    ray.init(**local_ray_options(2), log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict = {"local": [], "pacs": [], "pacs+sr": []}
    mb = sum(os.path.getsize(f) for f in files) / 2**20
    with LocalOrthanc(os.environ["MEDCLF_DICOMWEB_USER"], os.environ["MEDCLF_DICOMWEB_PASSWORD"],
                      folder=os.path.join(tmp, "orthanc")) as pacs:
        for path in files:
            with open(path, "rb") as f:
                pacs.upload(f.read())
        url = pacs.dicomweb.replace("http://", "dicomweb://")
        run_scoring(cfg, "warmup", manifest, model, os.path.join(tmp, "out-warmup"))  # first-run costs out
        for r in range(args.repeats):
            for kind in results:
                out = os.path.join(tmp, f"out-{kind}-{r}")
                start = time.perf_counter()
                if kind == "local":
                    s = run_scoring(cfg, f"{kind}-{r}", manifest, model, out)
                    scored = s.scored
                else:
                    q = "?results=none" if kind == "pacs" else "?results=sr"
                    run = run_pacs_scoring(cfg, f"pacs-{r}-{kind}", url + q, model, out)
                    scored = run.scoring.scored
                    assert kind == "pacs" or run.sr_sent == scored, (run.sr_sent, scored)
                seconds = time.perf_counter() - start
                assert scored == args.n, (kind, scored)
                results[kind].append(args.n / seconds)
                print(f"repeat {r} {kind:8s} {args.n / seconds:6.2f} images/s ({seconds:.1f} s)", flush=True)
    ray.shutdown()
    print(f"\n{args.n} Kermany chest_xray/train JPEGs as DICOM ({mb:.0f} MiB), ResNet18 224 px, 2 CPUs, "
          f"{args.repeats} repeats, wall time of the whole job call:")
    for kind, values in results.items():
        mean, lo, hi = _ci(values)
        print(f"  {kind:8s} {mean:6.2f} images/s (95% CI {lo:.2f} to {hi:.2f}; per repeat "
              f"{', '.join(f'{v:.2f}' for v in values)})")
    local = np.asarray(results["local"])
    for kind in ("pacs", "pacs+sr"):
        ratio = np.asarray(results[kind]) / local
        mean, lo, hi = _ci(list(ratio))
        print(f"  {kind} / local, paired by repeat: {mean:.3f} (95% CI {lo:.3f} to {hi:.3f})")


if __name__ == "__main__":
    main()
