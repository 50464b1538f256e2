"""Issue 32 item 3: what an ensemble costs at scoring time, images/s of each member alone vs the ensemble
of them, in the same run, through the scoring actor (medclf.score.predictor.Predictor.logits_and_features:
the forward pass and the features the out-of-scope guard reads) on preprocessed phantom batches, CPU,
one thread count for all.

The members are untrained networks saved as artifacts (a forward pass costs the same whatever the
weights), and the ensemble artifact is built from them as `medclf ensemble` builds it, minus the guard
and reference (they do not run in the forward pass).

    nice python benchmarks/ensemble_cost.py --archs resnet18 efficientnet_lite0 --image-size 224 --threads 1
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

from medclf.config import PreprocessConfig  # noqa: E402
from medclf.data.phantoms import render  # noqa: E402
from medclf.imaging.preprocess import preprocess_gray  # noqa: E402
from medclf.model.artifact import ModelCard, read_artifact, save_artifact  # noqa: E402
from medclf.model.networks import build_model  # noqa: E402
from medclf.score.predictor import Predictor  # noqa: E402
from medclf.model.ensemble import ENSEMBLE_ARCH  # noqa: E402
from medclf.train.ensemble import join_networks, member_entry  # noqa: E402

CLASSES = ["NORMAL", "POSITIVE"]


def phantom_pixels(n: int, size: int) -> np.ndarray:
    """n preprocessed phantoms (N, 1, S, S), half of them positive."""
    spec = PreprocessConfig(image_size=size)
    return np.stack([preprocess_gray(render(np.random.default_rng([9, 0, i]), np.random.default_rng([9, 1, i]), size,
                                            bool(i % 2)).image, spec) for i in range(n)])


def save_members(archs: list[str], size: int, root: str) -> list[str]:
    """One untrained member artifact per arch (temperatures 1.0 and up, so the ensemble must use them)."""
    paths = []
    for i, arch in enumerate(archs):
        torch.manual_seed(i)
        card = ModelCard(arch=arch, classes=CLASSES, preprocess={"image_size": size}, positive_class="POSITIVE",
                         threshold=0.5, temperature=1.0 + 0.25 * i)
        paths.append(os.path.join(root, f"m{i}"))
        save_artifact(build_model(arch, 2).eval(), card, paths[-1])
    return paths


def save_ensemble(member_paths: list[str], size: int, root: str) -> str:
    members = [read_artifact(p) for p in member_paths]
    card = ModelCard(arch=ENSEMBLE_ARCH, classes=CLASSES, preprocess={"image_size": size}, positive_class="POSITIVE",
                     threshold=0.5, config={"ensemble": {"members": [member_entry(m) for m in members]}})
    dest = os.path.join(root, "ensemble")
    save_artifact(join_networks(members), card, dest)
    return dest


def images_per_second(model_path: str, x: np.ndarray, batch: int, threads: int, repeats: int) -> float:
    """Best of `repeats` passes over x (after one warm-up batch) through the scoring actor's forward."""
    predictor = Predictor(model_path, "bench", threads=threads)
    predictor.logits_and_features(x[:batch])
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(0, len(x), batch):
            predictor.logits_and_features(x[i:i + batch])
        best = max(best, len(x) / (time.perf_counter() - started))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "efficientnet_lite0"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--n", type=int, default=64, help="images per pass")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = phantom_pixels(args.n, args.image_size)
    with tempfile.TemporaryDirectory() as root:
        members = save_members(args.archs, args.image_size, root)
        ensemble = save_ensemble(members, args.image_size, root)
        rates = {arch: images_per_second(path, x, args.batch, args.threads, args.repeats)
                 for arch, path in zip(args.archs, members)}
        rates["ensemble"] = images_per_second(ensemble, x, args.batch, args.threads, args.repeats)
    print(f"{args.n} phantoms at {args.image_size} px, batch {args.batch}, {args.threads} thread(s), CPU, "
          f"best of {args.repeats}; torch {torch.__version__}")
    for name, rate in rates.items():
        print(f"  {name:<20} {rate:8.1f} images/s")
    for arch in args.archs:
        print(f"  ensemble / {arch}: {rates['ensemble'] / rates[arch]:.2f}x the images/s "
              f"({rates[arch] / rates['ensemble']:.2f}x the time per image)")
    expected = 1 / sum(1 / rates[a] for a in args.archs)
    print(f"  ensemble / (members run one after the other): {rates['ensemble'] / expected:.2f}")


if __name__ == "__main__":
    main()
