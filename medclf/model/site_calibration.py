"""The site calibration file: a new site's own temperature (and bias) and decision threshold.

`medclf calibrate` (medclf.model.site_fit) fits it on k labelled films of the new site; scoring
(`score.site_calibration`) and serving (`--site-calibration`) apply it in place of the card's
temperature and threshold. It is a small JSON file, `site_calibration.json` by convention:

    kind, version         "medclf.site_calibration", 1
    calibration_id        "sitecal-<12 hex>": sha256 of every other field except created_at
                          (same content, same id; any changed number, another id). Every
                          predictions row scored with it records it (column `calibration_id`).
    model_id, classes     the model it was fitted for; applying it to another model is refused
    map                   "temperature" or "platt"
    temperature, bias     probabilities = softmax(logits / temperature + bias) on the model's RAW
                          logits: the site temperature replaces the card's, it does not multiply it
    threshold, threshold_rule   the new operating point on p(positive) and the named rule that chose it
    adaptation_id         the label-free site profile (BatchNorm statistics, issue 32 part A) the
                          logits were computed under; null: the model as trained. Fit the calibration
                          on top of the profile it will be used with.
    fitted_on, report     k, per-class counts, films that failed to decode, and what was measured

It is kept apart from the model artifact (whose id is its weights' hash) and from a label-free
site profile, so each can change without the others; scoring applies profile -> model -> this.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Optional

import numpy as np
from scipy.special import log_softmax

from medclf import storage
from medclf.errors import UserError

KIND = "medclf.site_calibration"
VERSION = 1
FILE_NAME = "site_calibration.json"
MAPS = ("temperature", "platt")


class SiteCalibrationError(UserError):
    pass


@dataclass
class SiteCalibration:
    model_id: str
    classes: list
    positive_class: Optional[str]
    map: str
    temperature: float
    bias: list
    threshold: Optional[float]
    threshold_rule: str
    fitted_on: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    adaptation_id: Optional[str] = None
    created_at: str = ""
    calibration_id: str = ""
    kind: str = KIND
    version: int = VERSION

    @property
    def positive_index(self) -> Optional[int]:
        return self.classes.index(self.positive_class) if self.positive_class else None

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) probabilities from the model's raw logits (N, C): softmax(logits / T + bias)."""
        z = np.asarray(logits, np.float64) / self.temperature + np.asarray(self.bias, np.float64)
        return np.exp(log_softmax(z, axis=1))

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()


def content_id(fields: dict) -> str:
    """The id of a calibration's content: sha256 over every field but the id and the creation time."""
    body = {k: v for k, v in fields.items() if k not in ("calibration_id", "created_at")}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return f"sitecal-{digest[:12]}"


def finish(cal: SiteCalibration) -> SiteCalibration:
    """Stamp the creation time and the content id (after every other field is final)."""
    cal.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cal.calibration_id = content_id(asdict(cal))
    return cal


def save(cal: SiteCalibration, path: str) -> None:
    """Written whole or not at all: a reader never finds a half-written calibration."""
    if not cal.calibration_id:
        finish(cal)
    storage.write_atomic(path, cal.to_bytes())


def load(path: str, card=None) -> SiteCalibration:
    """Read and check a calibration file; with `card`, also that it was fitted for that model.

    Errors name the file and the problem: not JSON, wrong kind, a field out of range, an id that
    does not match the content (edited by hand), another model's calibration."""
    try:
        raw = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise SiteCalibrationError(f"{path}: site calibration file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SiteCalibrationError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("kind") != KIND:
        raise SiteCalibrationError(f"{path}: not a site calibration file (kind is not {KIND!r})")
    if raw.get("version") != VERSION:
        raise SiteCalibrationError(f"{path}: version {raw.get('version')!r} is not {VERSION}")
    known = set(SiteCalibration.__dataclass_fields__)
    missing = sorted(k for k in ("model_id", "classes", "map", "temperature", "bias", "threshold", "threshold_rule")
                     if k not in raw)
    if missing:
        raise SiteCalibrationError(f"{path}: lacks the field(s) {missing}")
    cal = SiteCalibration(**{k: v for k, v in raw.items() if k in known})
    problem = _problem(cal)
    if problem:
        raise SiteCalibrationError(f"{path}: {problem}")
    if content_id(raw) != cal.calibration_id:
        raise SiteCalibrationError(f"{path}: calibration_id {cal.calibration_id!r} does not match its content "
                                   f"({content_id(raw)}); the file was edited after `medclf calibrate` wrote it")
    if card is not None:
        if cal.model_id != card.model_id:
            raise SiteCalibrationError(f"{path}: fitted for model {cal.model_id}, not {card.model_id}; "
                                       "calibrate this model on the site's films")
        if list(cal.classes) != list(card.classes) or cal.positive_class != card.positive_class:
            raise SiteCalibrationError(f"{path}: classes {cal.classes} / positive {cal.positive_class} are not the "
                                       f"model's ({card.classes} / {card.positive_class})")
    return cal


def _problem(cal: SiteCalibration) -> Optional[str]:
    if cal.map not in MAPS:
        return f"map {cal.map!r} is not one of {MAPS}"
    if not (isinstance(cal.classes, list) and len(cal.classes) >= 2):
        return f"classes must be a list of at least 2 names, got {cal.classes!r}"
    if cal.positive_class is not None and cal.positive_class not in cal.classes:
        return f"positive_class {cal.positive_class!r} is not one of {cal.classes}"
    t = cal.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t <= 0:
        return f"temperature must be a number > 0, got {t!r}"
    if not (isinstance(cal.bias, list) and len(cal.bias) == len(cal.classes)
            and all(isinstance(b, (int, float)) and np.isfinite(b) for b in cal.bias)):
        return f"bias must be {len(cal.classes)} finite numbers, got {cal.bias!r}"
    th = cal.threshold
    if th is not None and (isinstance(th, bool) or not isinstance(th, (int, float)) or not 0.0 <= th <= 1.0):
        return f"threshold must be a number in [0, 1] or null, got {th!r}"
    return None
