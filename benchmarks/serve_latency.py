"""Online endpoint latency and throughput: `medclf serve` on 127.0.0.1 under 1, 8 and 32 concurrent clients.

A model artifact (default: ResNet18 at 224 px with random weights, which cost what trained ones
cost; or --model a real artifact) is served by medclf.score.serve in a local Ray (replicas and batching
from --set serve.* overrides). A closed-loop load generator posts real chest X-ray JPEGs from
../shared/data/chest_xray, each client sending its next request when the last one returned,
bounded by --requests per level and --seconds per level. Reports p50/p90/p99 latency, requests/s
and the mean batch size the replica saw.

    .venv/bin/python benchmarks/serve_latency.py
    .venv/bin/python benchmarks/serve_latency.py --concurrency 1 8 32 --requests 300 --seconds 60 \\
        --set serve.max_batch_size=32 --set serve.runtime=onnxruntime
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED = os.path.join(ROOT, "..", "shared")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def load_level(url: str, bodies: list[bytes], clients: int, max_requests: int, max_seconds: float) -> dict:
    """`clients` closed-loop clients until `max_requests` answers or `max_seconds` pass."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds
    issued = [0]

    def client(k: int):
        i = k
        while True:
            with lock:
                if issued[0] >= max_requests or time.perf_counter() > deadline:
                    return
                issued[0] += 1
            body = bodies[i % len(bodies)]
            i += clients
            start = time.perf_counter()
            request = urllib.request.Request(f"{url}/predict", data=body, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=120) as r:
                    ok = r.status == 200 and json.loads(r.read())["status"] == "ok"
            except Exception:
                ok = False
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[0] += 1

    before = _get(f"{url}/stats")
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = _get(f"{url}/stats")
    lat = np.array(latencies) * 1000
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "answers": len(latencies), "errors": errors[0], "seconds": wall,
            "requests_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p90_ms": float(np.percentile(lat, 90)), "p99_ms": float(np.percentile(lat, 99)),
            "mean_batch": (after["requests"] - before["requests"]) / max(1, batches)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model artifact (default: random ResNet18 at 224 px)")
    ap.add_argument("--data", default=os.path.join(SHARED, "data", "chest_xray", "train"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=300, help="answers per level, at most")
    ap.add_argument("--seconds", type=float, default=60, help="seconds per level, at most")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. serve.max_batch_size=32")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from medclf.config import load_config
    from medclf.ops.runs import ALLOCATOR_ENV
    from medclf.score.serve import run_server

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.data) for f in fs if f.lower().endswith(".jpeg"))
    rng = np.random.default_rng(0)
    bodies = [open(f, "rb").read() for f in rng.choice(files, min(200, len(files)), replace=False)]
    model = args.model
    if not model:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        from score_throughput import make_model

        model = make_model(tempfile.mkdtemp(prefix="medclf-serve-bench-"), "resnet18", 224)
    port = _free_port()
    cfg = load_config(None, [f"serve.port={port}", "serve.cpus_per_replica=1", "serve.threads=2", *args.overrides])
    os.environ.update({k: os.environ.get(k, v) for k, v in ALLOCATOR_ENV.items()})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    url = run_server(cfg, model, blocking=False)
    load_level(url, bodies[:4], 1, 8, 30)  # warm-up: model loaded, first batches compiled
    results = []
    for clients in args.concurrency:
        r = load_level(url, bodies, clients, args.requests, args.seconds)
        results.append(r)
        print(f"{clients:>3} clients: {r['answers']} answers in {r['seconds']:.1f}s, {r['requests_per_s']:.1f} req/s, "
              f"p50 {r['p50_ms']:.0f} ms, p90 {r['p90_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, mean batch "
              f"{r['mean_batch']:.1f}, errors {r['errors']}", flush=True)
    serve.shutdown()
    ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg.serve.model_dump(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
