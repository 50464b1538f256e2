"""Site calibration on phantoms: the CLI's refusals, a shifted archive's ECE, scoring with the file (real Ray).

Pure-function tests (synthetic logits, EM) are in tests/model/test_site_calibration.py.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from medclf.cli import main
from medclf.data.predictions import prob_column, read_predictions
from medclf.data.phantoms import generate, write_shifted
from medclf.model import site_calibration, site_fit
from medclf.model.artifact import ModelCard, load_card, save_artifact
from medclf.model.networks import build_model
from medclf.model.calibration import expected_calibration_error


@pytest.fixture
def random_model(tmp_path):
    """An untrained small_cnn artifact: enough for the checks that must fail before any image is read."""
    torch.manual_seed(0)
    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], preprocess={"image_size": 32},
                     positive_class="POSITIVE", threshold=0.5, config={"train": {"threshold": "youden"}})
    path = str(tmp_path / "model")
    save_artifact(build_model("small_cnn", 2), card, path)
    return path


def _folder(root, counts: dict, garbage: bool = False) -> str:
    """`root/<CLASS>/<i>.png`: real phantom PNGs, or bytes that are no image at all."""
    from medclf.data.phantoms import png_bytes

    for label, n in counts.items():
        os.makedirs(os.path.join(root, label), exist_ok=True)
        for i in range(n):
            data = b"not an image" if garbage else png_bytes(np.full((32, 32), i / max(n, 1), np.float32))
            with open(os.path.join(root, label, f"{i}.png"), "wb") as f:
                f.write(data)
    return str(root)


def test_calibrate_refuses_one_class_and_small_k_before_reading_images(random_model, tmp_path, capsys):
    # the files are not images: a refusal that names them would mean they were read first
    one_class = _folder(tmp_path / "one", {"POSITIVE": 40}, garbage=True)
    out = str(tmp_path / "cal.json")
    assert main(["calibrate", "--model", random_model, "--labelled", one_class, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "holds only class ['POSITIVE']" in err and "not a PNG" not in err and not os.path.exists(out)
    small = _folder(tmp_path / "small", {"POSITIVE": 8, "NORMAL": 7}, garbage=True)
    assert main(["calibrate", "--model", random_model, "--labelled", small, "--out", out]) == 2
    assert "k=15 labelled films is too few" in capsys.readouterr().err and not os.path.exists(out)


def test_calibrate_leaves_out_films_that_do_not_decode_and_writes_the_file(random_model, tmp_path, capsys):
    root = _folder(tmp_path / "site", {"POSITIVE": 12, "NORMAL": 12})
    with open(os.path.join(root, "POSITIVE", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    out = str(tmp_path / "cal.json")
    assert main(["calibrate", "--model", random_model, "--labelled", root, "--out", out]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err
    cal = site_calibration.load(out, load_card(random_model))
    assert cal.fitted_on["k"] == 24 and cal.fitted_on["failed_to_decode"] == 1
    assert cal.calibration_id in captured.out and "95% CI" in captured.out


@pytest.fixture(scope="module")
def phantom_model(tmp_path_factory):
    """A small_cnn trained in this process (plain torch, seconds) on 32 px phantoms, through the same
    decode + preprocess path scoring uses; the card keeps temperature 1 and threshold 0.5."""
    from medclf.imaging.decode import decode
    from medclf.imaging.preprocess import preprocess_gray, to_model_input

    root = str(tmp_path_factory.mktemp("train_phantoms"))
    manifest = generate(root, n_train=240, n_test=0, image_size=32, formats=("png",), seed=5)
    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], preprocess={"image_size": 32},
                     positive_class="POSITIVE", threshold=0.5, threshold_rule="youden",
                     config={"train": {"threshold": "youden"}})
    spec = card.preprocess_spec
    x = torch.from_numpy(np.stack([preprocess_gray(decode(open(os.path.join(root, p), "rb").read(), p).image, spec)
                                   for p in manifest.path]))
    y = torch.tensor([card.classes.index(lab) for lab in manifest.label])
    torch.manual_seed(0)
    model = build_model("small_cnn", 2)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(15):
        for idx in torch.randperm(len(y)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(to_model_input(x[idx])), y[idx]).backward()
            opt.step()
    path = str(tmp_path_factory.mktemp("model") / "model")
    save_artifact(model.eval(), card, path)
    return path


def _shifted_archive(tmp_path, n: int = 240):
    """A new site: phantoms of another seed, every film put through gamma 1.6 and contrast x0.6."""
    root = str(tmp_path / "phantoms")
    manifest = generate(root, n_train=n, n_test=0, image_size=32, formats=("png",), seed=123)
    paths = write_shifted([os.path.join(root, p) for p in manifest.path], str(tmp_path / "shifted"), gamma=1.6,
                          contrast=0.6)
    return paths, list(manifest.label)


@pytest.mark.timeout(900)
def test_few_shot_calibration_improves_ece_on_the_rest_of_a_shifted_archive(phantom_model, tmp_path):
    paths, labels = _shifted_archive(tmp_path)
    card = load_card(phantom_model)
    logits, ok, errors = site_fit.logits_of(phantom_model, paths)
    assert ok.all() and not errors
    y = np.array([card.classes.index(lab) for lab in labels])
    y_pos = (y == card.positive_index).astype(int)
    rng = np.random.default_rng(0)
    improved = []
    for _ in range(5):  # five draws of k=60 labelled films, each judged on the other 180
        idx = rng.permutation(len(y))
        fit_idx, rest = idx[:60], idx[60:]
        cal = site_fit.fit(logits[fit_idx], y[fit_idx], card, n_resamples=0)
        before = torch.softmax(torch.from_numpy(logits[rest]) / card.temperature, 1)[:, card.positive_index].numpy()
        after = cal.probabilities(logits[rest])[:, card.positive_index]
        improved.append((expected_calibration_error(y_pos[rest], before),
                         expected_calibration_error(y_pos[rest], after)))
    before, after = np.array(improved).T
    print("ECE on the rest, before / after:", improved)
    assert before.mean() > 0.08  # the shift did break the model's calibration
    # A fresh install measured 0.142 -> 0.103 (every draw lower), the helper's environment 0.32 -> 0.16:
    # the gain varies with the phantom model, so the bound asks for a clear gain, not its size there.
    assert after.mean() < 0.8 * before.mean() and (after < before).sum() >= 4


@pytest.mark.timeout(900)
def test_scoring_with_a_calibration_file_follows_its_threshold_and_records_its_id(ray_cluster, phantom_model,
                                                                                  tmp_path, tiny_config):
    from medclf.score.batch import run_scoring

    paths, labels = _shifted_archive(tmp_path, n=60)
    card = load_card(phantom_model)
    logits, ok, _ = site_fit.logits_of(phantom_model, paths)
    y = np.array([card.classes.index(lab) for lab in labels])
    fitted = site_fit.fit(logits, y, card, n_resamples=0)
    # the same calibration with its threshold at the median probability: half the films change side
    p = fitted.probabilities(logits)[:, card.positive_index]
    moved = site_calibration.finish(dataclasses.replace(fitted, threshold=float(np.median(p)), calibration_id=""))
    assert moved.calibration_id != fitted.calibration_id
    cal_path = str(tmp_path / "site_calibration.json")
    site_calibration.save(moved, cal_path)

    tiny_config.score.site_calibration = cal_path
    out = str(tmp_path / "preds")
    summary = run_scoring(tiny_config, "cal-run", str(tmp_path / "shifted"), phantom_model, out)
    assert summary.scored == len(paths)
    df = read_predictions(out)
    assert (df["calibration_id"] == moved.calibration_id).all()
    assert np.allclose(df["threshold"], moved.threshold)
    order = [paths.index(p) for p in df["path"]]
    probs = df[prob_column(card.positive_class)].to_numpy()
    np.testing.assert_allclose(probs, moved.probabilities(logits[order])[:, card.positive_index], atol=1e-5)
    expected = np.where(probs >= moved.threshold, card.positive_class, card.classes[1 - card.positive_index])
    assert (df["predicted_label"].to_numpy() == expected).all()
    n_pos = int((expected == card.positive_class).sum())
    assert abs(n_pos - len(paths) / 2) <= 2  # the median threshold, not the card's, decided the labels

    # the label-free prior report over those rows (the calibration's own films give pi_0)
    report_path = str(tmp_path / "prior.json")
    assert main(["prior", "--predictions", out, "--model", phantom_model, "--site-calibration", cal_path,
                 "--out", report_path]) == 0
    report = json.loads(open(report_path).read())
    assert report["n"] == len(paths) and report["calibration_id"] == moved.calibration_id
    assert 0 < report["estimated_prior"][card.positive_class] < 1 and "moved_threshold" in report

    # another model's scoring refuses this calibration before any work
    other = tmp_path / "other_model"
    torch.manual_seed(1)
    save_artifact(build_model("small_cnn", 2), dataclasses.replace(card, files={}, domain=None, reference=None),
                  str(other))
    with pytest.raises(site_calibration.SiteCalibrationError, match="fitted for model"):
        run_scoring(tiny_config, "cal-run-2", str(tmp_path / "shifted"), str(other), str(tmp_path / "p2"))

