"""DICOM header rules of a model's domain: which views, body parts and lateralities it is for.

A pneumonia model trained on frontal chest films must not answer for a lateral film or a knee:
the header says so before any pixel is decoded. The allowed values come from the config
(`data.views: [PA, AP]`, `data.body_parts: [CHEST]`, `data.lateralities`), are recorded in the
model's domain record (medclf.model.records.DomainRecord) and judged here on the fields the decoder
exposes (medclf.imaging.decode.DICOM_DOMAIN_TAGS). An empty list: any value.

The view is ViewPosition; when a file lacks it, PatientOrientation's row direction tells frontal
(L or R: the patient's left-right runs along the rows) from lateral (A or P). A tag the file does
not carry is judged by `allow_missing`: true accepts it (JPEG/PNG never carry one, and many DICOM
writers leave these optional tags empty), false refuses the file with the missing tag named.
Only DICOM files are judged.
"""

from __future__ import annotations

import re
from typing import Optional

# Reason phrases (see medclf.imaging.scope.REASONS): each out_of_scope `error` has one after '<path>: '.
REASONS = {
    "view": "DICOM view",
    "body_part": "DICOM body part",
    "laterality": "DICOM laterality",
    "missing_tag": "DICOM header lacks",
}
FRONTAL = {"PA", "AP"}
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}


def _shown(value: str) -> str:
    """Header values are echoed only when they look like the short codes these tags hold (never a name)."""
    return value if re.fullmatch(r"[A-Za-z0-9 _\\-]{1,16}", value) else "a non-standard value"


def view_of(meta: dict) -> tuple[Optional[str], str]:
    """(the view, where it came from): ViewPosition, else frontal/lateral from PatientOrientation."""
    view = (meta.get("view_position") or "").strip().upper()
    if view:
        return view, "ViewPosition"
    orientation = (meta.get("patient_orientation") or "").strip().upper()
    row = orientation.split("\\")[0] if orientation else ""
    if row and set(row) <= set("AP"):
        return "LATERAL", "PatientOrientation"
    if row and set(row) <= set("LR"):
        return "FRONTAL", "PatientOrientation"
    return None, "ViewPosition"


def header_reason(meta: dict, rules: Optional[dict]) -> Optional[str]:
    """Why a DICOM's header puts it outside the model's domain, or None. `rules`: views,
    body_parts, lateralities (upper-case lists; empty: any) and allow_missing."""
    if not rules or meta.get("format") != "dicom":
        return None
    allow_missing = rules.get("allow_missing", True)
    views = [v.upper() for v in rules.get("views") or []]
    if views:
        view, source = view_of(meta)
        if view is None:
            if not allow_missing:
                return f"{REASONS['missing_tag']} ViewPosition/PatientOrientation (data.allow_missing is false)"
        elif view == "FRONTAL":
            if not FRONTAL & set(views):
                return f"{REASONS['view']} frontal ({source}) is not one this model is for ({', '.join(views)})"
        elif view not in views:
            what = "lateral" if view in LATERAL_VIEWS or view == "LATERAL" else _shown(view)
            return f"{REASONS['view']} {what} ({source}) is not one this model is for ({', '.join(views)})"
    for key, tag, rule in (("body_part", "BodyPartExamined", "body_parts"),
                           ("laterality", "ImageLaterality", "lateralities")):
        allowed = [v.upper() for v in rules.get(rule) or []]
        if not allowed:
            continue
        value = (meta.get(key) or "").strip().upper()
        if not value:
            if not allow_missing:
                return f"{REASONS['missing_tag']} {tag} (data.allow_missing is false)"
        elif value not in allowed:
            return f"{REASONS[key]} {_shown(value)} is not one this model is for ({', '.join(allowed)})"
    return None
