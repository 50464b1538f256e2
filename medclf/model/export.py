"""Export a model artifact for runtimes other than medclf: ONNX and TorchScript.

ONNX (opset 18, dynamic batch) loads in ONNX Runtime, Triton's onnxruntime backend, TensorRT and
most inference appliances; TorchScript in LibTorch, Triton's pytorch backend and MONAI Deploy.
Both take what medclf's preprocessing produces, a batch of one-channel images `(N, 1, S, S)`
resized and normalised, and return `logits` and calibrated `probabilities` (softmax of
logits / temperature). The channel replication and the temperature are inside the graph, so a
consumer cannot forget either. Decoding and resizing are not: they stay in
`medclf.imaging.decode` / `medclf.imaging.preprocess`, and `contract.json`, written beside the files, says
exactly what they do, with the classes, the threshold and each file's sha256.

    medclf export --model runs/<id>/model --output exported/ [--format onnx torchscript]
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Iterable, Optional

import torch
from torch import nn

from medclf import storage
from medclf.model.artifact import ModelCard, load_artifact
from medclf.model.site_profile import adapt_network
from medclf.model.networks import class_probabilities
from medclf.imaging.preprocess import CHANNELS

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
CONTRACT_FILE = "contract.json"
FORMATS = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}
ONNX_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ["logits", "probabilities"]


class ExportedClassifier(nn.Module):
    """The artifact's network plus the two steps around it that a consumer must not get wrong."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image.expand(-1, CHANNELS, -1, -1))
        return logits, class_probabilities(logits, self.temperature)


def exportable(model_path: str,
               site_profile: Optional[str] = None) -> tuple[ExportedClassifier, ModelCard, Optional[str]]:
    """The network with its temperature, and with a site profile's statistics baked in when one is given
    (medclf.model.site_profile; refused for another model's profile or an altered one): the exported
    files then answer as `medclf score` does with that profile. Returns the profile id (None: none)."""
    model, card = load_artifact(model_path, "cpu")
    adaptation_id = adapt_network(model, card, site_profile) if site_profile else None
    return ExportedClassifier(model, card.temperature).eval(), card, adaptation_id


def export_onnx(module: ExportedClassifier, card: ModelCard, dest_file: str) -> None:
    size = card.preprocess_spec.image_size
    example = torch.zeros(2, 1, size, size)
    # The TorchScript-based exporter: the dynamo exporter needs onnxscript's newer op coverage and
    # gave the same graph for these CNNs; this one is what ONNX Runtime 1.2x and Triton are tested with.
    torch.onnx.export(module, (example,), dest_file, input_names=[INPUT_NAME], output_names=OUTPUT_NAMES,
                      opset_version=ONNX_OPSET, dynamo=False,
                      dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}})


def export_torchscript(module: ExportedClassifier, card: ModelCard, dest_file: str) -> None:
    size = card.preprocess_spec.image_size
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(module, torch.zeros(2, 1, size, size), check_trace=False)
    traced.save(dest_file)


def contract(card: ModelCard, files: dict[str, str], adaptation_id: Optional[str] = None) -> dict:
    """What a consumer needs to feed the exported model and read its answer, as data."""
    from medclf import __version__

    spec = card.preprocess_spec
    return {
        "model_id": card.model_id,
        "arch": card.arch,
        "classes": card.classes,
        "positive_class": card.positive_class,
        "threshold": card.threshold,
        "threshold_rule": card.threshold_rule,
        "decision": ("positive_class if probabilities[positive index] >= threshold, else the other class"
                     if card.threshold is not None and card.positive_class else "argmax of probabilities"),
        "temperature": card.temperature,
        "test_time_hflip": card.test_time_hflip,
        "adaptation_id": adaptation_id,
        "adaptation": ("BatchNorm statistics of site profile " + adaptation_id + " baked in (the rows `medclf score` "
                       "writes with that profile carry the same adaptation_id)") if adaptation_id else
                      "training statistics",
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 1, spec.image_size, spec.image_size],
                  "layout": "NCHW, one channel (replicated to 3 inside the model)"},
        "outputs": {"logits": {"dtype": "float32", "shape": ["batch", len(card.classes)],
                               **({"meaning": "mean of the logits of the image and of its left-right mirror image "
                                              "(test-time augmentation, inside the graph)"} if card.test_time_hflip else {})},
                    "probabilities": {"dtype": "float32", "shape": ["batch", len(card.classes)],
                                      "meaning": "softmax(logits / temperature): calibrated, columns in `classes` order"}},
        "preprocessing": {
            "image_size": spec.image_size, "mean": spec.mean, "std": spec.std,
            "steps": [
                "decode to one grayscale float image in [0, 1] (medclf.imaging.decode): DICOM through its modality LUT "
                "(rescale slope/intercept) then its VOI LUT or window (VOI LUT function honoured), MONOCHROME1 "
                "inverted, min-max scaled; PNG/JPEG divided by the maximum of their bit depth; colour reduced to "
                "luminance",
                f"resize to {spec.image_size}x{spec.image_size}, bilinear with antialiasing, aspect ratio not kept",
                "clamp to [0, 1]",
                f"normalise: (x - {spec.mean}) / {spec.std}",
            ],
            "reference_implementation": "medclf.imaging.preprocess.preprocess_gray",
        },
        "files": files,
        "onnx_opset": ONNX_OPSET,
        "exported_with": {"medclf": __version__, "torch": torch.__version__},
    }


def export_artifact(model_path: str, output: str, formats: Iterable[str] = ("onnx", "torchscript"),
                    site_profile: Optional[str] = None) -> dict:
    """Write the chosen formats and `contract.json` into `output` (local or s3://); returns the contract.
    `site_profile`: bake that profile's statistics into the files (the contract records its id)."""
    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"export formats must be among {', '.join(FORMATS)}; got {formats}")
    module, card, adaptation_id = exportable(model_path, site_profile)
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            local = os.path.join(tmp, FORMATS[fmt])
            (export_onnx if fmt == "onnx" else export_torchscript)(module, card, local)
            data = open(local, "rb").read()
            files[FORMATS[fmt]] = {"format": fmt, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            storage.makedirs(output)
            storage.write_bytes(storage.join(output, FORMATS[fmt]), data)
    doc = contract(card, files, adaptation_id)
    # Written last: a folder with a contract has every file the contract lists.
    storage.write_bytes(storage.join(output, CONTRACT_FILE), json.dumps(doc, indent=2).encode())
    return doc
