"""score.precision / serve.precision: which arithmetic the answering forward pass runs in
(medclf.score.precision), refused before any work where the runtime or device cannot run it."""

import numpy as np
import pytest

from medclf.config import ConfigError, load_config
from medclf.model.artifact import ModelCard, save_artifact
from medclf.model.networks import build_model
from medclf.score import precision as precision_rule
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


def test_the_rule_per_device(monkeypatch):
    assert precision_rule.autocast_dtype("auto", "cpu") is None  # what scoring always did
    assert precision_rule.autocast_dtype("auto", "cuda") is torch.float16
    assert precision_rule.autocast_dtype("float32", "cuda") is None
    assert precision_rule.autocast_dtype("bfloat16", "cuda") is torch.bfloat16
    with pytest.raises(precision_rule.PrecisionError, match="float16 needs a GPU"):
        precision_rule.autocast_dtype("float16", "cpu")
    monkeypatch.setattr(precision_rule, "cpu_has_bfloat16", lambda: True)
    assert precision_rule.autocast_dtype("bfloat16", "cpu") is torch.bfloat16
    monkeypatch.setattr(precision_rule, "cpu_has_bfloat16", lambda: False)
    with pytest.raises(precision_rule.PrecisionError, match="no native bfloat16.*precision float32"):
        precision_rule.autocast_dtype("bfloat16", "cpu")


@pytest.mark.parametrize("overrides, message", [
    (["score.precision=float16"], "float16 needs use_gpu"),
    (["score.precision=bfloat16", "score.runtime=onnxruntime"], "torch runtime only"),
    (["serve.precision=bfloat16", "serve.runtime=onnxruntime"], "torch runtime only"),
    (["score.precision=half"], "'auto', 'float32', 'bfloat16' or 'float16'"),
])
def test_a_precision_the_runtime_cannot_run_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_node_without_bfloat16_refuses_when_the_actor_starts(model, monkeypatch):
    monkeypatch.setattr(precision_rule, "cpu_has_bfloat16", lambda: False)
    with pytest.raises(precision_rule.PrecisionError, match="no native bfloat16"):
        Predictor(model, "run", threads=1, precision="bfloat16")


@pytest.mark.skipif(not precision_rule.cpu_has_bfloat16(), reason="this CPU has no native bfloat16")
def test_bfloat16_runs_in_bfloat16_and_stays_close_to_float32(model):
    x = np.random.default_rng(0).random((8, 1, 32, 32), dtype=np.float32)
    exact = Predictor(model, "run", threads=1)
    fast = Predictor(model, "run", threads=1, precision="bfloat16")
    a, fa = exact.logits_and_features(x)
    b, fb = fast.logits_and_features(x)
    assert a.dtype == b.dtype == np.float32  # rows are written as float32 either way
    assert not np.array_equal(a, b)  # the autocast is in effect: bfloat16 rounds
    # bfloat16 keeps 8 bits of mantissa: about 2-3 significant digits per operation
    assert np.abs(a - b).max() < 0.05 * max(1.0, np.abs(a).max())
    assert np.abs(fa - fb).max() < 0.05 * max(1.0, np.abs(fa).max())
