"""Training memory and throughput: the streaming data path (medclf.data.cache + Ray Data shards) against
the in-memory one (train.data_path=memory: the whole cache as arrays in the object store).

Memory: peak RSS summed over every process of the in-process Ray cluster (driver, GCS, raylet,
train workers, Ray Data tasks), sampled every 0.5 s, while `run_training` (cache build included)
trains the small CNN on N phantom PNGs, at two sizes with the same epochs; the streaming path's
ratio (large / small) should stay <= 1.3.

Throughput: chest X-ray JPEGs (../shared/data/chest_xray/train, or a seeded sample of them),
cached once (a shared train.cache_root), then trained for the same epochs on each path in the same
run; images/s is the median over epochs of the training images/s the job records (all workers).

    .venv/bin/python benchmarks/train_memory.py                          # full size: 2000 vs 20000, all 5,216
    .venv/bin/python benchmarks/train_memory.py --n 500 5000 --kermany-n 1000 --kermany-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from medclf.config import load_config  # noqa: E402
from medclf.data.phantoms import PATIENT_REGEX  # noqa: E402
from medclf.ops.runs import init_ray  # noqa: E402
from medclf.train.driver import run_training  # noqa: E402
from treerss import TreeRSS  # noqa: E402

SHARED = os.path.join(os.path.dirname(HERE), "..", "shared")
COMMON = ["model.arch=small_cnn", "train.num_workers=2", "train.cpus_per_worker=0.5", "train.batch_size=32",
          "train.early_stopping_patience=99", "score.decode_batch_size=16", "evaluate.bootstrap_resamples=0"]


def with_ray(cfg, fn):
    """`fn()` on a local Ray started as the jobs start it (medclf.ops.runs.init_ray: ray.num_cpus, the
    allocator settings, its own state API), shut down after."""
    import ray

    init_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        return fn()
    finally:
        ray.shutdown()


def memory_run(out: str, n: int, size: int, epochs: int, data_path: str, cpus: int) -> dict:
    """One size's training run in a fresh process, after the phantoms were written by another one:
    the measured tree is that run's alone (a driver that generated 20,000 images, or trained before,
    keeps that memory in its allocator and would be counted)."""
    import subprocess

    data = os.path.join(out, f"phantoms-{n}-{size}")
    if not os.path.exists(os.path.join(data, "manifest.parquet")):
        subprocess.run([sys.executable, "-c", "import sys; from medclf.data.phantoms import generate; "
                        f"generate({data!r}, n_train={n}, n_test=2, image_size={size}, formats=('png',), seed=0)"],
                       check=True, env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
    result = os.path.join(out, f"memory-{data_path}-{n}.json")
    subprocess.run([sys.executable, __file__, "--one-run", data, str(size), str(epochs), data_path, str(cpus),
                    result, "--out", out], check=True)
    with open(result) as f:
        return json.load(f)


def mark_phases(rss: TreeRSS) -> None:
    """Name the part of run_training that is running, for the per-phase peaks: the cache build, the
    workers' feed, Ray Train's fit and the driver's finish step, by wrapping the library's own
    functions (this process runs one training and exits)."""
    import medclf.train.driver as train_mod

    def marked(phase, fn):
        def run(*args, **kwargs):
            rss.phase = phase
            return fn(*args, **kwargs)
        return run

    train_mod.cache_mod.ensure_cache = marked("cache", train_mod.cache_mod.ensure_cache)
    for phase, name in (("feed", "feed"), ("train", "make_trainer"), ("finish", "finish_run")):
        setattr(train_mod, name, marked(phase, getattr(train_mod, name)))


def one_memory_run(data: str, size: int, epochs: int, data_path: str, cpus: int, out: str) -> dict:
    cfg = load_config(None, COMMON + [f"data.root={os.path.join(data, 'train')}", "data.classes=[NORMAL, POSITIVE]",
                                      "data.extensions=[.png]", f"data.patient_regex='{PATIENT_REGEX}'",
                                      f"preprocess.image_size={size}",
                                      f"train.epochs={epochs}", f"train.data_path={data_path}", f"ray.num_cpus={cpus}"])
    n = len(pd.read_parquet(os.path.join(data, "manifest.parquet")).query("split == 'train'"))
    run_dir = os.path.join(out, f"mem-{data_path}-{n}-{time.time_ns()}")
    with TreeRSS(interval=0.5, pss=True) as rss:
        rss.phase = "start"
        mark_phases(rss)
        t0 = time.time()
        result = with_ray(cfg, lambda: run_training(cfg, run_dir))
    return {"n": n, "path": data_path, "peak_rss_mb": rss.peak / 2**20,
            "peak_pss_mb": rss.peak_pss / 2**20, "seconds": time.time() - t0,
            "images_per_s": float(result.history.images_per_s.median()),
            "by_phase_mb": {k: [round(v / 2**20) for v in peaks] for k, peaks in rss.by_phase.items()},
            "rss_at_phase_peak_by_process_mb": {k: dict(sorted(((t, round(v / 2**20)) for t, v in who.items()),
                                                               key=lambda kv: -kv[1]))
                                                for k, who in rss.who_by_phase.items()},
            "shared_at_phase_peak_by_process_mb": {k: {t: round(v / 2**20) for t, v in shared.items() if v > 2**24}
                                                   for k, shared in rss.shared_by_phase.items()}}


def kermany_manifest(out: str, root: str, n: int) -> str:
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith((".jpeg", ".jpg")))
    df = pd.DataFrame({"path": files, "label": [os.path.basename(os.path.dirname(f)) for f in files]})
    if n and n < len(df):
        df = df.sample(n=n, random_state=0).sort_values("path")
    path = os.path.join(out, f"kermany-{len(df)}.parquet")
    df.to_parquet(path, index=False)
    return path


def throughput_runs(out: str, root: str, n: int, size: int, epochs: int, cpus: int) -> list[dict]:
    manifest = kermany_manifest(out, root, n)
    rows = []
    for data_path in ("memory", "stream"):
        cfg = load_config(None, COMMON + [
            f"data.manifest={manifest}", "data.classes=[NORMAL, PNEUMONIA]", "data.positive_class=PNEUMONIA",
            "data.patient_regex='^((?:NORMAL2-)?IM-\\d+|person\\d+)'", "data.val_fraction=0.1",
            f"preprocess.image_size={size}", f"train.epochs={epochs}", f"train.data_path={data_path}",
            f"train.cache_root={os.path.join(out, 'kermany-cache')}", f"ray.num_cpus={cpus}"])  # one cache: decoded once for both
        t0 = time.time()
        result = with_ray(cfg, lambda: run_training(cfg, os.path.join(out, f"kermany-{data_path}-{time.time_ns()}")))
        rows.append({"path": data_path, "images": len(pd.read_parquet(manifest)), "image_size": size, "seconds": time.time() - t0,
                     "images_per_s_by_epoch": [round(v, 1) for v in result.history.images_per_s],
                     "images_per_s": float(result.history.images_per_s.median()),
                     "data_wait_by_epoch": [round(v, 3) for v in result.history.data_wait_fraction],
                     "cache_built": result.caches["train"].built})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_train_memory")
    ap.add_argument("--n", type=int, nargs=2, default=[2000, 20000], help="phantom counts (small, large)")
    ap.add_argument("--size", type=int, default=64, help="phantom image size")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--memory-paths", nargs="+", default=["stream"], choices=["stream", "memory"])
    ap.add_argument("--kermany", default=os.path.join(SHARED, "data", "chest_xray", "train"))
    ap.add_argument("--kermany-n", type=int, default=0, help="seeded sample of the JPEGs (0: all)")
    ap.add_argument("--kermany-size", type=int, default=224)
    ap.add_argument("--kermany-epochs", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["memory", "throughput"])
    ap.add_argument("--one-run", nargs=6, metavar=("DATA", "SIZE", "EPOCHS", "PATH", "CPUS", "RESULT"),
                    help=argparse.SUPPRESS)  # internal: one memory run, in the process memory_run starts
    args = ap.parse_args()
    if args.one_run:
        data, size, epochs, data_path, cpus, result = args.one_run
        with open(result, "w") as f:
            json.dump(one_memory_run(data, int(size), int(epochs), data_path, int(cpus), args.out), f)
        return
    os.makedirs(args.out, exist_ok=True)
    report = {"command": " ".join(sys.argv), "machine": f"{platform.node()} {os.cpu_count()} CPUs",
              "load_before": os.getloadavg()}
    if "memory" not in args.skip:
        report["memory"] = [memory_run(args.out, n, args.size, args.epochs, p, args.cpus)
                            for p in args.memory_paths for n in args.n]
        for p in args.memory_paths:
            for kind in ("rss", "pss"):
                small, large = (r[f"peak_{kind}_mb"] for r in report["memory"] if r["path"] == p)
                report[f"{kind}_ratio_{p}"] = large / small
                print(f"{p}: peak {kind.upper()} {small:.0f} MB ({args.n[0]}) vs {large:.0f} MB ({args.n[1]}): "
                      f"ratio {large / small:.2f}", flush=True)
        for r in report["memory"]:
            print(f"{r['path']} {r['n']}: peak RSS / PSS MB by phase {r['by_phase_mb']}", flush=True)
    if "throughput" not in args.skip:
        report["throughput"] = throughput_runs(args.out, args.kermany, args.kermany_n, args.kermany_size,
                                               args.kermany_epochs, args.cpus)
        memory, stream = report["throughput"]
        report["stream_vs_memory"] = stream["images_per_s"] / memory["images_per_s"]
        print(f"throughput: stream {stream['images_per_s']:.1f} vs memory {memory['images_per_s']:.1f} images/s: "
              f"{report['stream_vs_memory']:.2f}x", flush=True)
    report["load_after"] = os.getloadavg()
    with open(os.path.join(args.out, "train_memory.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
