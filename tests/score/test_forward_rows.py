"""The inference actor's CPU forward pass runs in chunks of CPU_FORWARD_ROWS images
(medclf.score.predictor), whatever batch it is handed, with the answers of one pass."""

import numpy as np
import pytest

from medclf.model.artifact import ModelCard, save_artifact
from medclf.model.networks import build_model
from medclf.score import predictor as predictor_module
from medclf.score.predictor import Predictor

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("m") / "model")
    torch.manual_seed(0)
    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], positive_class="POSITIVE",
                     preprocess={"image_size": 32}, threshold=0.5)
    save_artifact(build_model("small_cnn", 2), card, dest)
    return dest


def test_a_batch_is_run_in_chunks_with_the_answers_of_one_pass(model, monkeypatch):
    predictor = Predictor(model, "run", threads=1)
    pixels = np.random.default_rng(0).random((37, 1, 32, 32), dtype=np.float32)
    monkeypatch.setattr(predictor_module, "CPU_FORWARD_ROWS", 37)
    whole_logits, whole_features = predictor.logits_and_features(pixels)
    seen = []
    hook = predictor.model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    monkeypatch.setattr(predictor_module, "CPU_FORWARD_ROWS", 16)
    logits, features = predictor.logits_and_features(pixels)
    hook.remove()
    assert seen == [16, 16, 5]
    assert logits.shape == whole_logits.shape and features.shape == whole_features.shape
    np.testing.assert_allclose(logits, whole_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(features, whole_features, rtol=0, atol=1e-5)


def test_the_rows_of_a_scored_batch_keep_their_order(model, monkeypatch):
    """Each image's answer is its own: chunking must not shuffle rows (a row alone scores the same)."""
    predictor = Predictor(model, "run", threads=1)
    pixels = np.random.default_rng(1).random((20, 1, 32, 32), dtype=np.float32)
    monkeypatch.setattr(predictor_module, "CPU_FORWARD_ROWS", 8)
    logits, _ = predictor.logits_and_features(pixels)
    alone = np.concatenate([predictor.logits_and_features(pixels[i:i + 1])[0] for i in (0, 9, 19)])
    np.testing.assert_allclose(logits[[0, 9, 19]], alone, rtol=0, atol=1e-5)


def test_onnx_runtime_runs_in_chunks_too(model, monkeypatch):
    predictor = Predictor(model, "run", threads=1, runtime="onnxruntime")
    pixels = np.random.default_rng(2).random((19, 1, 32, 32), dtype=np.float32)
    monkeypatch.setattr(predictor_module, "CPU_FORWARD_ROWS", 19)
    whole, _ = predictor.logits_and_features(pixels)
    shapes = []
    run = predictor.onnx.run
    monkeypatch.setattr(predictor.onnx, "run", lambda names, feed: shapes.append(feed["image"].shape[0]) or
                        run(names, feed), raising=False)
    monkeypatch.setattr(predictor_module, "CPU_FORWARD_ROWS", 8)
    logits, _ = predictor.logits_and_features(pixels)
    assert shapes == [8, 8, 3]
    np.testing.assert_allclose(logits, whole, rtol=0, atol=1e-5)
