"""Does the actor's device decode (medclf.imaging.device_decode: nvJPEG on a GPU) give the model the input the
CPU decode task gives? Per film: the mean and worst gap of the model's input in [0, 1] grey levels, and the
largest gap in the drift statistics, against DRAFT_TOLERANCE. Run by benchmarks/gpu_check.sh on the GPU;
the same comparison on 'cpu' is asserted by tests/imaging/test_device_decode.py.

    python benchmarks/device_tolerance.py FOLDER [--device cuda] [--n 16]

Prints one JSON line; exits 1 when a film is outside the tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()
    import numpy as np
    import torch

    from medclf.config import PreprocessConfig
    from medclf.imaging.device_decode import decode_on_device
    from medclf.imaging.draft import DRAFT_TOLERANCE
    from medclf.imaging.stage import _file_rows

    device = args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu"
    spec = PreprocessConfig(image_size=224, mean=0.5, std=0.25)
    paths = sorted(os.path.join(args.folder, f) for f in os.listdir(args.folder))[: args.n]
    blobs = [open(p, "rb").read() for p in paths]
    judged = decode_on_device(blobs, paths, spec, None, device)
    mean_gaps, worst_gaps, stat_gaps = [], [], []
    for path, data, result in zip(paths, blobs, judged):
        task = next(_file_rows(path, spec, None, "middle", None, data=data))
        gap = np.abs(result.pixels.float().cpu().numpy() - task["pixels"]) * spec.std
        mean_gaps.append(float(gap.mean()))
        worst_gaps.append(float(gap.max()))
        stat_gaps.append(max(abs(result.stats[k] - task["stats"][k]) for k in task["stats"]))
    ok = max(mean_gaps) <= DRAFT_TOLERANCE["mean_abs"] and max(worst_gaps) <= DRAFT_TOLERANCE["max_abs"]
    print(json.dumps({"device_tolerance": device, "films": len(paths), "mean_gap_max": round(max(mean_gaps), 6),
                      "worst_gap_max": round(max(worst_gaps), 6), "stats_gap_max": round(max(stat_gaps), 6),
                      "tolerance": DRAFT_TOLERANCE, "within": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
