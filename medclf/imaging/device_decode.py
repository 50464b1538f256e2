"""JPEG decoding on the inference actor's device: nvJPEG batches on a GPU (`score.jpeg_decode`).

A 2,048^2 film costs a CPU core about 8 ms even in draft mode (medclf.imaging.draft; decode, statistics and
resize: 130 a second in one process on the 2-core build machine), while one H200 decoded them with nvJPEG
at 3,050 a second in batches of 64 (docs/performance.md). So when the actor holds a GPU, the decode
task reads the file, takes its checksum and judges its header (medclf.imaging.stage), and ships the
JPEG's bytes instead of pixels; here the actor decodes the batch on its device and makes every
per-image step the decode task would have made, on the same device, with the same rules:

  full decode -> the draft size (medclf.imaging.draft: the block mean DCT scaling approximates, so the
  drift statistics and sizes match a CPU decode's) -> drift statistics (medclf.imaging.stats) -> content
  checks (medclf.imaging.content) -> resize + normalise (medclf.imaging.preprocess) -> appearance check
  (medclf.imaging.appearance).

The values are read back to the host once per batch. The model's input stays within `DRAFT_TOLERANCE` of
the CPU path's (tests/imaging/test_device_decode.py). A file the device decoder refuses (a JPEG it
does not support, or a corrupt one) is decoded on the CPU here instead, so its row says what the CPU
path would say.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from medclf.config import PreprocessConfig
from medclf.imaging import appearance, content
from medclf.imaging.decode import open_images
from medclf.imaging.draft import DRAFT_FACTOR, draft_denominator, draft_reduce
from medclf.imaging.preprocess import preprocess_tensor
from medclf.imaging.stats import intensity_stats, stats_from

# JPEG modes whose grey image nvJPEG gives as Pillow does (luma); others (CMYK) decode in the task.
DEVICE_MODES = ("L", "RGB")


def actor_jpeg_side(jpeg_decode: str, use_gpu: bool, image_size: int) -> Optional[int]:
    """The shorter side from which a JPEG is decoded by the inference actor (`score.jpeg_decode`), or None
    when every JPEG is decoded by the decode tasks. `auto` hands a GPU actor only the films draft mode
    would shrink (shorter side >= 4x the model's input), where decoding is the cost; small JPEGs decode
    about as fast on the CPU cores (issue 35's limits: 21,100 a second with Pillow, 19,800 with nvJPEG)."""
    if jpeg_decode == "actor":
        return 0
    if jpeg_decode == "auto" and use_gpu:
        return 2 * DRAFT_FACTOR * image_size
    return None


@dataclass
class Judged:
    """One deferred JPEG after decoding: what the decode task would have put in its row."""

    stats: Optional[dict] = None  # STAT_COLUMNS values; None when it could not be decoded
    pixels: object = None  # (1, S, S) float32 tensor on the device; None when refused or not decoded
    refused: Optional[str] = None  # the out-of-scope reason (medclf.imaging.scope.REASONS phrase)
    error: Optional[Exception] = None  # why it could not be decoded (a DecodeError names the file)


def decode_on_device(blobs: list[bytes], paths: list[str], spec: PreprocessConfig, gate: Optional[dict],
                     device: str) -> list[Judged]:
    """Decode and judge JPEGs on `device` ('cuda' in production; 'cpu' runs the same code in tests)."""
    import torch

    images = _decode(blobs, paths, spec, device)
    done: list = []  # (index, decoded size, stats, measures, appearance) as tensors, read back together
    judged = [Judged(error=img) if isinstance(img, Exception) else None for img in images]
    for i, image in enumerate(images):
        if isinstance(image, Exception):
            continue
        stats = intensity_stats(image)
        measures = content.measure_vector(image) if gate and gate.get("content") else None
        pixels = preprocess_tensor(image, spec)
        looks = appearance.appearance_stats(pixels) if gate and gate.get("appearance") else None
        judged[i] = Judged(pixels=pixels)
        done.append((i, tuple(image.shape), stats, measures, looks))
    if not done:
        return judged
    parts = [torch.cat([p.double().reshape(-1) for p in d[2:] if p is not None]) for d in done]
    host = torch.stack(parts).cpu().numpy()  # one read-back for the whole batch
    for (i, shape, _, measures, looks), values in zip(done, host):
        out = judged[i]
        out.stats = stats_from(values[:5], *shape)
        rest = values[5:]
        if measures is not None:
            m = dict(zip(("peak", "spread", "structure"), (float(v) for v in rest[:3])))
            out.refused, rest = content.reason_from(m, shape), rest[3:]
        if looks is not None and not out.refused:
            out.refused = appearance.reason_from(rest, gate["appearance"])
        if out.refused:
            out.pixels = None
    return judged


def _decode(blobs: list[bytes], paths: list[str], spec: PreprocessConfig, device: str) -> list:
    """Each JPEG as a float32 HxW tensor in [0, 1] on `device`, at the draft size; an Exception where it
    could not be decoded at all."""
    import torch

    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec for image decoding; 0.29.1 still has it
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        decoded = decode_jpeg(data, mode=ImageReadMode.GRAY, device=device)
    except RuntimeError:  # one bad file fails the batch call: find it, one file at a time
        decoded = []
        for one in data:
            try:
                decoded.append(decode_jpeg(one, mode=ImageReadMode.GRAY, device=device))
            except RuntimeError:
                decoded.append(None)
    out: list = []
    for blob, path, grey in zip(blobs, paths, decoded):
        if grey is None:  # the device decoder refused it: the CPU decodes it, or says what is wrong
            try:
                image = open_images(blob, path, "middle", min_side=spec.image_size).image(None).image
                out.append(torch.from_numpy(np.ascontiguousarray(image)).to(device))
            except Exception as exc:  # noqa: BLE001 - the row says what went wrong
                out.append(exc)
            continue
        image = grey[0].float().div_(255.0)
        out.append(draft_reduce(image, draft_denominator(image.shape[1], image.shape[0], spec.image_size)))
    return out

