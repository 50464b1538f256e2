"""What a scoring (or explain) run can be refused for, checked before Ray starts or a run folder is
made: the model folder, the input files, and the UID key. Each error names the file and the fix."""

from __future__ import annotations

import posixpath
from collections import Counter
from typing import Iterable, Optional

from medclf import storage
from medclf.errors import UserError
from medclf.imaging.privacy import UID_KEY_ENV, PrivacyError, uid_key
from medclf.imaging.stage import DICOM_BY_CONTENT, Inputs, find_inputs

# Files whose decoders can carry no DICOM UID: a run of only these needs no key for score.uids=hash.
UIDLESS_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def check_model(path: Optional[str], option: str = "--model"):
    """The model artifact exists and its card reads: the card (medclf.model.artifact.ModelCard)."""
    from medclf.model.artifact import load_card

    if not path:
        raise UserError(f"no model given: pass {option} FOLDER (the `model` folder a `medclf train` or "
                        "`medclf demo` run wrote, e.g. runs/<run id>/model)")
    storage.check_input_url(path)
    if not storage.exists(path):
        raise UserError(f"{path}: model folder not found. Pass {option} with the `model` folder of a training run "
                        "(e.g. runs/<run id>/model); `ls runs/*/model` lists the local ones")
    return load_card(path)  # a folder that is not an artifact: ModelError naming the missing card


def check_inputs(source: Optional[str], extensions: Iterable[str], option: str = "--input") -> Inputs:
    """The input files; none matching `extensions` is an error that says which suffixes were there."""
    if not source:
        raise UserError(f"no input given: pass {option} FOLDER, GLOB or MANIFEST")
    extensions = list(extensions)
    try:
        inputs = find_inputs(source, extensions)
    except FileNotFoundError:
        raise UserError(f"{source}: input not found (check the path; s3://bucket/prefix for object storage)") from None
    if not inputs.paths:
        raise UserError(no_inputs_message(source, extensions))
    return inputs


def no_inputs_message(source: str, extensions: list[str]) -> str:
    found = Counter(_suffix(p) for p in storage.list_files(source))
    if not found:
        return f"{source}: no files there at all"
    seen = ", ".join(f"{n} {s or '(no suffix)'}" for s, n in found.most_common(5))
    image_like = [s for s, _ in found.most_common() if s in UIDLESS_SUFFIXES + (".dcm", ".dicom")]
    fix = (f"add them with `--extensions {' '.join(sorted(set(extensions) | set(image_like)))}` "
           f"(or score.extensions in the config)" if image_like else
           "name the suffixes to take with --extensions (or `--extensions dicom` for DICOM files without a suffix)")
    return f"{source}: no input files with extensions {extensions}; found {seen}. To score them, {fix}"


def may_carry_uids(paths: Iterable[str], extensions: Iterable[str]) -> bool:
    """Whether a run over `paths` can meet a DICOM UID: any file not named as a PNG/JPEG/TIFF/BMP, or
    DICOM matched by content (`dicom` in the extensions)."""
    return DICOM_BY_CONTENT in extensions or any(not p.lower().endswith(UIDLESS_SUFFIXES) for p in paths)


def check_uid_key(mode: str, configured_key, paths: list[str], extensions: Iterable[str],
                  key_file: Optional[str] = None) -> None:
    """score.uids=hash needs the site's key only when the run can meet a DICOM UID."""
    if mode != "hash" or uid_key(configured_key, key_file) or not may_carry_uids(paths, extensions):
        return
    example = next((p for p in paths if not p.lower().endswith(UIDLESS_SUFFIXES)), paths[0] if paths else "")
    raise PrivacyError(
        f"score.uids=hash (the default) needs the site's key for the DICOM UIDs of this input (e.g. {example}). "
        f"Choose one: set {UID_KEY_ENV} or score.uid_key_file (keep the key: it re-links hashed UIDs to studies); or "
        "--set score.uids=drop (no UIDs in the predictions); or --set score.uids=keep (UIDs as they are, for "
        "predictions that stay inside the site)")


def _suffix(path: str) -> str:
    return posixpath.splitext(path.rsplit("/", 1)[-1])[1].lower()
