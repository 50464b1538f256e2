"""Exported models (ONNX, TorchScript) answer as the eager artifact does, and scoring with
`score.runtime: onnxruntime` writes the same predictions as with torch."""

import glob
import hashlib
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from medclf.config import MODEL_ARCHS, load_config
from medclf.imaging.decode import decode
from medclf.model.export import CONTRACT_FILE, ONNX_FILE, TORCHSCRIPT_FILE, export_artifact
from medclf.model.artifact import ModelCard, load_artifact, save_artifact
from medclf.model.networks import build_model, class_probabilities
from medclf.data.predictions import prob_column
from medclf.imaging.preprocess import preprocess_gray, to_model_input

ort = pytest.importorskip("onnxruntime")


def _phantom_pixels(root: str, spec, n: int = 12) -> np.ndarray:
    files = sorted(glob.glob(os.path.join(root, "test", "*", "*.png")))[:n]
    return np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec) for p in files])


def _check_export(artifact: str, out: str, pixels: np.ndarray) -> dict:
    model, card = load_artifact(artifact)
    with torch.inference_mode():
        logits = model(to_model_input(torch.from_numpy(pixels)))
    eager = class_probabilities(logits, card.temperature).numpy()
    doc = export_artifact(artifact, out)

    session = ort.InferenceSession(os.path.join(out, ONNX_FILE), providers=["CPUExecutionProvider"])
    for batch in (pixels[:1], pixels):  # dynamic batch: one image and many through the same file
        onnx_logits, onnx_probs = session.run(None, {"image": batch})
        np.testing.assert_allclose(onnx_logits, logits.numpy()[:len(batch)], atol=1e-4)
        np.testing.assert_allclose(onnx_probs, eager[:len(batch)], atol=1e-4)
    scripted = torch.jit.load(os.path.join(out, TORCHSCRIPT_FILE))
    with torch.inference_mode():
        ts_logits, ts_probs = scripted(torch.from_numpy(pixels[:5]))
    np.testing.assert_allclose(ts_logits.numpy(), logits.numpy()[:5], atol=1e-4)
    np.testing.assert_allclose(ts_probs.numpy(), eager[:5], atol=1e-4)

    import onnx

    opset = {o.domain: o.version for o in onnx.load(os.path.join(out, ONNX_FILE)).opset_import}
    assert opset[""] >= 17
    saved = json.load(open(os.path.join(out, CONTRACT_FILE)))
    assert saved == doc and saved["model_id"] == card.model_id and saved["classes"] == card.classes
    assert saved["temperature"] == card.temperature and saved["threshold"] == card.threshold
    assert saved["input"]["shape"] == ["batch", 1, card.preprocess_spec.image_size, card.preprocess_spec.image_size]
    for name, entry in saved["files"].items():
        assert hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest() == entry["sha256"]
    return saved


@pytest.mark.timeout(600)
def test_trained_model_exports_match_eager(trained_model, phantom_root, tmp_path):
    _, card = load_artifact(trained_model.model_path)
    pixels = _phantom_pixels(phantom_root, card.preprocess_spec)
    _check_export(trained_model.model_path, str(tmp_path / "exported"), pixels)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0", "mobilenet_v3_small"])
def test_every_architecture_family_exports(arch, tmp_path):
    """Random weights (no download) and a non-trivial temperature: the graph, not the training, is tested."""
    assert arch in MODEL_ARCHS
    torch.manual_seed(0)
    model = build_model(arch, 2, "none").eval()
    card = ModelCard(arch=arch, classes=["NORMAL", "POSITIVE"], preprocess={"image_size": 64},
                     positive_class="POSITIVE", threshold=0.4, temperature=1.7)
    artifact = str(tmp_path / "model")
    save_artifact(model, card, artifact)
    pixels = np.random.default_rng(0).normal(0, 1, (6, 1, 64, 64)).astype(np.float32)
    _check_export(artifact, str(tmp_path / "exported"), pixels)


def test_export_refuses_unknown_format(trained_model, tmp_path):
    with pytest.raises(ValueError, match="onnx, torchscript"):
        export_artifact(trained_model.model_path, str(tmp_path / "x"), ["tensorrt"])


def test_onnxruntime_on_gpu_is_a_config_error():
    from medclf.config import ConfigError

    with pytest.raises(ConfigError, match="runtime onnxruntime runs on CPU"):
        load_config(None, ["score.use_gpu=true", "score.runtime=onnxruntime"])


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_scoring_with_onnxruntime_matches_torch(ray_cluster, trained_model, tiny_config, phantom_root, tmp_path):
    from medclf.data.predictions import read_predictions
    from medclf.score.batch import run_scoring

    files = sorted(glob.glob(os.path.join(phantom_root, "test", "*", "*.png")))[:16]
    manifest = str(tmp_path / "inputs.csv")
    pd.DataFrame({"path": files}).to_csv(manifest, index=False)
    _, card = load_artifact(trained_model.model_path)
    columns = ["path", "predicted_label", "status", *[prob_column(c) for c in card.classes]]
    results = {}
    tiny_config.score.allowed_roots = [phantom_root]  # the manifest (in tmp_path) names files there
    for runtime in ("torch", "onnxruntime"):
        tiny_config.score.runtime = runtime
        out = str(tmp_path / runtime)
        run_scoring(tiny_config, f"rt-{runtime}", manifest, trained_model.model_path, out)
        results[runtime] = read_predictions(out, columns).set_index("path").loc[files]
    torch_rows, onnx_rows = results["torch"], results["onnxruntime"]
    assert (onnx_rows["status"] == "ok").all() and len(onnx_rows) == len(files)
    assert list(onnx_rows["predicted_label"]) == list(torch_rows["predicted_label"])
    probs = [prob_column(c) for c in card.classes]
    np.testing.assert_allclose(onnx_rows[probs].to_numpy(), torch_rows[probs].to_numpy(), atol=1e-5)
