"""score.precision: what bfloat16 changes against float32, on real films, in one run (issue 35, item 3).

The scoring actor (medclf.score.predictor.Predictor) scores the same preprocessed films twice, float32 and
`--precision` (default bfloat16), alternating batches so both share the machine's load. With `--unfolded`
the float32 side is the artifact's network as stored (BatchNorms not folded, medclf.model.fold, and no
convolution fused with its activation, medclf.model.conv_fusion), so `--precision float32 --unfolded`
measures what those rewrites alone change:
- forward speed: images/s of each (the actor's forward pass with the guard's features, batch 32), and the
  ratio, with a 95% bootstrap CI over batches' paired time ratios;
- agreement: the largest and the 99th-percentile change of the positive probability, decisions that
  change sides at the card's threshold, and out-of-scope calls (the kNN guard) that change.

    PYTHONPATH=. python benchmarks/precision_agreement.py --model RUN/model --splits RUN/splits.parquet --part patient
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from adaptation import load_validation  # noqa: E402

from medclf.imaging.decode import decode  # noqa: E402
from medclf.imaging.preprocess import preprocess_gray  # noqa: E402
from medclf.model.networks import class_probabilities  # noqa: E402
from medclf.score.predictor import Predictor  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--splits", required=True, help="a training run's splits.parquet (its validation films)")
    ap.add_argument("--part", default="patient")
    ap.add_argument("--precision", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--unfolded", action="store_true", help="the float32 side is the network as stored")
    args = ap.parse_args(argv)

    import torch

    base = Predictor(args.model, "precision", threads=args.threads)
    other = Predictor(args.model, "precision", threads=args.threads, precision=args.precision)
    if args.unfolded:
        from medclf.model.artifact import load_artifact

        base.model = load_artifact(args.model)[0].to(memory_format=torch.channels_last)
    card = base.card
    val = load_validation(args.splits, args.part, None, 0)
    x = np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, card.preprocess_spec) for p in val["path"]])
    print(f"{len(x)} {args.part} validation films; model {card.model_id}; torch {torch.__version__}, "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.1f}", flush=True)
    for p in (base, other):  # warm-up: oneDNN picks and caches its kernels on the first call
        p.logits_and_features(x[:args.batch_size])
    if args.unfolded and args.precision == "float32":
        args.precision = "float32 folded+fused"  # the two sides' names
    out = {"float32": [], args.precision: []}
    times = {"float32": [], args.precision: []}
    for i in range(0, len(x), args.batch_size):
        for name, p in (("float32", base), (args.precision, other)) if (i // args.batch_size) % 2 == 0 else \
                ((args.precision, other), ("float32", base)):
            start = time.perf_counter()
            logits, features = p.logits_and_features(x[i:i + args.batch_size])
            times[name].append(time.perf_counter() - start)
            out[name].append((logits, features))
    pos = card.positive_index
    result = {}
    for name, parts in out.items():
        logits = np.concatenate([a for a, _ in parts])
        features = np.concatenate([b for _, b in parts])
        probs = class_probabilities(torch.from_numpy(logits), card.temperature).numpy()
        ood = base.domain.scores(features, logits) if base.domain is not None else None
        result[name] = (probs, ood)
    n = len(x)
    t32, t16 = np.array(times["float32"]), np.array(times[args.precision])
    ratio = t32.sum() / t16.sum()
    rng = np.random.default_rng(0)
    boots = [t32[idx].sum() / t16[idx].sum() for idx in (rng.integers(0, len(t32), len(t32))
                                                        for _ in range(args.resamples))]
    print(f"forward (with the guard's features), batch {args.batch_size}: float32 {n / t32.sum():.1f} images/s, "
          f"{args.precision} {n / t16.sum():.1f} images/s; ratio {ratio:.2f}x "
          f"(95% CI {np.percentile(boots, 2.5):.2f}-{np.percentile(boots, 97.5):.2f}, bootstrap over batches)")
    (p32, ood32), (p16, ood16) = result["float32"], result[args.precision]
    if pos is not None:
        d = np.abs(p16[:, pos] - p32[:, pos])
        flips = int(((p16[:, pos] >= card.threshold) != (p32[:, pos] >= card.threshold)).sum())
        near = int((np.abs(p32[:, pos] - card.threshold) <= d.max()).sum())
        print(f"{card.positive_class} probability change: max {d.max():.4f}, 99th percentile "
              f"{np.percentile(d, 99):.4f}, median {np.median(d):.5f}; decisions that change side of the "
              f"threshold {card.threshold:.4f}: {flips}/{n} (films within the max change of it: {near})")
    else:
        d = np.abs(p16 - p32).max(1)
        flips = int((p16.argmax(1) != p32.argmax(1)).sum())
        print(f"probability change: max {d.max():.4f}; argmax changes {flips}/{n}")
    if ood32 is not None:
        t = base.domain.record.threshold
        print(f"guard score change: max {np.abs(ood16 - ood32).max():.4f} (threshold {t:.4f}); out-of-scope calls "
              f"that change: {int(((ood16 > t) != (ood32 > t)).sum())}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
