"""JPEG draft mode: let libjpeg scale the DCT down while decoding, when the model is far smaller.

A 2,048^2 film that the model sees at 224 px need not be decoded at full size: libjpeg can produce
1/2, 1/4 or 1/8 of it straight from the DCT coefficients (Pillow's `Image.draft`), which skips most of
the inverse DCT and colour work, and for a colour JPEG decodes the luma channel alone. Decoding stops at
`DRAFT_FACTOR` times the model's input or more, so the antialiased resize in
`medclf.imaging.preprocess` still has two source pixels per output pixel to average: the model's input
stays within `DRAFT_TOLERANCE` of the one a full decode gives (tests/imaging/test_draft.py asserts it).
"""

from __future__ import annotations

from typing import Optional

from PIL import Image

DRAFT_FACTOR = 2  # decoded side >= 2x the model's input side
# Largest difference allowed in the model's input between draft and full decode, in [0, 1] grey
# levels before normalisation: mean absolute and worst pixel (tests/imaging/test_draft.py measures both).
DRAFT_TOLERANCE = {"mean_abs": 0.002, "max_abs": 0.03}  # measured on 2,048^2 q90 films: 0.0005 / 0.012


def draft_denominator(width: int, height: int, min_side: Optional[int]) -> int:
    """The DCT scale libjpeg decodes a `width` x `height` JPEG at for a model of input side `min_side`,
    as 1/denominator (1, 2, 4 or 8): Pillow's `draft` choice for `apply_draft`'s request, written out so
    that a decoder without DCT scaling (nvJPEG: medclf.imaging.device_decode) can reduce to the same size."""
    if not min_side:
        return 1
    want = DRAFT_FACTOR * int(min_side)
    if min(width, height) < 2 * want:
        return 1
    scale = min(width // want, height // want)
    return next(d for d in (8, 4, 2, 1) if scale >= d)


def apply_draft(img: Image.Image, min_side: Optional[int]) -> Optional[float]:
    """Ask Pillow to decode `img` (opened, not yet loaded) at a reduced scale; returns the scale used
    (1, 1/2, 1/4, 1/8) or None when nothing was asked (not a JPEG, no target, image not large enough)."""
    if not min_side or img.format != "JPEG":
        return None
    want = DRAFT_FACTOR * int(min_side)
    if draft_denominator(*img.size, min_side) == 1:  # DCT scaling halves at least: nothing to gain below 2x
        return None
    # 'L' for a YCbCr JPEG decodes only the luma channel (what decode.py's convert("L") keeps anyway).
    mode = "L" if img.mode in ("L", "RGB") else None
    full = img.size
    img.draft(mode, (want, want))  # Pillow keeps both sides >= `want`
    return img.size[0] / full[0]


def draft_reduce(image, denominator: int):
    """A full-size decoded HxW tensor reduced as `draft_denominator` says: the mean of each
    denominator^2 block (what DCT scaling approximates), ceil(H/d) x ceil(W/d), on the image's device."""
    if denominator == 1:
        return image
    import torch.nn.functional as F

    return F.avg_pool2d(image[None, None], denominator, ceil_mode=True)[0, 0]
