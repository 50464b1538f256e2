"""The model artifact: a trained network's weights, its card, and its other files (domain, reference).
The networks themselves are medclf.model.networks.

The artifact is a folder any job can read without unpickling code:
    weights.pt   the state_dict (loaded with torch.load(weights_only=True))
    model.json   arch, class names, positive class, decision threshold, preprocessing spec,
                 validation metrics, the training config and the model id
    domain.npz   (optional) the arrays of the out-of-scope guard's domain record (medclf.monitor.ood);
                 model.json's `files` holds its sha256, checked on load like the weights' hash
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Optional

import torch
import torch.nn as nn

from medclf import storage
from medclf.config import PreprocessConfig
from medclf.errors import ModelError
from medclf.model.ensemble import ENSEMBLE_ARCH, build_ensemble
from medclf.model.networks import build_model, load_weights_file, plain_model, predicting_model

ARTIFACT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
CARD_FILE = "model.json"


@dataclass
class ModelCard:
    arch: str
    classes: list[str]
    preprocess: dict
    positive_class: Optional[str] = None
    threshold: Optional[float] = None
    threshold_rule: str = "argmax"
    temperature: float = 1.0
    """Logits are divided by this before the softmax (medclf.model.calibration); 1.0: uncalibrated."""
    test_time_hflip: bool = False
    """Logits are the mean over the image and its mirror image (MirrorMean; config model.test_time_hflip)."""
    calibration: dict = field(default_factory=dict)
    """How the temperature was fitted: on which data, log loss and ECE before and after."""
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    intended_use: dict = field(default_factory=dict)
    """Intended and out-of-scope use, training population (config `model_card`; medclf.model.card)."""
    provenance: dict = field(default_factory=dict)
    """Training data (source, images per class and split, split scheme), software versions, config hash."""
    failure_modes: list = field(default_factory=list)
    """The most confident validation errors: file (hashed), true and predicted class, probability."""
    model_id: str = ""
    created_at: str = ""
    artifact_version: int = ARTIFACT_VERSION
    domain: Optional[dict] = None
    """The out-of-scope guard's domain record (medclf.monitor.ood.DomainRecord); None: older artifacts."""
    reference: Optional[dict] = None
    """The drift reference measured on validation (medclf.monitor.reference.ReferenceRecord); None: older artifacts."""
    adaptation: Optional[dict] = None
    """Whether label-free BatchNorm adaptation restores this model's AUC under acquisition shifts of its
    validation (medclf.train.adapt_verdict): verdict, rule, numbers; None: older artifacts."""
    files: dict = field(default_factory=dict)
    """Other files of the artifact (name -> sha256), checked on load: e.g. domain.npz."""

    @property
    def preprocess_spec(self) -> PreprocessConfig:
        return PreprocessConfig.model_validate(self.preprocess)

    @property
    def positive_index(self) -> Optional[int]:
        return self.classes.index(self.positive_class) if self.positive_class else None


def _weights_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_id_for(arch: str, weights_sha256: str) -> str:
    return f"{arch}-{weights_sha256[:12]}"


def save_artifact(model: nn.Module, card: ModelCard, dest: str, files: Optional[dict] = None) -> ModelCard:
    """Write weights + card (+ `files`: name -> bytes, their sha256 into `card.files`) to `dest`
    (local or s3://); the model id is derived from the weights.

    Never half-written where a reader can load it: locally the folder is written under a hidden
    temporary name next to `dest` and renamed into place; on S3 the weights go first and the card
    (what makes an artifact loadable) last, and a card whose weights were not (yet) replaced fails
    the model_id check on load.
    """
    with tempfile.TemporaryDirectory() as tmp:
        weights_path = os.path.join(tmp, WEIGHTS_FILE)
        state = {k: v.detach().cpu().contiguous() for k, v in plain_model(model).state_dict().items()}
        torch.save(state, weights_path)
        card.model_id = model_id_for(card.arch, _weights_digest(weights_path))
        card.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        _publish_artifact(tmp, card, dest, files)
    return card


def republish_with_files(src: str, dest: str, card: ModelCard, files: dict) -> ModelCard:
    """A copy of the artifact `src` at `dest` with `files` added and `card` (its own card, edited):
    the same weights, so the same model id (e.g. a domain record fitted after training). The other
    files `src` has (its card's `files`) are kept, checked, unless `files` replaces them."""
    kept = {name: read_artifact_file(src, load_card(src), name) for name in load_card(src).files if name not in files}
    files = {**kept, **files}
    weights = storage.read_bytes(storage.join(src, WEIGHTS_FILE))
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, WEIGHTS_FILE), "wb") as f:
            f.write(weights)
        if model_id_for(card.arch, _weights_digest(os.path.join(tmp, WEIGHTS_FILE))) != card.model_id:
            raise ModelError(f"{src}: its weights are not those of the card's model id {card.model_id}")
        _publish_artifact(tmp, card, dest, files)
    return card


def _publish_artifact(tmp: str, card: ModelCard, dest: str, files: Optional[dict]) -> None:
    """`tmp` holds weights.pt: add `files` and the card (with the files' sha256), then publish."""
    card.files = {name: hashlib.sha256(data).hexdigest() for name, data in (files or {}).items()}
    for name, data in (files or {}).items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    with open(os.path.join(tmp, CARD_FILE), "w") as f:
        json.dump(asdict(card), f, indent=2, default=str)
    if storage.is_remote(dest):
        storage.write_bytes(storage.join(dest, WEIGHTS_FILE), open(os.path.join(tmp, WEIGHTS_FILE), "rb").read())
        for name, data in (files or {}).items():  # before the card, like the weights
            storage.write_bytes(storage.join(dest, name), data)
        storage.write_bytes(storage.join(dest, CARD_FILE), open(os.path.join(tmp, CARD_FILE), "rb").read())
    else:
        _publish_folder(tmp, dest)


def _publish_folder(src: str, dest: str) -> None:
    """Copy `src` to a hidden sibling of `dest`, then rename it to `dest` (replacing an old one)."""
    import shutil
    import uuid

    dest = os.path.abspath(dest)
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    shutil.copytree(src, staging)
    if os.path.exists(dest):  # keep the old artifact whole until the new one is in place
        old = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.old")
        os.rename(dest, old)
        os.rename(staging, dest)
        shutil.rmtree(old)
    else:
        os.rename(staging, dest)


def validate_card(raw, card_path: str) -> ModelCard:
    """The card's fields, checked before anything is built from them; errors name the file and field."""
    from medclf.config import MODEL_ARCHS

    def bad(field_name: str, problem: str) -> ModelError:
        return ModelError(f"{card_path}: {field_name} {problem}")

    if not isinstance(raw, dict):
        raise ModelError(f"{card_path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("artifact_version") != ARTIFACT_VERSION:
        raise ModelError(f"{card_path}: artifact version {raw.get('artifact_version')} is not {ARTIFACT_VERSION}")
    card_archs = (*MODEL_ARCHS, ENSEMBLE_ARCH)  # an ensemble is an artifact, never a training model.arch
    if raw.get("arch") not in card_archs:
        raise bad("arch", f"{raw.get('arch')!r} is not a known architecture ({', '.join(card_archs)})")
    classes = raw.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)):
        raise bad("classes", f"must be a list of at least 2 non-empty names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise bad("classes", f"has duplicates: {classes}")
    if not isinstance(raw.get("model_id"), str) or not raw["model_id"]:
        raise bad("model_id", f"must be a non-empty string, got {raw.get('model_id')!r}")
    positive = raw.get("positive_class")
    if positive is not None and positive not in classes:
        raise bad("positive_class", f"{positive!r} is not one of the classes {classes}")
    threshold = raw.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        raise bad("threshold", f"must be a number in [0, 1] or null, got {threshold!r}")
    temperature = raw.get("temperature", 1.0)  # calibration; optional in cards written before it existed
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise bad("temperature", f"must be a number > 0, got {temperature!r}")
    if not isinstance(raw.get("test_time_hflip", False), bool):
        raise bad("test_time_hflip", f"must be true or false, got {raw['test_time_hflip']!r}")
    files = raw.get("files", {})
    if not (isinstance(files, dict) and all(re.fullmatch(r"[\w.-]+", str(k)) and k not in (WEIGHTS_FILE, CARD_FILE)
                                            and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                                            for k, v in files.items())):
        raise bad("files", "must map plain file names to sha256 hex digests")
    from medclf.model.records import DomainRecord, ReferenceRecord

    for name, record_type, what in (("domain", DomainRecord, "domain record"),
                                    ("reference", ReferenceRecord, "drift reference")):
        if raw.get(name) is not None:
            problem = _record_problem(record_type, raw[name], files, what)
            if problem:
                raise bad(name, problem)
    for name, kind in (("preprocess", dict), ("metrics", dict), ("config", dict), ("intended_use", dict),
                       ("provenance", dict), ("failure_modes", list)):
        if name in raw and not isinstance(raw[name], kind):
            raise bad(name, f"must be a JSON object, got {type(raw[name]).__name__}")
    try:
        PreprocessConfig.model_validate(raw.get("preprocess", {}))
    except Exception as exc:
        raise bad("preprocess", f"is not a valid preprocessing spec ({exc})") from None
    known = set(ModelCard.__dataclass_fields__)
    return ModelCard(**{k: v for k, v in raw.items() if k in known})


def load_card(path: str) -> ModelCard:
    card_path = storage.join(path, CARD_FILE)
    try:
        raw = json.loads(storage.read_bytes(card_path))
    except FileNotFoundError:
        raise ModelError(f"{path}: not a model artifact (no {CARD_FILE})") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{card_path}: not valid JSON ({exc})") from None
    return validate_card(raw, card_path)


@dataclass
class ArtifactFiles:
    """An artifact folder read once: its card, its weights (None when read without them) and its other
    files (`card.files`), each checked against the card before anything is built from it."""

    path: str
    card: ModelCard
    state: Optional[dict]
    files: dict[str, bytes]

    def arrays(self, name: str, needed: list[str]) -> dict:
        """The arrays of one of the artifact's .npz files, every one of `needed` present."""
        return _npz_arrays(self.files[name], storage.join(self.path, name), needed)

    def network(self, device: str = "cpu") -> nn.Module:
        """The network in eval mode, as it predicts (wrapped in MirrorMean where the card says
        `test_time_hflip`); an Ensemble (medclf.model.ensemble) where the card's arch is `ensemble`."""
        if self.state is None:
            raise ModelError(f"{self.path}: read without its weights; read_artifact(path, weights=True) to build it")
        if self.card.arch == ENSEMBLE_ARCH:
            ensemble = build_ensemble(self.card, len(self.card.classes))
            ensemble.load_state_dict(self.state)
            return ensemble.to(device).eval()
        dropout = float(self.card.config.get("model", {}).get("dropout", 0.0) or 0.0)
        model = build_model(self.card.arch, len(self.card.classes), "none", dropout=dropout)
        model.load_state_dict(self.state)
        return predicting_model(model, self.card.test_time_hflip).to(device).eval()


def read_artifact(path: str, weights: bool = True) -> ArtifactFiles:
    """Read an artifact folder (local or s3://) once: the card, the weights and every other file.

    The weights must hash to the card's model_id (a replaced weights.pt under an old card is refused),
    and every other file to its sha256 in the card: an altered artifact is refused here, before any job
    uses it.
    """
    card = load_card(path)
    state = _read_weights(path, card) if weights else None
    return ArtifactFiles(path, card, state, {name: read_artifact_file(path, card, name) for name in card.files})


def _read_weights(path: str, card: ModelCard) -> dict:
    weights_path = storage.join(path, WEIGHTS_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        local = weights_path
        if storage.is_remote(weights_path):
            local = os.path.join(tmp, WEIGHTS_FILE)
            try:
                data = storage.read_bytes(weights_path)
            except FileNotFoundError:
                raise ModelError(f"weights file not found: {weights_path}") from None
            with open(local, "wb") as f:
                f.write(data)
        if not os.path.exists(local):
            raise ModelError(f"weights file not found: {weights_path}")
        expected = model_id_for(card.arch, _weights_digest(local))
        if expected != card.model_id:
            raise ModelError(f"{weights_path}: the weights hash to model id {expected}, but {CARD_FILE} says "
                             f"{card.model_id}; the artifact was altered or is half-written")
        return load_weights_file(local)


def load_artifact(path: str, device: str = "cpu") -> tuple[nn.Module, ModelCard]:
    """The network (in eval mode, as it predicts) and the card of an artifact, for callers that need
    nothing else of it; medclf.monitor.opened.open_model also gives its domain and drift reference."""
    files = read_artifact(path)
    return files.network(device), files.card


def _record_problem(record_type, raw, files: dict, what: str) -> Optional[str]:
    """What is wrong with a card's record of one of its other files (domain, drift reference), or None."""
    from pydantic import ValidationError

    try:
        record = record_type.model_validate(raw)
    except ValidationError as exc:
        return f"is not a valid {what} ({exc.error_count()} problem(s): {exc.errors()[0]['msg']})"
    if record.file not in files:
        return f"names {record.file!r}, which the card's `files` does not list with its sha256"
    return None


def _npz_arrays(data: bytes, where: str, needed: list[str]) -> dict:
    import io

    import numpy as np

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise ModelError(f"{where}: not a readable .npz ({type(exc).__name__})") from None
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise ModelError(f"{where}: lacks the arrays {missing}")
    return arrays


def read_artifact_file(path: str, card: ModelCard, name: str) -> bytes:
    """One of the artifact's other files (`card.files`), its sha256 checked against the card."""
    if name not in card.files:
        raise ModelError(f"{storage.join(path, CARD_FILE)}: lists no file {name!r}")
    where = storage.join(path, name)
    try:
        data = storage.read_bytes(where)
    except FileNotFoundError:
        raise ModelError(f"{where}: file not found; {CARD_FILE} lists it (the artifact is incomplete)") from None
    if hashlib.sha256(data).hexdigest() != card.files[name]:
        raise ModelError(f"{where}: its sha256 is not the one {CARD_FILE} records; the artifact was altered or "
                         "is half-written")
    return data
