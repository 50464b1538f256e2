"""The inference actor's forward pass on a CPU at several chunk sizes (medclf.score.predictor.CPU_FORWARD_ROWS).

For each architecture and precision: a Predictor on an untrained artifact (weights do not change the
cost) runs `logits_and_features` on the same batch of `--batch` random 224 px images, once per chunk
size, the sizes alternating within each repeat (so they share the machine's load). Prints images/s per
size (median over repeats) and, per size, the ratio to the whole batch in one pass, with a 95%
percentile-bootstrap CI over the per-repeat ratios, and the largest output change against the whole
batch in one pass.

    python benchmarks/forward_rows.py --archs efficientnet_lite0 resnet18 densenet121 --repeats 6
    python benchmarks/forward_rows.py --precision bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from medclf.config import load_config  # noqa: E402
from medclf.model.artifact import ModelCard, save_artifact  # noqa: E402
from medclf.model.networks import build_model  # noqa: E402
from medclf.score import predictor as predictor_module  # noqa: E402
from score_vs_loop import CONFIG, ci  # noqa: E402


def artifact(arch: str, folder: str) -> str:
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    card = ModelCard(arch=arch, classes=list(cfg.data.classes), positive_class=cfg.data.positive_class,
                     preprocess=cfg.preprocess.model_dump(), threshold=0.5)
    path = os.path.join(folder, arch)
    save_artifact(build_model(arch, 2).eval(), card, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=["efficientnet_lite0", "resnet18", "densenet121"])
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--batch", type=int, default=64, help="rows the actor is handed (score.batch_size)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="float32")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="medclf-rows-")
    pixels = np.random.default_rng(0).random((args.batch, 1, 224, 224), dtype=np.float32)
    sizes = sorted(set(args.rows) | {args.batch})
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}; torch {torch.__version__}, "
          f"{args.threads} threads, precision {args.precision}, batch {args.batch}", flush=True)
    for arch in args.archs:
        predictor = predictor_module.Predictor(artifact(arch, tmp), "rows", threads=args.threads,
                                               precision=args.precision)
        change: dict[int, float] = {}
        predictor_module.CPU_FORWARD_ROWS = args.batch
        whole, _ = predictor.logits_and_features(pixels)
        for size in sizes:
            predictor_module.CPU_FORWARD_ROWS = size
            change[size] = float(np.abs(predictor.logits_and_features(pixels)[0] - whole).max())
        speed: dict[int, list[float]] = {s: [] for s in sizes}
        for _ in range(args.repeats):
            for size in sizes:
                predictor_module.CPU_FORWARD_ROWS = size
                started = time.perf_counter()
                predictor.logits_and_features(pixels)
                speed[size].append(args.batch / (time.perf_counter() - started))
        base = np.asarray(speed[args.batch])
        for size in sizes:
            ratio = np.asarray(speed[size]) / base
            lo, hi = ci(list(ratio))
            print(f"RESULT {arch} {args.precision} rows {size:3d}: {np.median(speed[size]):6.1f} images/s; "
                  f"against {args.batch} in one pass {ratio.mean():.2f}x (95% CI {lo:.2f}-{hi:.2f}); "
                  f"largest logit change {change[size]:.2e}", flush=True)


if __name__ == "__main__":
    main()
