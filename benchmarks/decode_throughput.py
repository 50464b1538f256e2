"""Decode throughput per DICOM transfer syntax on the pydicom + pydicom-data corpus.

Decodes every frame of every decodable .dcm file (medclf.imaging.decode.open_images, the code scoring
runs; no resize, no model) in one process, repeating each file until it has used `--min-seconds`
of CPU time, and prints a Markdown table: transfer syntax, files, frames, megapixels per frame (median),
images (frames) per second, megapixels per second (all files of that syntax together). Time is
the process's CPU time (the decoders are single-threaded), so the figures are per core and hold
on a machine other work is loading; `--wall` uses wall-clock time instead.

    python benchmarks/decode_throughput.py [--min-seconds 0.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom  # noqa: E402
from pydicom.data import get_testdata_files  # noqa: E402

from medclf.imaging.decode import DecodeError, open_images  # noqa: E402


def transfer_syntax(path: str) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return ts.name if ts is not None else "(no file meta: implicit/explicit little endian)"


def time_file(data: bytes, path: str, min_seconds: float, clock=time.process_time) -> tuple[int, float, float]:
    """(frames per pass, seconds per pass, megapixels per frame); raises DecodeError if not decodable."""
    passes, frames, start = 0, 0, clock()
    while True:
        images = open_images(data, path, "all")
        for f in images.frames:
            image = images.image(f).image
        frames = len(images.frames)
        passes += 1
        elapsed = clock() - start
        if elapsed >= min_seconds:
            return frames, elapsed / passes, image.size / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-seconds", type=float, default=0.5, help="time each file at least this long")
    parser.add_argument("--wall", action="store_true", help="wall-clock time instead of CPU time")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows: dict = defaultdict(lambda: {"files": 0, "frames": 0, "seconds": 0.0, "mpx": [], "mpx_total": 0.0})
    files = sorted({f for f in get_testdata_files("*.dcm") if os.path.isfile(f)})
    for path in files:
        data = open(path, "rb").read()
        try:
            frames, seconds, mpx = time_file(data, path, args.min_seconds,
                                             time.perf_counter if args.wall else time.process_time)
        except DecodeError:
            continue  # pixel-less or broken: nothing to time
        row = rows[transfer_syntax(path)]
        row["files"] += 1
        row["frames"] += frames
        row["seconds"] += seconds
        row["mpx"].append(mpx)
        row["mpx_total"] += frames * mpx
    print("| transfer syntax | files | frames | Mpx/frame (median) | images/s | Mpx/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in sorted(rows.items(), key=lambda kv: -kv[1]["frames"] / kv[1]["seconds"]):
        mpx = statistics.median(row["mpx"])
        rate = row["frames"] / row["seconds"]
        print(f"| {name} | {row['files']} | {row['frames']} | {mpx:.2f} | {rate:.0f} | "
              f"{row['mpx_total'] / row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
