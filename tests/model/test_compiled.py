"""score.compile (medclf.model.compiled): the network traced whole into one graph that returns
(logits, features) as `penultimate` reads them, so torch.compile needs no hook; the compiled Predictor
answers as the eager one."""

import shutil

import numpy as np
import pytest
import torch

from medclf.config import ConfigError, load_config
from medclf.model.artifact import ModelCard, save_artifact
from medclf.model.compiled import CompileError, check_compilable, logits_and_features_module
from medclf.model.networks import MirrorMean, build_model, penultimate


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18", "small_cnn"])
@pytest.mark.parametrize("mirrored", [False, True])
def test_the_graph_returns_what_penultimate_reads(arch, mirrored):
    torch.manual_seed(0)
    model = build_model(arch, 2).eval()
    model = MirrorMean(model) if mirrored else model
    graph = logits_and_features_module(model, arch)
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        logits, features = penultimate(model, arch, x)
        logits2, features2 = graph(x)
    assert features2.shape == features.shape == (3, features.shape[1])
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    torch.testing.assert_close(features2, features, rtol=0, atol=0)


def test_an_ensemble_or_an_onnx_runtime_config_is_refused_before_any_work():
    with pytest.raises(CompileError, match="ensemble artifact cannot be compiled"):
        check_compilable("ensemble")
    check_compilable("efficientnet_lite0")
    with pytest.raises(ConfigError, match="compile: true runs on the torch runtime only"):
        load_config(None, ["score.compile=true", "score.runtime=onnxruntime"])


@pytest.mark.skipif(not shutil.which("c++"), reason="torch.compile's CPU backend needs a C++ compiler")
def test_the_compiled_predictor_answers_as_the_eager_one(tmp_path):
    from medclf.score.predictor import Predictor

    dest = str(tmp_path / "model")
    torch.manual_seed(0)
    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], positive_class="POSITIVE",
                     preprocess={"image_size": 32}, threshold=0.5)
    save_artifact(build_model("small_cnn", 2), card, dest)
    pixels = np.random.default_rng(0).random((6, 1, 32, 32), dtype=np.float32)
    eager = Predictor(dest, "run", threads=1)
    compiled = Predictor(dest, "run", threads=1, compile_model=True)
    assert compiled.compiled is not None and eager.compiled is None
    logits, features = eager.logits_and_features(pixels)
    logits2, features2 = compiled.logits_and_features(pixels)
    np.testing.assert_allclose(logits2, logits, rtol=0, atol=1e-4)
    np.testing.assert_allclose(features2, features, rtol=0, atol=1e-4)
