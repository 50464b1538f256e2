"""The out-of-scope checks the image stage makes at decode time, before any model runs, and the
reasons vocabulary of every `out_of_scope` row.

With a model's gate (medclf.model.records.input_gate, from its domain record): a DICOM modality
the model is not for, a header outside its views, body parts or lateralities (medclf.imaging.header),
an image smaller than its minimum side, pixels that hold no image (medclf.imaging.content), and a
preprocessed image whose pixel statistics are unlike the validation images' (medclf.imaging.appearance).
The feature-space check after the forward pass (`ood_score`) is medclf.monitor.ood's.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from medclf.imaging.appearance import REASONS as APPEARANCE_REASONS, appearance_reason
from medclf.imaging.content import REASONS as CONTENT_REASONS, content_reason
from medclf.imaging.header import REASONS as HEADER_REASONS, header_reason

# Each out-of-scope reason starts with one of these phrases; `reason_kind` maps them back for counts.
REASONS = {"modality": "DICOM modality", "too_small": "image too small", "ood_score": "ood_score",
           **HEADER_REASONS, **CONTENT_REASONS, **APPEARANCE_REASONS}


def input_out_of_scope(meta: dict, gate: Optional[dict]) -> Optional[str]:
    """Why a decoded file is out of scope by its header alone (modality, view/body part, size), or None."""
    if not gate:
        return None
    modality = meta.get("modality")
    allowed = gate["modalities"]
    if allowed and modality and modality.strip().upper() not in allowed:
        # Modality is a short code (CS, 16 chars); anything else is not echoed (it could be a name).
        shown = modality if re.fullmatch(r"[A-Za-z0-9 _]{1,16}", modality) else "a non-standard value"
        return f"{REASONS['modality']} {shown} is not one this model is for ({', '.join(allowed)})"
    header = header_reason(meta, gate.get("header"))
    if header:
        return header
    width, height = meta.get("width"), meta.get("height")
    if width is not None and height is not None and min(width, height) < gate["min_size"]:
        return (f"{REASONS['too_small']}: {width}x{height} px, the model's domain starts at "
                f"{gate['min_size']} px a side")
    return None


def image_out_of_scope(image: np.ndarray, gate: Optional[dict]) -> Optional[str]:
    """Why the decoded pixels are not an image to judge (medclf.imaging.content), when the gate asks; or None."""
    if not gate or not gate.get("content"):
        return None
    return content_reason(image)


def pixels_out_of_scope(pixels: np.ndarray, gate: Optional[dict]) -> Optional[str]:
    """Why the preprocessed image does not look like the model's validation images, when the gate asks; or None."""
    return appearance_reason(pixels, gate.get("appearance")) if gate else None


def reason_kind(error: Optional[str]) -> str:
    """The reason key (`REASONS`) of an out_of_scope row's `error` text ('<path>: <reason>')."""
    for key, phrase in REASONS.items():
        if f": {phrase}" in (error or ""):
            return key
    return "other"
