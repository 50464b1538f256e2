"""Per-image input statistics (mean, spread, percentiles, size) of a decoded image: measured by the
image stage while it decodes, so scoring never reads an image twice; the drift reference
(medclf.monitor.reference) and the predictions columns (medclf.data.predictions) share their names.
"""

from __future__ import annotations

import numpy as np

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


def image_stats(image: np.ndarray) -> dict[str, float]:
    """The per-image input statistics of a decoded HxW image in [0, 1] (medclf.imaging.decode)."""
    height, width = image.shape
    step = max(1, int(np.ceil(np.sqrt(image.size / _STAT_PIXELS))))
    pixels = np.asarray(image[::step, ::step], np.float32).ravel()
    p5, p50, p95 = np.percentile(pixels, [5, 50, 95])
    return {"img_mean": float(pixels.mean()), "img_sd": float(pixels.std()), "img_p5": float(p5),
            "img_p50": float(p50), "img_p95": float(p95), "img_height": float(height), "img_width": float(width),
            "img_aspect": float(width / height)}
