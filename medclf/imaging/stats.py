"""Per-image input statistics (mean, spread, percentiles, size) of a decoded image: measured by the
image stage while it decodes, so scoring never reads an image twice; the drift reference
(medclf.monitor.reference) and the predictions columns (medclf.data.predictions) share their names.
"""

from __future__ import annotations

import numpy as np

from medclf.imaging.arrays import as_float32, concat, quantile, std

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
    return concat([pixels.mean(), std(pixels), quantile(pixels, [0.05, 0.5, 0.95])])


def stats_from(intensity, height: int, width: int) -> dict[str, float]:
    """The STAT_COLUMNS values from `intensity_stats`'s vector (on the host) and the decoded size."""
    mean, sd, p5, p50, p95 = (float(v) for v in intensity)
    return {"img_mean": mean, "img_sd": sd, "img_p5": p5, "img_p50": p50, "img_p95": p95,
            "img_height": float(height), "img_width": float(width), "img_aspect": float(width / height)}


def image_stats(image: np.ndarray) -> dict[str, float]:
    """The per-image input statistics of a decoded HxW image in [0, 1] (medclf.imaging.decode)."""
    return stats_from(intensity_stats(image), *image.shape)
