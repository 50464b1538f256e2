"""Build `.gpu/`, what one device call carries for benchmarks/gpu_check.sh (issue 35), in one command.

The device machine has Python 3.12 and torch + torchvision, but no Ray, pydantic or jsonschema, and a
call carries at most 64 MiB. This copies the committed medclf/, benchmarks/ and configs/ (git archive of
HEAD), 64 films, and the wheels the check needs, with Ray's wheel stripped of what scoring never loads
(ray/jars, the dashboard's web build, RLlib: 79 MB -> about 43 MB), and checks the total.

    python benchmarks/gpu_carry.py FILMS_DIR            # writes ./.gpu (git-ignored)

then one `run` call with carry [".gpu"]: see docs/performance.md, "Re-running the GPU check".
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

WHEELS = ["ray==2.60.0", "pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types", "typing-inspection",
          "jsonschema", "jsonschema-specifications", "referencing", "rpds-py"]
STRIP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/")
CARRY_LIMIT = 64 * 2**20


def strip_wheel(path: str) -> None:
    """Rewrite a wheel without the STRIP folders, its RECORD listing what is left."""
    out = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in src.infolist():
            if info.filename.startswith(STRIP) or info.filename == record_name:
                continue
            data = src.read(info)
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{info.filename},sha256={digest},{len(data)}")
        lines.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(lines) + "\n")
    with open(path, "wb") as f:
        f.write(out.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("films", help="a folder of chest films (JPEG/PNG); the first 64 are carried")
    ap.add_argument("--dest", default=".gpu")
    args = ap.parse_args()
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    dest = os.path.join(root, args.dest)
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.join(dest, "films"))
    archive = subprocess.run(["git", "-C", root, "archive", "--format=tar", "HEAD", "medclf", "benchmarks",
                              "configs"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    films = sorted(f for f in os.listdir(args.films) if f.lower().endswith((".jpeg", ".jpg", ".png")))[:64]
    for name in films:
        shutil.copy(os.path.join(args.films, name), os.path.join(dest, "films", name))
    whl = os.path.join(dest, "whl")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "-d", whl, *WHEELS], check=True)
    for name in os.listdir(whl):
        if name.startswith("ray-"):
            strip_wheel(os.path.join(whl, name))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dest) for f in fs)
    print(f"{dest}: {len(films)} films, {len(os.listdir(whl))} wheels, {total / 2**20:.1f} MiB "
          f"(carry limit {CARRY_LIMIT / 2**20:.0f} MiB)")
    if total > CARRY_LIMIT:
        sys.exit(f"{dest} is over the carry limit")


if __name__ == "__main__":
    main()
