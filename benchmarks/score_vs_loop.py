"""`medclf score` against a plain single-process loop, at 224 px and at full size (issue 35, item 4).

For each archive kind, in one run (so the ratios share the machine's load):
- the plain loop: one process, read -> sha256 -> full decode (no draft; DICOM by pydicom's own LUT
  functions: `plain_decode`) -> the same preprocessing ->
  eager torch (channels_last, `--threads` threads) in batches of 32;
- medclf: `run_scoring` on a local Ray already started as `medclf score` starts it (Ray's own start excluded;
  its workers get medclf's allocator settings, medclf.ops.runs.ALLOCATOR_ENV), with the pneumonia
  config's model (EfficientNet-Lite0, 224 px, untrained: weights do not change the cost), local
  files, Parquet committed; its own summary line, stage costs included, is printed.
Each pair runs `--repeats` times, alternating; the ratio's 95% CI is a percentile bootstrap over the
per-repeat ratios (with 2 repeats it is only the range). The first kind's first repeat is a fresh Ray's
first job, as every `medclf score` job is (it starts its own Ray), so its start-up (the wall seconds to the
first answer, paid once per run, printed per repeat) is the longest: measure one kind per command to give
each kind its cold repeat. Then peak memory (RSS of the whole Ray
process tree) scoring `--memory-n` 224 px films: the ratio of the largest to the smallest N.

    python benchmarks/make_fullsize.py /tmp/fs --n 100            # full-size archives first
    python benchmarks/score_vs_loop.py --fullsize /tmp/fs --kinds jpeg224 jpeg dcm --n 100
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from medclf.config import load_config  # noqa: E402
from medclf.imaging.decode import decode  # noqa: E402
from medclf.imaging.preprocess import preprocess  # noqa: E402
from medclf.model.artifact import ModelCard, load_artifact, save_artifact  # noqa: E402
from medclf.model.networks import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERMANY = os.path.join(REPO, "..", "shared", "data", "chest_xray", "train")
CONFIG = os.path.join(REPO, "configs", "pneumonia_xray.yaml")


def make_model(tmp: str) -> str:
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg.model.arch, 2).eval()
    card = ModelCard(arch=cfg.model.arch, classes=list(cfg.data.classes), positive_class=cfg.data.positive_class,
                     preprocess=cfg.preprocess.model_dump(), threshold=0.5)
    path = os.path.join(tmp, "model")
    save_artifact(model, card, path)
    return path


def plain_decode(data: bytes, path: str) -> np.ndarray:
    """What a plain loop decodes with: Pillow's full decode for JPEG/PNG (medclf's decode without draft
    mode), and for DICOM pydicom's own pipeline (pixel_array, apply_modality_lut, apply_voi_lut, in
    float64), mapped to [0, 1] by the window's range and MONOCHROME1 inverted, as medclf's image is."""
    if not path.lower().endswith(".dcm"):
        return decode(data, path).image
    import io

    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(io.BytesIO(data))
    values = apply_modality_lut(ds.pixel_array, ds)
    lo, hi = apply_voi_lut(np.array([-(2**31), 2**31 - 1], np.int64), ds)
    image = np.clip((apply_voi_lut(values, ds) - lo) / (hi - lo), 0.0, 1.0)
    return 1.0 - image if ds.PhotometricInterpretation == "MONOCHROME1" else image


def plain_loop(files: list[str], model_path: str, threads: int, batch_size: int = 32) -> float:
    """Images/s of the baseline: full decode, the same preprocessing, eager torch."""
    torch.set_num_threads(threads)
    model, card = load_artifact(model_path)
    model = model.eval().to(memory_format=torch.channels_last)
    spec = card.preprocess_spec
    start = time.perf_counter()
    for i in range(0, len(files), batch_size):
        tensors = []
        for path in files[i:i + batch_size]:
            data = open(path, "rb").read()
            hashlib.sha256(data).hexdigest()
            tensors.append(preprocess(plain_decode(data, path), spec))
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(tensors)).contiguous(memory_format=torch.channels_last)
            torch.softmax(model(x), 1).numpy()
    return len(files) / (time.perf_counter() - start)


def ci(values: list[float], seed: int = 0) -> tuple[float, float]:
    v = np.asarray(values, float)
    if len(v) < 3:
        return float(v.min()), float(v.max())
    boots = np.random.default_rng(seed).choice(v, (2000, len(v))).mean(axis=1)
    return float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def kind_files(kind: str, fullsize: str, n: int, films: str = KERMANY) -> list[str]:
    folder = films if kind == "jpeg224" else os.path.join(fullsize, kind)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith((".jpeg", ".jpg", ".png", ".dcm")))
    if len(files) < n:
        sys.exit(f"{folder}: {len(files)} files, need {n} (benchmarks/make_fullsize.py makes them)")
    return list(np.random.default_rng(0).choice(files, n, replace=False)) if kind == "jpeg224" else files[:n]


def link_folder(files: list[str], folder: str) -> str:
    """Hard links (a copy across file systems): scoring refuses a symlink that leaves the input folder
    (score.allowed_roots)."""
    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(files):
        dest = os.path.join(folder, f"{i:06d}{os.path.splitext(f)[1]}")
        try:
            os.link(f, dest)
        except OSError:
            shutil.copyfile(f, dest)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fullsize", default=None, help="folder written by benchmarks/make_fullsize.py")
    ap.add_argument("--films", default=KERMANY, help="the 224 px Kermany train films (kind jpeg224)")
    ap.add_argument("--kinds", nargs="+", default=["jpeg224", "jpeg", "dcm"])
    ap.add_argument("--n", type=int, nargs="+", default=[200], help="files per kind (one value, or one per kind)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="Ray's num_cpus")
    ap.add_argument("--memory-n", type=int, nargs="*", default=[500, 5000])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto", help="medclf's score.precision (the loop stays float32)")
    args = ap.parse_args()
    shell_malloc = sorted(k for k in os.environ if k.startswith("MALLOC_"))  # init_ray adds medclf's below

    import ray

    from medclf.score.batch import run_scoring
    from treerss import TreeRSS

    tmp = tempfile.mkdtemp(prefix="medclf-vsloop-")
    model_path = make_model(tmp)
    from medclf.ops.runs import init_ray

    cfg = load_config(CONFIG, [f"score.batch_size={args.batch_size}", "score.num_actors=1",
                               "score.cpus_per_actor=1", f"score.torch_threads={args.threads}", f"score.precision={args.precision}",
                               "score.uids=drop", "score.extensions=[.jpeg, .png, .dcm]", "score.rescore=true",
                               "ood.enabled=false", f"ray.num_cpus={args.cpus}"])
    # Ray starts as `medclf score` starts it (medclf.ops.runs.init_ray), with medclf's allocator settings
    # for its workers. This process, where the plain loop runs, started with whatever the shell gave it:
    # glibc reads its settings once, at start, so the loop stays plain.
    init_ray(cfg, state_api=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}; the loop's process started with "
          f"MALLOC_* {shell_malloc or 'unset'}", flush=True)
    results = {}
    ns = args.n * len(args.kinds) if len(args.n) == 1 else args.n
    for kind, n in zip(args.kinds, ns):
        files = kind_files(kind, args.fullsize, n, args.films)
        src = link_folder(files, os.path.join(tmp, f"in-{kind}"))
        ratios, startups = [], []
        for r in range(args.repeats):
            loop = plain_loop(files, model_path, args.threads, args.batch_size)
            summary = run_scoring(cfg, f"vs-{kind}-{r}", src, model_path, os.path.join(tmp, f"out-{kind}-{r}"))
            assert summary.scored == n, summary
            ratios.append(summary.images_per_s / loop)
            startups.append(summary.startup_s)  # paid once per run (medclf.score.costs)
            print(f"[{kind} n={n} repeat {r}] plain loop {loop:.1f} images/s; medclf {summary}", flush=True)
            print(f"[{kind} n={n} repeat {r}] ratio medclf / loop = {ratios[-1]:.2f}", flush=True)
        lo, hi = ci(ratios)
        results[kind] = (float(np.mean(ratios)), lo, hi)
        print(f"RESULT {kind} n={n}: medclf / plain loop {np.mean(ratios):.2f}x "
              f"(95% CI {lo:.2f}-{hi:.2f}, {len(ratios)} repeats; load average now {os.getloadavg()[0]:.1f})",
              flush=True)
        print(f"RESULT {kind} n={n} repeats {', '.join(f'{r:.2f}' for r in ratios)}; start-up "
              f"{', '.join(f'{s:.1f}' for s in startups)} s", flush=True)
    peaks = {}
    for n in args.memory_n:
        files = kind_files("jpeg224", args.fullsize, n, args.films)
        src = link_folder(files, os.path.join(tmp, f"mem-{n}"))
        with TreeRSS() as rss:
            summary = run_scoring(cfg, f"mem-{n}", src, model_path, os.path.join(tmp, f"out-mem-{n}"))
        peaks[n] = rss.peak / 2**20
        print(f"memory N={n}: peak RSS of all Ray processes {peaks[n]:.0f} MiB; {summary}", flush=True)
    if len(peaks) >= 2:
        a, b = min(peaks), max(peaks)
        print(f"RESULT memory N={b} / N={a}: {peaks[b] / peaks[a]:.2f}x (target <= 1.25)", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
