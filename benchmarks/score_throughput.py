"""Scoring throughput and memory: medclf's Ray Data pipeline against a plain PyTorch loop.

Throughput: N real chest X-ray JPEGs (../shared/data/chest_xray) served by a local S3 server
(moto, 127.0.0.1) are scored end to end by `medclf.score.batch.run_scoring` (list, read, sha256,
decode, preprocess, ResNet18 at 224 px, atomic Parquet commit) and, in the same run, by a plain
single-process loop over the same files on local disk doing the same read, hash, decode,
preprocess and model call in batches, with the same number of torch threads.

Runtimes: medclf's scoring runs once per `score.runtime` (torch, onnxruntime) and per source (the
local S3 server, local disk), all in the same run as the plain loop, so the ratios share the load.

Memory: peak RSS summed over every process of the in-process Ray cluster (driver, GCS, raylet,
workers), sampled every 0.2 s, while scoring N phantom PNGs; compared at two archive sizes.

    .venv/bin/python benchmarks/score_throughput.py                      # defaults below
    .venv/bin/python benchmarks/score_throughput.py --n 1000 5000 --memory-n 2000 20000
    .venv/bin/python benchmarks/score_throughput.py --n 5000 --memory-n --runtimes torch onnxruntime --sources local s3
    .venv/bin/python benchmarks/score_throughput.py --n 1000 --memory-n --arch efficientnet_lite0 --hflip-tta
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medclf.config import load_config  # noqa: E402
from medclf.imaging.decode import decode  # noqa: E402
from medclf.model.artifact import ModelCard, load_artifact, save_artifact  # noqa: E402
from medclf.model.networks import build_model
from medclf.imaging.preprocess import preprocess  # noqa: E402
from medclf.ops.runs import ALLOCATOR_ENV  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from treerss import TreeRSS  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")


def make_model(tmp: str, arch: str, size: int, test_time_hflip: bool = False) -> str:
    torch.manual_seed(0)
    model = build_model(arch, 2).eval()  # weights don't change the cost; random init is fine
    card = ModelCard(arch=arch, classes=["NORMAL", "PNEUMONIA"], preprocess={"image_size": size, "mean": 0.5, "std": 0.25},
                     positive_class="PNEUMONIA", threshold=0.5, test_time_hflip=test_time_hflip)
    path = os.path.join(tmp, f"model-{arch}-{size}" + ("-hflip" if test_time_hflip else ""))
    save_artifact(model, card, path)
    return path


def _local_copy(files: list[str], folder: str) -> str:
    """The chosen files under one folder (hard links where possible), as the S3 copy has them."""
    if not os.path.isdir(folder):
        os.makedirs(folder)
        for i, f in enumerate(files):
            dest = os.path.join(folder, f"{i:06d}.jpeg")
            try:
                os.link(f, dest)
            except OSError:
                shutil.copyfile(f, dest)
    return folder


def plain_loop(files: list[str], model_path: str, threads: int, batch_size: int, channels_last: bool = False) -> float:
    """The baseline: one process, read -> sha256 -> decode -> preprocess -> model, in batches.

    channels_last=True gives the loop the same NHWC inference layout medclf's actor uses.
    """
    torch.set_num_threads(threads)
    model, card = load_artifact(model_path)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    spec = card.preprocess_spec
    start = time.perf_counter()
    for i in range(0, len(files), batch_size):
        tensors = []
        for path in files[i : i + batch_size]:
            data = open(path, "rb").read()
            hashlib.sha256(data).hexdigest()
            tensors.append(preprocess(decode(data, path).image, spec))
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(tensors)).contiguous(memory_format=layout)
            torch.softmax(model(x), 1).numpy()
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="*", default=[1000, 5000], help="archive sizes for throughput")
    ap.add_argument("--memory-n", type=int, nargs="*", default=[2000, 20000], help="phantom archive sizes for memory")
    ap.add_argument("--data", default=os.path.join(SHARED, "data", "chest_xray", "train"), help="JPEG source folder")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, for both pipelines")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--use-gpu", action="store_true", help="run medclf's model actor on the GPU")
    ap.add_argument("--runtimes", nargs="+", default=["torch"], choices=["torch", "onnxruntime"],
                    help="score.runtime values to measure")
    ap.add_argument("--sources", nargs="+", default=["s3"], choices=["s3", "local"],
                    help="where medclf reads the files from: the local S3 server, or local disk")
    ap.add_argument("--hflip-tta", action="store_true",
                    help="also score with the mirror-image mean (model.test_time_hflip, as breast_us.yaml ships) "
                         "and give its cost against the same pipeline without it")
    args = ap.parse_args()

    import ray
    import s3fs

    from medclf.ops.devserver import local_s3_server
    from medclf.data.phantoms import generate
    from medclf.score.batch import run_scoring

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.data) for f in fs if f.lower().endswith(".jpeg"))
    if args.n and len(files) < max(args.n):
        sys.exit(f"{args.data}: only {len(files)} JPEGs, need {max(args.n)}")
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(prefix="medclf-bench-")
    results = []
    with local_s3_server() as endpoint:
        os.environ.update({k: os.environ.get(k, v) for k, v in ALLOCATOR_ENV.items()})  # as medclf.ops.runs.init_ray
        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        model_path = make_model(tmp, args.arch, args.image_size)
        tta_path = make_model(tmp, args.arch, args.image_size, test_time_hflip=True) if args.hflip_tta else None
        s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        s3.mkdir("bench")
        cfg = load_config(None, [
            f"score.batch_size={args.batch_size}", "score.num_actors=1", "score.cpus_per_actor=1",
            f"score.torch_threads={args.threads}", "score.decode_batch_size=16", "score.rows_per_file=2000",
            f"score.use_gpu={str(args.use_gpu).lower()}", "score.extensions=[.jpeg]", "score.uids=drop",
        ])
        for n in args.n:
            chosen = sorted(rng.choice(files, n, replace=False))
            for i, f in enumerate(chosen):
                s3.pipe(f"bench/xray-{n}/{i:06d}.jpeg", open(f, "rb").read())
            baseline = plain_loop(chosen, model_path, args.threads, args.batch_size)
            tuned = plain_loop(chosen, model_path, args.threads, args.batch_size, channels_last=True)
            print(f"N={n}: plain loop {baseline:.1f} images/s (local files), with channels_last {tuned:.1f}", flush=True)
            for runtime in args.runtimes:
                for source in args.sources:
                    if runtime == "onnxruntime" and args.use_gpu:
                        continue
                    cfg.score.runtime = runtime
                    src = f"s3://bench/xray-{n}" if source == "s3" else _local_copy(chosen, os.path.join(tmp, f"x-{n}"))
                    out = f"s3://bench/pred-{n}-{runtime}" if source == "s3" else os.path.join(tmp, f"pred-{n}-{runtime}")
                    summary = run_scoring(cfg, f"bench-{n}-{runtime}-{source}", src, model_path, out)
                    assert summary.scored == n, summary
                    rate = n / summary.seconds
                    results.append(("throughput", n, rate, baseline))
                    print(f"N={n}: medclf runtime={runtime} from {source}: {rate:.1f} images/s (end to end, start-up "
                          f"included) -> {rate / baseline:.2f}x the plain loop, {rate / tuned:.2f}x the channels_last "
                          "loop", flush=True)
                    if tta_path:
                        summary = run_scoring(cfg, f"bench-{n}-{runtime}-{source}-hflip", src, tta_path, out + "-hflip")
                        assert summary.scored == n, summary
                        tta_rate = n / summary.seconds
                        print(f"N={n}: medclf runtime={runtime} from {source} with the mirror-image mean: "
                              f"{tta_rate:.1f} images/s -> {tta_rate / rate:.2f}x the same pipeline without it",
                              flush=True)
        ray.shutdown()

    for n in args.memory_n:
        root = os.path.join(tmp, f"phantoms-{n}")
        generate(root, n_train=2, n_test=n, image_size=128, formats=("png",), seed=1)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        model_path = make_model(tmp, "small_cnn", 128)
        mcfg = load_config(None, ["score.batch_size=64", "score.cpus_per_actor=1", "score.rows_per_file=5000",
                                  "score.extensions=[.png]", "score.uids=drop"])
        with TreeRSS() as rss:
            summary = run_scoring(mcfg, f"mem-{n}", os.path.join(root, "test"), model_path,
                                  os.path.join(tmp, f"pred-mem-{n}"))
        ray.shutdown()
        results.append(("memory", n, rss.peak / 2**20, summary.seconds))
        print(f"memory N={n}: peak RSS of all Ray processes {rss.peak / 2**20:.0f} MiB "
              f"({summary.scored} scored in {summary.seconds:.0f}s)", flush=True)
    mem = {n: v for kind, n, v, _ in results if kind == "memory"}
    if len(mem) == 2:
        a, b = sorted(mem)
        print(f"memory ratio N={b} / N={a}: {mem[b] / mem[a]:.2f} (target <= 1.25)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
