"""Profile the decode stage on a folder, in one process (no Ray), for docs/performance.md (issue 35).

    py-spy record --format raw -o stage.txt -- python benchmarks/profile_stage.py FOLDER [--no-draft]
    python benchmarks/profile_stage.py --top stage.txt      # self time by function, top 12

`--no-draft` decodes every JPEG at full size (the code before issue 35), to profile before and after.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def top(raw: str, k: int = 12, within: str = "_file_rows") -> None:
    """py-spy's raw (collapsed) stacks -> share of samples by leaf function, counting only the samples
    inside the stage (`within`), not the imports before it. A leaf in C code shows as its Python caller."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in open(raw):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if within not in stack:
            continue
        frames = [f for f in stack.split(";") if f.strip()]
        leaf = frames[-1]
        counts[leaf.split(" (")[0] + " (" + leaf.split(" (")[-1] if " (" in leaf else leaf] += int(n)
        total += int(n)
    for leaf, n in counts.most_common(k):
        print(f"{100 * n / total:5.1f}%  {leaf}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", nargs="?")
    ap.add_argument("--no-draft", action="store_true")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--top", default=None)
    args = ap.parse_args()
    if args.top:
        return top(args.top)
    import medclf.imaging.decode as decode_mod
    from medclf.imaging.stage import load_images

    if args.no_draft:
        decode_mod.apply_draft = lambda img, min_side: None
    files = sorted(os.path.join(args.folder, f) for f in os.listdir(args.folder))
    start = time.perf_counter()
    n = sum(len(b["path"]) for b in load_images({"path": np.array(files, object)}, {"image_size": args.size}))
    print(f"{n} images, {n / (time.perf_counter() - start):.1f} images/s (one process)")


if __name__ == "__main__":
    main()
