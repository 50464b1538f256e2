"""Per-image input statistics (mean, spread, percentiles, size) of a decoded image: measured by the
image stage while it decodes, so scoring never reads an image twice; the drift reference
(medclf.monitor.reference) and the predictions columns (medclf.data.predictions) share their names.
"""

from __future__ import annotations

import numpy as np

from medclf.imaging.arrays import as_float32, concat, is_tensor, quantile, std

# Per-image statistics: predictions columns and reference arrays share these names.
STAT_COLUMNS = {
    "img_mean": "mean intensity of the decoded image in [0, 1] (before resizing and normalisation)",
    "img_sd": "intensity standard deviation, same image",
    "img_p5": "5th percentile of intensity",
    "img_p50": "median intensity",
    "img_p95": "95th percentile of intensity",
    "img_height": "decoded height in px",
    "img_width": "decoded width in px",
    "img_aspect": "width / height",
}
# Percentiles on at most this many pixels (a strided subsample): a 3000x3000 film costs no more than 512x512.
_STAT_PIXELS = 512 * 512


def intensity_stats(image):
    """mean, sd, p5, p50, p95 of a decoded HxW image in [0, 1], as one vector: numpy for a numpy image,
    a tensor on the image's device for a torch one (medclf.imaging.arrays), so no value leaves a GPU."""
    height, width = image.shape
    step = max(1, int(np.ceil(np.sqrt(height * width / _STAT_PIXELS))))
    pixels = as_float32(image[::step, ::step]).reshape(-1)
    return concat([pixels.mean(), std(pixels), _quantiles(pixels, [0.05, 0.5, 0.95])])


def _quantiles(pixels, qs):
    """`quantile(pixels, qs)`, to the bit. An 8-bit image (every value k/255, as the decoder gives a JPEG or an
    8-bit PNG) has 256 possible values, so its order statistics come from a histogram instead of from
    partitioning the pixels: 0.7 ms instead of 4.2 on a 512^2 film, where the partition was 15% of the decode
    task's time. The interpolation is numpy's 'linear' one written out (tests/imaging/test_stats.py)."""
    codes = None if is_tensor(pixels) or pixels.size < 2 else _byte_codes(pixels)
    if codes is None:
        return quantile(pixels, qs)
    rank = np.cumsum(np.bincount(codes, minlength=256))  # rank[c]: how many pixels are <= c/255
    n = pixels.size
    virtual = (n - 1) * np.asarray(qs, np.float64)
    below = np.floor(virtual).astype(np.intp)
    above = np.minimum(below + 1, n - 1)
    a = _LEVELS[np.searchsorted(rank, below, side="right")]  # the sorted pixels' values at those places
    b = _LEVELS[np.searchsorted(rank, above, side="right")]
    t, d = virtual - below, b - a
    return np.where(t >= 0.5, b - d * (1 - t), a + d * t)  # numpy's _lerp, same float32/float64 steps


_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255.0)  # what the decoder makes of each 8-bit code


def _byte_codes(pixels: np.ndarray):
    """The 8-bit codes of float32 pixels that are all exactly code / 255, else None."""
    with np.errstate(invalid="ignore"):  # (a value outside [0, 1] casts to nonsense, and then fails the check)
        for part in (pixels[:64], pixels):  # a 16-bit or windowed image is known from its first pixels, mostly
            codes = (part * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)
            if not np.array_equal(codes.astype(np.float32) / np.float32(255.0), part):
                return None
    return codes


def stats_from(intensity, height: int, width: int) -> dict[str, float]:
    """The STAT_COLUMNS values from `intensity_stats`'s vector (on the host) and the decoded size."""
    mean, sd, p5, p50, p95 = (float(v) for v in intensity)
    return {"img_mean": mean, "img_sd": sd, "img_p5": p5, "img_p50": p50, "img_p95": p95,
            "img_height": float(height), "img_width": float(width), "img_aspect": float(width / height)}


def image_stats(image: np.ndarray) -> dict[str, float]:
    """The per-image input statistics of a decoded HxW image in [0, 1] (medclf.imaging.decode)."""
    return stats_from(intensity_stats(image), *image.shape)
