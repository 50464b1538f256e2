"""`medclf score` with one config change against without it, in the real pipeline (issue 35).

One Ray, started as `medclf score` starts it (medclf.ops.runs.init_ray, start-up excluded); each repeat
scores the same folder once per variant, the variants alternating, so they share the machine's load. The
pneumonia config's model (EfficientNet-Lite0 224 px, untrained: weights do not change the cost), local
files, Parquet committed. Prints each run's images/s and forward stage cost, then each variant's images/s
against the last one's, with a 95% percentile-bootstrap CI over the per-repeat ratios. The first repeat
includes the decode workers' first imports (a fresh Ray), as a real job's run does.

    python benchmarks/score_ab.py --set score.runtime=onnxruntime --set score.runtime=torch
    python benchmarks/score_ab.py --kind jpeg --fullsize FS --base score.batch_size=32 --set score.precision=bfloat16 --set score.precision=auto
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from score_vs_loop import CONFIG, KERMANY, ci, kind_files, link_folder, make_model  # noqa: E402

from medclf.config import load_config  # noqa: E402

BASE = ["score.batch_size=64", "score.num_actors=1", "score.cpus_per_actor=1", "score.torch_threads=2",
        "score.uids=drop", "score.extensions=[.jpeg, .png, .dcm]", "score.rescore=true", "ood.enabled=false",
        "ray.num_cpus=2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", required=True, dest="variants",
                    help="one variant's override (KEY=VALUE; several joined by ','); the last is the baseline")
    ap.add_argument("--base", action="append", default=[], help="overrides every variant gets, after the built-in ones")
    ap.add_argument("--kind", default="jpeg224", choices=["jpeg224", "jpeg", "dcm"])
    ap.add_argument("--fullsize", default=None, help="folder written by benchmarks/make_fullsize.py (kinds jpeg, dcm)")
    ap.add_argument("--films", default=KERMANY)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import ray

    from medclf.ops.runs import init_ray
    from medclf.score.batch import run_scoring

    tmp = tempfile.mkdtemp(prefix="medclf-ab-")
    model = make_model(tmp)
    base = BASE + args.base
    init_ray(load_config(CONFIG, base), state_api=False)  # as `medclf score` starts it
    ray.data.DataContext.get_current().enable_progress_bars = False
    src = link_folder(kind_files(args.kind, args.fullsize, args.n, args.films), os.path.join(tmp, "in"))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}; {args.kind} n={args.n}; base {base}",
          flush=True)
    rates: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.repeats):
        for i, variant in enumerate(args.variants):
            cfg = load_config(CONFIG, base + variant.split(","))
            summary = run_scoring(cfg, f"ab-{i}-{r}", src, model, os.path.join(tmp, f"out-{i}-{r}"))
            assert summary.scored == args.n, summary
            rates[variant].append(summary.images_per_s)
            forward = summary.stage_seconds.get("forward", 0.0) / summary.scored * 1000
            print(f"[{variant} repeat {r}] {summary.images_per_s:.1f} images/s; forward {forward:.2f} s per 1,000",
                  flush=True)
    baseline = np.asarray(rates[args.variants[-1]])
    for variant in args.variants:
        ratio = np.asarray(rates[variant]) / baseline
        lo, hi = ci(list(ratio))
        print(f"RESULT {variant}: {np.mean(rates[variant]):.1f} images/s; / {args.variants[-1]} {ratio.mean():.2f}x "
              f"(95% CI {lo:.2f}-{hi:.2f}, {args.repeats} repeats)", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
