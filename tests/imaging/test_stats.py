"""The drift statistics' quantiles of an 8-bit image come from a histogram (medclf.imaging.stats._quantiles):
the same numbers, to the bit, as numpy's quantile of the pixels, which every other image still gets."""

import io

import numpy as np
import pytest
from PIL import Image

from medclf.imaging.decode import decode
from medclf.imaging.stats import _STAT_PIXELS, _quantiles, image_stats

QS = [0.05, 0.5, 0.95]


@pytest.mark.parametrize("n", [2, 3, 17, 1000, 50_176, 262_143, 262_144])
def test_the_histogram_quantiles_equal_numpys_to_the_bit(n):
    rng = np.random.default_rng(n)
    for _ in range(10):
        lo, hi = sorted(rng.integers(0, 256, 2))
        pixels = rng.integers(lo, hi + 1, n).astype(np.float32) / 255.0  # as the decoder makes them
        assert np.array_equal(_quantiles(pixels, QS), np.quantile(pixels, QS))


def test_other_images_get_numpys_quantile():
    rng = np.random.default_rng(0)
    sixteen_bit = (rng.integers(0, 65536, 5000) / 65535).astype(np.float32)
    almost = rng.integers(0, 256, 5000).astype(np.float32) / 255.0
    almost[4000] += 1e-4  # one pixel off the 8-bit grid, after the first 64
    odd = np.array([np.nan, -1.0, 2.0, 0.5] * 30, np.float32)
    for pixels in (sixteen_bit, almost, odd):
        with np.errstate(invalid="raise"):  # no cast warning escapes
            got = _quantiles(pixels, QS)
        assert np.array_equal(got, np.quantile(pixels, QS), equal_nan=True)


def test_image_stats_of_a_decoded_jpeg_are_the_plain_computation():
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (700, 600), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    image = decode(buf.getvalue(), "film.jpeg").image
    step = max(1, int(np.ceil(np.sqrt(image.size / _STAT_PIXELS))))
    pixels = image[::step, ::step].ravel()
    p5, p50, p95 = np.percentile(pixels, [5, 50, 95])  # what image_stats computed before the histogram
    stats = image_stats(image)
    assert (stats["img_p5"], stats["img_p50"], stats["img_p95"]) == (p5, p50, p95)
    assert stats["img_mean"] == float(pixels.mean()) and stats["img_height"] == 700.0
