"""Calibration: temperature fitting, and the stored temperature applied the same way by scoring,
Grad-CAM, evaluation and the training job's own validation."""

import glob
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from medclf.model.calibration import (
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    softmax_with_temperature,
)
from medclf.config import PreprocessConfig
from medclf.imaging.manifest import read_manifest
from medclf.imaging.decode import decode
from medclf.model.artifact import CARD_FILE, load_artifact
from medclf.model.networks import class_probabilities
from medclf.data.predictions import prob_column
from medclf.data.phantoms import generate
from medclf.imaging.preprocess import preprocess_gray, to_model_input
from medclf.train.loop import STATE_FILE


def test_fit_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, (4000, 3))
    y = np.array([rng.choice(3, p=p) for p in softmax_with_temperature(true_logits, 1.0)])
    t = fit_temperature(true_logits * 3.0, y)  # a model 3x too sure of itself
    assert t == pytest.approx(3.0, rel=0.1)
    assert negative_log_likelihood(true_logits * 3.0, y, t) < negative_log_likelihood(true_logits * 3.0, y, 1.0)
    # ranking is untouched: a monotone rescale of every row
    p1, pt = softmax_with_temperature(true_logits * 3, 1.0), softmax_with_temperature(true_logits * 3, t)
    assert (p1.argmax(1) == pt.argmax(1)).all()
    assert fit_temperature(true_logits, np.zeros(len(y), int)) == 1.0  # one class: nothing to fit


def _phantom_batch(root: str, spec: PreprocessConfig) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    manifest = read_manifest(os.path.join(root, "manifest.parquet"))  # paths relative to the manifest: resolved
    manifest = manifest[manifest["format"] == "png"].reset_index(drop=True)
    x = np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec) for p in manifest["path"]])
    y = (manifest["label"] == "POSITIVE").to_numpy().astype(int)
    return torch.from_numpy(x), y, list(manifest["path"])


@pytest.mark.timeout(600)
def test_calibrated_model_has_lower_ece_on_held_out_phantoms(trained_model, tmp_path):
    """An over-confident model (its logit gap standardised and scaled 6x), T fitted on one half of
    fresh phantom validation, ECE measured on the other half: lower with the temperature than without."""
    model, card = load_artifact(trained_model.model_path)
    root = str(tmp_path / "fresh")
    generate(root, n_train=240, n_test=2, image_size=32, formats=("png",), seed=123)
    x, y, _ = _phantom_batch(root, card.preprocess_spec)
    with torch.inference_mode():
        raw = model(to_model_input(x)).numpy()
    gap = raw[:, 1] - raw[:, 0]
    logits = np.stack([np.zeros_like(gap), 6.0 * (gap - gap.mean()) / gap.std()], 1)
    fit, held = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    t = fit_temperature(logits[fit], y[fit])
    pos = card.positive_index
    before = expected_calibration_error(y[held], softmax_with_temperature(logits[held], 1.0)[:, pos])
    after = expected_calibration_error(y[held], softmax_with_temperature(logits[held], t)[:, pos])
    assert t > 1.5, t  # it saw the over-confidence
    assert after < before, (before, after)
    # the training job fitted and recorded its own temperature the same way
    assert card.temperature > 0 and card.calibration["method"] == "temperature"
    assert card.calibration["log_loss_after"] <= card.calibration["log_loss_before"] + 1e-9


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_stored_temperature_is_applied_identically_by_scoring_gradcam_and_evaluation(
        ray_cluster, trained_model, tiny_config, phantom_root, tmp_path):
    from medclf.report.evaluate import run_evaluation
    from medclf.report.gradcam import run_explain
    from medclf.data.predictions import read_predictions
    from medclf.score.batch import run_scoring

    artifact = str(tmp_path / "model")
    shutil.copytree(trained_model.model_path, artifact)
    card_path = os.path.join(artifact, CARD_FILE)
    card_json = json.load(open(card_path))
    card_json["temperature"] = 0.05  # sharpen 20x: a 1-epoch model sits near 0.5
    json.dump(card_json, open(card_path, "w"))
    model, card = load_artifact(artifact)
    assert card.temperature == 0.05

    files = sorted(glob.glob(os.path.join(phantom_root, "test", "*", "*.png")))[:8]
    x = torch.from_numpy(np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, card.preprocess_spec)
                                   for p in files]))
    with torch.inference_mode():
        logits = model(to_model_input(x))
    expected = class_probabilities(logits, 0.05).numpy()
    uncalibrated = torch.softmax(logits, 1).numpy()
    assert np.abs(expected - uncalibrated).max() > 1e-3  # the check below can tell them apart

    manifest = str(tmp_path / "inputs.csv")
    pd.DataFrame({"path": files}).to_csv(manifest, index=False)
    out = str(tmp_path / "pred")
    tiny_config.score.allowed_roots = [phantom_root]  # the manifest (in tmp_path) names files there
    run_scoring(tiny_config, "calib", manifest, artifact, out)
    pred = read_predictions(out).set_index("path").loc[files]
    scored = pred[[prob_column(c) for c in card.classes]].to_numpy()
    np.testing.assert_allclose(scored, expected, atol=1e-5)

    index = run_explain(files, artifact, str(tmp_path / "cam"), target=card.classes[1], cpus_per_actor=0.5)
    explained = index.set_index("path").loc[files, "probability"].to_numpy()
    np.testing.assert_allclose(explained, expected[:, 1], atol=1e-5)

    labels = str(tmp_path / "labels.csv")
    pd.DataFrame({"path": files, "label": [os.path.basename(os.path.dirname(p)) for p in files]}).to_csv(labels)
    report = run_evaluation(out, str(tmp_path / "report"), card.classes, card.positive_class, labels,
                            bootstrap_resamples=0)
    y = np.array([card.classes.index(os.path.basename(os.path.dirname(p))) for p in files])
    expected_loss = -np.mean(np.log(np.clip(expected[np.arange(len(y)), y], 1e-15, 1)))
    assert report.metrics.iloc[0]["log_loss"] == pytest.approx(expected_loss, abs=1e-4)


def test_validation_figures_are_the_saved_models_own(trained_model):
    """The temperature, the threshold and the validation report are fitted on the validation
    log-probabilities gathered during training, half of them computed on the second Train worker.
    DDP leaves each worker's BatchNorm running statistics updated by its own last batch, so unless
    they are made equal before validating, those figures describe a model nobody saved (lung CT,
    before the fix: the second worker's rows off by up to 0.52 in log-probability, and 1 in 127
    breast images changed class between the report and re-scoring)."""
    run_dir = os.path.dirname(trained_model.model_path)
    model, card = load_artifact(trained_model.model_path)
    checkpoints = sorted(p for p in glob.glob(os.path.join(run_dir, "ray_train", "checkpoint_*")) if os.path.isdir(p))
    saved = torch.load(os.path.join(checkpoints[-1], STATE_FILE), map_location="cpu", weights_only=True)
    val = pd.read_parquet(os.path.join(run_dir, "splits.parquet")).query("split == 'val'")
    x = torch.from_numpy(np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, card.preprocess_spec)
                                   for p in val.path]))
    with torch.inference_mode():
        rescored = torch.log_softmax(model(to_model_input(x)), 1).numpy()
    gathered = saved["best"]["val_log_probs"].numpy()
    assert len(val) >= 8 and gathered.shape == rescored.shape
    # the tiny model is on the in-memory path (exact float32 pixels): only batch-size rounding
    # (~4e-6) may remain; a 1-epoch model's unsynchronised statistics show as ~5e-4
    np.testing.assert_allclose(gathered, rescored, atol=5e-5, rtol=0)
