"""Content checks on the decoded pixels, before the model: is there an image here at all?

A blank film, a saturated or uniform grey frame, a field of noise or a decoder that returned
zeros still gets a confident probability from a CNN. These checks give each a named
`out_of_scope` reason instead. They are pure numpy on the decoded float image (HxW in [0, 1]),
on a copy shrunk by block averaging to at most `WORK_SIDE` px a side, so they cost about a
millisecond whatever the film's size.

Three measures (`measures`), each with a limit in `ContentLimits`:
  * `peak`: the brightest pixel. 0 means every pixel is 0: an empty image, or a decoder that
    returned zeros (DICOM with a constant stored value also decodes to zeros after windowing);
  * `spread`: the 99th minus the 1st percentile of the shrunk image: near 0 for blank, saturated
    and uniform grey frames;
  * `structure`: the mean correlation of each pixel of the shrunk image with its right and lower
    neighbour. Anatomy is smooth at 256 px (real chest films: above 0.96, lung CT above 0.60,
    docs/ood.md); independent noise has none (about 0).
The limits were measured on 5,216 Kermany chest films, the DICOM of pydicom and pydicom-data, and
the lung CT and breast ultrasound sets (benchmarks/content_checks.py, results in docs/ood.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from medclf.imaging.arrays import as_float32, concat, nanmean, quantile, ratio, sqrt

WORK_SIDE = 256

# Reason phrases: each out_of_scope `error` starts with one of them after '<path>: ' (see medclf.imaging.scope.REASONS).
REASONS = {
    "all_zero": "all pixels are zero",
    "constant": "near-constant image",
    "noise": "no image structure",
}


@dataclass(frozen=True)
class ContentLimits:
    min_spread: float = 0.04
    """p99 - p1 of the pixels (0..1) below this: near-constant. Real films: >= 0.33 (docs/ood.md)."""
    min_structure: float = 0.5
    """Neighbour correlation below this: noise. Real films: >= 0.60 (docs/ood.md)."""
    min_structure_side: int = 32
    """Images with a shorter side are not judged for structure: a 16x16 thumbnail has too few pixels to
    tell noise from anatomy (the too-small rule of the domain record refuses them for a real model)."""


def shrink(image, side: int = WORK_SIDE):
    """Block mean by one integer factor so the longer side is at most about `side` (crops the remainder).
    A numpy image gives numpy, a tensor a tensor on its device (medclf.imaging.arrays)."""
    image = as_float32(image)
    if image.ndim == 3:  # tolerate an RGB array; the decoder gives grey
        image = image.mean(axis=2)
    f = int(np.ceil(max(image.shape) / side))
    if f <= 1:
        return image
    h, w = (image.shape[0] // f) * f, (image.shape[1] // f) * f
    if h == 0 or w == 0:
        return image
    return image[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _neighbour_correlation(a):
    values = []
    if a.shape[1] >= 2:
        values.append(_correlation(a[:, :-1].reshape(-1), a[:, 1:].reshape(-1)))
    if a.shape[0] >= 2:
        values.append(_correlation(a[:-1, :].reshape(-1), a[1:, :].reshape(-1)))
    return nanmean(values)


def _correlation(x, y):
    x, y = x - x.mean(), y - y.mean()
    return ratio((x * y).sum(), sqrt((x * x).sum() * (y * y).sum()))  # NaN when either is constant


def measure_vector(image):
    """peak, spread and structure (see the module docstring) as one vector: numpy for a numpy image, a
    tensor on the image's device for a torch one, so a GPU batch is read back once."""
    if not np.prod(tuple(image.shape)):
        return np.array([0.0, 0.0, np.nan])
    a = shrink(image)
    lo, hi = quantile(a.reshape(-1), [0.01, 0.99])
    return concat([image.max(), hi - lo, _neighbour_correlation(a)])


def measures(image) -> dict:
    """peak, spread and structure of a decoded image (see the module docstring)."""
    return dict(zip(("peak", "spread", "structure"), (float(v) for v in measure_vector(image))))


def content_reason(image, limits: ContentLimits = ContentLimits()) -> Optional[str]:
    """Why the pixels are not an image the model should judge (a REASONS phrase and the measure), or None."""
    return reason_from(measures(image), tuple(image.shape), limits)


def reason_from(m: dict, shape: tuple, limits: ContentLimits = ContentLimits()) -> Optional[str]:
    """`content_reason` from an image's `measures` and its shape."""
    if m["peak"] <= 0.0:
        return f"{REASONS['all_zero']} (blank image, or the decoder returned nothing)"
    if m["spread"] < limits.min_spread:
        return (f"{REASONS['constant']} (blank, saturated or uniform grey): 1st-99th percentile spread "
                f"{m['spread']:.3f} < {limits.min_spread:g}")
    if min(shape[:2]) >= limits.min_structure_side and m["structure"] < limits.min_structure:
        return (f"{REASONS['noise']} (mostly noise): neighbour correlation {m['structure']:.2f} "
                f"< {limits.min_structure:g}")
    return None
