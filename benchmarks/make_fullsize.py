"""Full-size benchmark archives (issue 35): the sizes and encodings hospitals store, not 224 px JPEGs.

    python benchmarks/make_fullsize.py OUT_DIR [--n 200] [--kinds jpeg,png16,dcm,dcm-j2k,dcm-jls]
        [--films ../shared/data/chest_xray/train] [--size 2048]

Writes OUT_DIR/<kind>/NNNNN.<ext> (not committed; a folder the user names):
- jpeg:    SIZE x SIZE 8-bit grayscale JPEG q90, a Kermany train film upscaled (bicubic) with a little
           film grain (sigma 2 grey levels) so the file holds as much entropy as a scanned film
           (~0.5-1 MB), not the smooth output of an upscaler that JPEG would compress to almost nothing;
- png16:   the same films as 16-bit grayscale PNG (12 bits used, as a CR/DX exports);
- dcm:     pydicom-data's real chest CR RG1_UNCR.dcm (1841 x 1955, 15-bit, MONOCHROME1), uncompressed;
- dcm-j2k: its real JPEG 2000 lossless twin RG1_J2KR.dcm, pixel data as shipped;
- dcm-jls: RG1_UNCR re-encoded JPEG-LS lossless (pydicom's encoder via pyjpegls), once, then copied.
Each DICOM copy gets new Study/Series/SOP Instance UIDs (every file is a distinct object, as in a PACS
export), so checksums and exactly-once keys differ per file; pixels are the real ones.
The Kermany films (read-only, ../shared/data) are read, never written; tests never need this script.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("jpeg", "png16", "dcm", "dcm-j2k", "dcm-jls")
DEFAULT_FILMS = os.path.join("..", "shared", "data", "chest_xray", "train")


def film_paths(root: str) -> list[str]:
    paths = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not paths:
        raise SystemExit(f"{root}: no JPEG/PNG films found (pass --films)")
    return paths


def upscaled(path: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A film as float32 SIZE x SIZE grey levels 0..255: bicubic upscale plus grain."""
    film = Image.open(path).convert("L").resize((size, size), Image.BICUBIC)
    arr = np.asarray(film, np.float32)
    return np.clip(arr + rng.normal(0.0, 2.0, arr.shape).astype(np.float32), 0, 255)


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.round().astype(np.uint8), "L").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png16_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # 12 bits used of 16, as CR/DX exports do; decode.py scales 16-bit PNGs by 65535.
    Image.fromarray((arr * (4095.0 / 255.0)).round().astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def dicom_template(kind: str):
    import pydicom
    from pydicom.data import get_testdata_file

    if kind == "dcm-j2k":
        return pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm"))
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    if kind == "dcm-jls":
        from pydicom.uid import JPEGLSLossless

        ds.compress(JPEGLSLossless)  # needs pyjpegls; raises with pydicom's own message if absent
    return ds


def dicom_copy(template, index: int) -> bytes:
    from pydicom.uid import generate_uid

    ds = copy.deepcopy(template)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.InstanceNumber = index + 1
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def generate(out: str, n: int, kinds: list[str], films: str, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    written: dict = {}
    paths = film_paths(films) if {"jpeg", "png16"} & set(kinds) else []
    for kind in kinds:
        folder = Path(out) / kind
        folder.mkdir(parents=True, exist_ok=True)
        total = 0
        template = dicom_template(kind) if kind.startswith("dcm") else None
        for i in range(n):
            if template is not None:
                data, ext = dicom_copy(template, i), ".dcm"
            else:
                arr = upscaled(paths[i % len(paths)], size, rng)
                data, ext = (jpeg_bytes(arr), ".jpeg") if kind == "jpeg" else (png16_bytes(arr), ".png")
            (folder / f"{i:05d}{ext}").write_bytes(data)
            total += len(data)
        written[kind] = {"files": n, "mean_mb": round(total / n / 2**20, 2), "folder": str(folder)}
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--films", default=DEFAULT_FILMS)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise SystemExit(f"unknown kind(s) {bad}; choose from {KINDS}")
    for kind, info in generate(args.out, args.n, kinds, args.films, args.size, args.seed).items():
        print(f"{kind}: {info['files']} files, {info['mean_mb']} MB each -> {info['folder']}", file=sys.stderr)


if __name__ == "__main__":
    main()
