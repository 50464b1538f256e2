"""The machine's limits for scoring, with plain PyTorch/Pillow and no medclf pipeline (issue 35, item 4):
decode + resize + normalise (Pillow in P processes, full decode and draft mode; nvJPEG batched on the
GPU), forward of the pneumonia model (EfficientNet-Lite0, fp16 channels_last), and a plain AMP
training step. GPU parts are skipped, saying so, where CUDA is absent. One JSON line per figure.

    python benchmarks/gpu_limits.py --jpeg224 DIR --jpeg2048 DIR [--procs 16] [--seconds 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZE, MEAN, STD = 224, 0.5, 0.5  # configs/pneumonia_xray.yaml


def _pillow_one(args) -> int:
    path, draft = args
    import torch
    import torch.nn.functional as F
    from PIL import Image

    img = Image.open(path)
    if draft:
        img.draft("L", (2 * SIZE, 2 * SIZE))
    arr = np.asarray(img.convert("L"), np.float32) / 255.0
    x = torch.from_numpy(arr)[None, None]
    if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    ((x - MEAN) / STD).numpy()
    return 1


def _init_worker():
    import torch

    torch.set_num_threads(1)


def pillow_rate(files: list[str], procs: int, draft: bool, seconds: float) -> float:
    with mp.get_context("spawn").Pool(procs, initializer=_init_worker) as pool:
        pool.map(_pillow_one, [(f, draft) for f in files[:procs * 2]])  # warm the workers
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            n += sum(pool.map(_pillow_one, [(f, draft) for f in files], chunksize=16))
        return n / (time.perf_counter() - start)


def nvjpeg_rate(files: list[str], batch: int, seconds: float) -> float:
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [torch.frombuffer(bytearray(open(f, "rb").read()), dtype=torch.uint8) for f in files]

    def step(chunk):
        imgs = decode_jpeg(chunk, mode=ImageReadMode.GRAY, device="cuda")
        out = []
        for im in imgs:  # sizes may differ: resize one by one, on the GPU, then stack
            x = im[None].float().div_(255.0)
            if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
                x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
            out.append(x)
        return (torch.cat(out) - MEAN) / STD

    step(datas[:batch])
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(datas), batch):
            step(datas[i:i + batch])
            n += len(datas[i:i + batch])
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def _lite0():
    from medclf.model.networks import build_model

    return build_model("efficientnet_lite0", 2)


def forward_rate(batch: int, seconds: float, compile_model: bool = False) -> float:
    import torch

    model = _lite0().cuda().eval().to(memory_format=torch.channels_last).half()
    if compile_model:
        model = torch.compile(model)
    x = torch.randn(batch, 3, SIZE, SIZE, device="cuda").half().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += batch
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def train_rate(batch: int, seconds: float) -> float:
    import torch

    model = _lite0().cuda().train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    scaler = torch.amp.GradScaler()
    x = torch.randn(batch, 3, SIZE, SIZE, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += batch
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jpeg224", required=True)
    ap.add_argument("--jpeg2048", required=True)
    ap.add_argument("--procs", type=int, default=os.cpu_count())
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--files", type=int, default=2000, help="files per decode measurement")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    small = sorted(glob.glob(os.path.join(args.jpeg224, "*")))[:args.files]
    large = sorted(glob.glob(os.path.join(args.jpeg2048, "*")))[:args.files // 4]
    out = open(args.out, "a") if args.out else None

    def report(name, fn):
        start = time.perf_counter()
        try:
            value = round(fn(), 1)
        except Exception as exc:  # one failed measurement must not lose the others
            value = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        line = json.dumps({"limit": name, "images_per_s": value, "seconds": round(time.perf_counter() - start, 1),
                           "device": torch.cuda.get_device_name(0) if cuda else "cpu", "procs": args.procs})
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    s = args.seconds
    report(f"pillow 224px jpeg decode+resize+normalise, {args.procs} processes",
           lambda: pillow_rate(small, args.procs, False, s))
    report(f"pillow 2048px jpeg full decode+resize, {args.procs} processes",
           lambda: pillow_rate(large, args.procs, False, s))
    report(f"pillow 2048px jpeg draft decode (>=448)+resize, {args.procs} processes",
           lambda: pillow_rate(large, args.procs, True, s))
    if not cuda:
        print(json.dumps({"skipped": "no CUDA device: nvJPEG, forward and training limits not measured"}), flush=True)
        return
    report("nvjpeg 224px batched 256 decode+resize+normalise", lambda: nvjpeg_rate(small, 256, s))
    report("nvjpeg 2048px batched 64 decode+resize+normalise", lambda: nvjpeg_rate(large, 64, s))
    report("forward efficientnet_lite0 224px fp16 channels_last batch 256", lambda: forward_rate(256, s))
    report("train step AMP efficientnet_lite0 batch 128", lambda: train_rate(128, s))


if __name__ == "__main__":
    main()
