"""Test-time augmentation by mirror image (`model.test_time_hflip`): one rule, the mean logits of an
image and its left-right mirror, applied alike by training's validation (hence the temperature and
the epoch kept), scoring, Grad-CAM and the exported graph; refused for a model never trained on
mirror images."""

import glob
import os

import numpy as np
import pandas as pd
import pytest
import torch

from medclf.config import ConfigError, load_config
from medclf.imaging.decode import decode
from medclf.model.card import CARD_MARKDOWN
from medclf.model.artifact import ModelCard, load_artifact, save_artifact
from medclf.model.networks import MirrorMean, build_model, class_probabilities, head_module, penultimate, plain_model
from medclf.data.predictions import prob_column
from medclf.imaging.preprocess import preprocess_gray, to_model_input
from medclf.train.loop import STATE_FILE

from tests.conftest import TINY


def _asymmetric_batch(n: int = 4, size: int = 32) -> torch.Tensor:
    x = torch.zeros(n, 3, size, size)
    x[:, :, 4:12, 2:10] = 1.0  # a bright patch on the left: its mirror image is another input
    return x + 0.1 * torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_mirror_mean_is_the_mean_over_the_image_and_its_mirror_and_keeps_the_weights(tmp_path):
    torch.manual_seed(0)
    model = build_model("small_cnn", 3).eval()
    with torch.no_grad():  # an untrained head's logits barely move: scale it so the mirror shows
        for p in head_module(model, "small_cnn").parameters():
            p.mul_(1000.0)
    x = _asymmetric_batch()
    with torch.inference_mode():
        plain, mirrored = model(x), model(x.flip(-1))
        logits, features = penultimate(MirrorMean(model), "small_cnn", x)
        _, plain_features = penultimate(model, "small_cnn", x)
    assert (plain - mirrored).abs().max() > 1e-2  # the mirror is another input: the check can fail
    torch.testing.assert_close(logits, (plain + mirrored) / 2)
    torch.testing.assert_close(features, plain_features)  # the guard's features: the image as given

    card = ModelCard(arch="small_cnn", classes=["a", "b", "c"], preprocess={"image_size": 32}, test_time_hflip=True)
    saved = save_artifact(MirrorMean(model), card, str(tmp_path / "m"))
    assert saved.model_id == save_artifact(model, ModelCard(arch="small_cnn", classes=["a", "b", "c"],
                                                            preprocess={"image_size": 32}), str(tmp_path / "p")).model_id
    loaded, loaded_card = load_artifact(str(tmp_path / "m"))
    assert isinstance(loaded, MirrorMean) and loaded_card.test_time_hflip
    assert not isinstance(load_artifact(str(tmp_path / "p"))[0], MirrorMean)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), logits)


def test_test_time_hflip_without_training_flips_is_a_config_error():
    with pytest.raises(ConfigError, match="train.augment.hflip"):
        load_config(None, ["model.test_time_hflip=true"])
    cfg = load_config(None, ["model.test_time_hflip=true", "train.augment.hflip=true"])
    assert cfg.model.test_time_hflip


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_mirror_mean_is_applied_alike_by_validation_scoring_gradcam_and_export(ray_cluster, phantom_root, tmp_path):
    from medclf.model.export import ONNX_FILE, export_artifact
    from medclf.report.gradcam import run_explain
    from medclf.data.predictions import read_predictions
    from medclf.score.batch import run_scoring
    from medclf.train.driver import run_training

    ort = pytest.importorskip("onnxruntime")
    cfg = load_config(None, TINY + [f"data.root={phantom_root}", f"run.root={tmp_path / 'runs'}",
                                    "train.augment={hflip: true}", "model.test_time_hflip=true",
                                    "train.epochs=3", "train.lr=0.01"])  # a model whose two views differ
    result = run_training(cfg, str(tmp_path / "runs" / "tta"))
    model, card = load_artifact(result.model_path)
    assert card.test_time_hflip and isinstance(model, MirrorMean)
    assert "mirror image" in open(os.path.join(result.model_path, CARD_MARKDOWN)).read()  # said to its readers

    def pixels(paths):
        return torch.from_numpy(np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, card.preprocess_spec)
                                          for p in paths]))

    # Training validated (kept an epoch, fitted the temperature) on the mean over mirror images
    run_dir = os.path.dirname(result.model_path)
    checkpoints = sorted(p for p in glob.glob(os.path.join(run_dir, "ray_train", "checkpoint_*")) if os.path.isdir(p))
    gathered = torch.load(os.path.join(checkpoints[-1], STATE_FILE), map_location="cpu",
                          weights_only=True)["best"]["val_log_probs"].numpy()
    val_x = to_model_input(pixels(pd.read_parquet(os.path.join(run_dir, "splits.parquet")).query("split == 'val'").path))
    with torch.inference_mode():
        as_predicted = torch.log_softmax(model(val_x), 1).numpy()
        unmirrored = torch.log_softmax(plain_model(model)(val_x), 1).numpy()
    assert np.abs(as_predicted - unmirrored).max() > 1e-3  # the two rules differ on these images
    np.testing.assert_allclose(gathered, as_predicted, atol=5e-5, rtol=0)

    files = sorted(glob.glob(os.path.join(phantom_root, "test", "*", "*.png")))[:8]
    x = pixels(files)
    with torch.inference_mode():
        expected = class_probabilities(model(to_model_input(x)), card.temperature).numpy()
    manifest = str(tmp_path / "inputs.csv")
    pd.DataFrame({"path": files}).to_csv(manifest, index=False)
    cfg.score.allowed_roots = [phantom_root]  # the manifest (in tmp_path) names files there
    for runtime in ("torch", "onnxruntime"):  # the ONNX scoring graph holds the mirror and the guard's features
        cfg.score.runtime = runtime
        out = str(tmp_path / f"pred-{runtime}")
        run_scoring(cfg, f"tta-{runtime}", manifest, result.model_path, out)
        scored = read_predictions(out).set_index("path").loc[files]
        assert (scored["status"] == "ok").all()
        np.testing.assert_allclose(scored[[prob_column(c) for c in card.classes]].to_numpy(), expected, atol=1e-5)

    index = run_explain(files, result.model_path, str(tmp_path / "cam"), target=card.classes[1], cpus_per_actor=0.5)
    np.testing.assert_allclose(index.set_index("path").loc[files, "probability"].to_numpy(), expected[:, 1], atol=1e-5)

    exported = str(tmp_path / "exported")
    contract = export_artifact(result.model_path, exported)
    assert contract["test_time_hflip"] is True
    session = ort.InferenceSession(os.path.join(exported, ONNX_FILE), providers=["CPUExecutionProvider"])
    for batch in (x[:1], x):  # the mirror is inside the graph, and the batch stays dynamic
        _, onnx_probs = session.run(None, {"image": batch.numpy()})
        np.testing.assert_allclose(onnx_probs, expected[:len(batch)], atol=1e-4)
