"""What identifies a patient, kept out of what people look at and what leaves the site.

File names often carry a patient's name or record number, and DICOM UIDs link a row back to a
study in the hospital's archive. One rule each, used everywhere:
- `display_name`: how a file is named in galleries, captions and heatmap file names: a short hash
  of its path unless `report.show_paths` is on (the path itself stays in the Parquet tables,
  which are for the site's own systems).
- `protect_uid`: DICOM UIDs in predictions per `score.uids`: `keep`, `hash` (HMAC-SHA256 with the
  site's key, so the site, and only the site, can re-link by hashing its own UIDs) or `drop`.
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath
from typing import Optional

from medclf.config import ConfigError
from medclf.secret import resolve

UID_KEY_ENV = "MEDCLF_UID_KEY"


class PrivacyError(ConfigError):
    pass


def display_name(path: str, show_paths: bool = False) -> str:
    if show_paths:
        return posixpath.basename(str(path).replace("\\", "/"))
    return "file-" + hashlib.sha256(str(path).encode()).hexdigest()[:10]


def uid_key(configured=None, key_file: Optional[str] = None) -> Optional[str]:
    """The site key for UID hashing: an inline config value (tests only), else `score.uid_key_file`,
    else the MEDCLF_UID_KEY environment variable (medclf.secret: never written anywhere)."""
    return resolve(configured, key_file, UID_KEY_ENV, "score.uid_key_file")


def check_uid_policy(mode: str, key: Optional[str]) -> None:
    if mode == "hash" and not key:
        raise PrivacyError(f"score.uids=hash needs the site's key: set {UID_KEY_ENV} (or score.uid_key_file); keep the "
                           "key to re-link hashed UIDs. Or set score.uids=drop (or keep)")


def protect_uid(uid: Optional[str], mode: str, key: Optional[str]) -> Optional[str]:
    if uid is None or mode == "keep":
        return uid
    if mode == "drop":
        return None
    if not key:  # a file named .png/.jpeg that is DICOM inside, in a run checked as having no DICOM
        raise PrivacyError(f"a DICOM UID met with score.uids=hash and no key: set {UID_KEY_ENV}, or score.uids=drop")
    return hmac.new(key.encode(), uid.encode(), hashlib.sha256).hexdigest()[:32]
