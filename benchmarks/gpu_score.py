"""medclf scoring end to end on this machine (issue 35): Ray started first (start-up excluded), then
`run_scoring` of a folder with the pneumonia model (EfficientNet-Lite0 224 px, untrained: weights do not
change the cost), Parquet committed; prints the summary (with stage costs), where the wall time went
(benchmarks/timeline.py: decode tasks running at once, the actor's start and busy time) and one JSON line.
On a CUDA machine: score.use_gpu, one actor per GPU (score.num_actors=auto), AMP fp16 channels_last.

    python benchmarks/gpu_score.py INPUT_DIR LABEL [--out FILE] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("label")
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--cpus", type=int, default=None,
                    help="Ray's num_cpus (default: this machine's); more than it has simulates a bigger node's scheduling")
    args = ap.parse_args()
    import ray
    import torch

    from medclf.config import load_config
    from medclf.score.batch import run_scoring
    from score_vs_loop import CONFIG, make_model

    cuda = torch.cuda.is_available()
    cpus = args.cpus or os.cpu_count()
    tmp = tempfile.mkdtemp(prefix="medclf-gpuscore-")
    model_path = make_model(tmp)
    started = time.perf_counter()
    from medclf.ops.runs import ALLOCATOR_ENV

    # the workers get medclf's allocator settings, as under `medclf score` (medclf.ops.runs.init_ray)
    os.environ.update({k: os.environ.get(k, v) for k, v in ALLOCATOR_ENV.items()})
    ray.init(num_cpus=cpus, num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - started
    cfg = load_config(CONFIG, [f"score.use_gpu={str(cuda).lower()}", "score.num_actors=auto",
                               "score.batch_size=256", "score.decode_batch_size=64",
                               # 2 CPUs feed the GPU actor; never every CPU, or the decode tasks never start
                               f"score.cpus_per_actor={max(0.5, min(2, cpus // 4))}",
                               "score.buffer_mb=4096", "score.rows_per_file=50000", "score.uids=drop",
                               "score.extensions=[.jpeg]", "ood.enabled=false", *args.set])
    run_started = time.time()
    summary = run_scoring(cfg, f"gpu-{args.label}", args.input, model_path, os.path.join(tmp, "pred"))
    print(summary, flush=True)
    from timeline import summarise

    spans = summarise(ray.timeline(), run_started)  # decode concurrency, the actor's start and its busy time
    print(f"timeline: {json.dumps(spans)}", flush=True)
    line = json.dumps({"medclf_score": args.label, "images_per_s": round(summary.images_per_s, 1),
                       "scored": summary.scored, "failed": summary.failed, "seconds": round(summary.seconds, 1),
                       "ray_start_s": round(ray_start, 1), "stage_seconds": {k: round(v, 2) for k, v in
                                                                            summary.stage_seconds.items()},
                       "timeline": spans,
                       "device": torch.cuda.get_device_name(0) if cuda else "cpu", "cpus": cpus,
                       "settings": args.set})
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
