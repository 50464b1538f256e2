"""Time the stratified bootstrap CIs of medclf.report.metrics: N predictions, R resamples.

    .venv/bin/python benchmarks/bootstrap_ci.py            # N=1000, R=1000, best of 5
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from medclf.report.metrics import bootstrap_ci  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--n", type=int, default=1000)
ap.add_argument("--resamples", type=int, default=1000)
ap.add_argument("--repeats", type=int, default=5)
args = ap.parse_args()
rng = np.random.default_rng(0)
y = (rng.random(args.n) < 0.4).astype(int)
p = np.clip(0.3 * y + rng.normal(0.35, 0.2, args.n), 0, 1)
times = []
for _ in range(args.repeats):
    t = time.perf_counter()
    ci = bootstrap_ci(y, p, 0.5, n_resamples=args.resamples, seed=0)
    times.append(time.perf_counter() - t)
inside = ((ci.ci_low <= ci.estimate) & (ci.estimate <= ci.ci_high)).all()
print(ci.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
print(f"N={args.n}, {args.resamples} resamples, {len(ci)} metrics: best {min(times):.3f}s, "
      f"median {sorted(times)[len(times) // 2]:.3f}s; every CI contains its estimate: {inside}")
