"""score.compile against the eager network, in the inference actor's own code (medclf.score.predictor).

One process with medclf's allocator settings (as a scoring actor has them): a Predictor on the
pneumonia config's model (EfficientNet-Lite0 224 px, untrained: weights do not change the cost), eager
(BatchNorm folded; convolution + activation fused on a CPU) and compiled (`compile_model=True`). Prints
the compile time (first call, then a second batch shape), images/s of each over the same random batch,
alternating, the ratio's 95% percentile-bootstrap CI over repeats, and the largest output change.
Runs on a GPU when there is one (float16 autocast, as scoring does).

    python benchmarks/compile_forward.py --batch 64 --repeats 6
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if os.environ.get("MALLOC_ARENA_MAX") is None:  # glibc reads these at start: re-run with them set
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from medclf.ops.runs import ALLOCATOR_ENV

    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from score_vs_loop import ci, make_model  # noqa: E402

from medclf.score.predictor import Predictor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    model = make_model(tempfile.mkdtemp(prefix="medclf-compile-"))
    eager = Predictor(model, "bench", use_gpu=cuda, threads=args.threads)
    compiled = Predictor(model, "bench", use_gpu=cuda, threads=args.threads, compile_model=True)
    pixels = np.random.default_rng(0).random((args.batch, 1, 224, 224), dtype=np.float32)
    started = time.perf_counter()
    out = compiled.logits_and_features(pixels)
    first = time.perf_counter() - started
    started = time.perf_counter()
    compiled.logits_and_features(pixels[: max(1, args.batch * 5 // 8)])
    second = time.perf_counter() - started
    change = float(np.abs(out[0] - eager.logits_and_features(pixels)[0]).max())
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name, predictor in (("eager", eager), ("compiled", compiled)):
            started = time.perf_counter()
            predictor.logits_and_features(pixels)
            rates[name].append(args.batch / (time.perf_counter() - started))
    ratio = np.asarray(rates["compiled"]) / np.asarray(rates["eager"])
    lo, hi = ci(list(ratio))
    device = torch.cuda.get_device_name(0) if cuda else f"{os.cpu_count()} CPUs, {args.threads} threads"
    print(f"device: {device}; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"compile: first call {first:.1f} s, a second batch shape {second:.1f} s")
    print(f"RESULT batch {args.batch}: eager {np.median(rates['eager']):.1f} images/s, compiled "
          f"{np.median(rates['compiled']):.1f}; compiled / eager {ratio.mean():.2f}x (95% CI {lo:.2f}-{hi:.2f}, "
          f"{args.repeats} repeats); largest logit change {change:.1e}")


if __name__ == "__main__":
    main()
