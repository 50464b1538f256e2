"""Ensembles as one artifact (medclf.model.ensemble, medclf.train.ensemble, `medclf ensemble`): two small CNNs
(different seeds and temperatures, untrained: the tests check how the ensemble combines its members, not
how well it classifies) joined on 60 labelled phantoms through the CLI, then scored (decode stage +
Predictor, no Ray), exported, explained and described like a single model."""

import dataclasses
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from medclf.cli import main
from medclf.config import ConfigError, load_config
from medclf.data.phantoms import generate
from medclf.data.predictions import prob_column
from medclf.imaging.decode import decode
from medclf.imaging.preprocess import preprocess_gray, to_model_input
from medclf.imaging.stage import load_images
from medclf.model import card as model_card
from medclf.model.artifact import ModelCard, load_artifact, load_card, read_artifact, save_artifact
from medclf.model.ensemble import ENSEMBLE_ARCH
from medclf.model.networks import build_model, penultimate
from medclf.model.records import input_gate
from medclf.report.gradcam import default_layer, grad_cam
from medclf.score.predictor import Predictor

pytestmark = pytest.mark.timeout(600)
CLASSES = ["NORMAL", "POSITIVE"]
TEMPERATURES = (1.7, 0.6)


def member(dest: str, seed: int, temperature: float, image_size: int = 32, classes=CLASSES,
           test_time_hflip: bool = False, train: dict | None = None) -> str:
    """An untrained small CNN saved as a member artifact with its own temperature."""
    torch.manual_seed(seed)
    card = ModelCard(arch="small_cnn", classes=list(classes), preprocess={"image_size": image_size},
                     positive_class=classes[1], threshold=0.5, temperature=temperature,
                     test_time_hflip=test_time_hflip,
                     config={"train": train or {"threshold": "youden"}, "data": {"modalities": ["CR", "DX"]}})
    save_artifact(build_model("small_cnn", len(classes)).eval(), card, dest)
    return dest


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two members (the second mirrors at test time), their ensemble made by `medclf ensemble` on the
    phantoms' train folder, and the phantoms' test files to score."""
    base = tmp_path_factory.mktemp("ensemble")
    generate(str(base / "ph"), n_train=60, n_test=16, image_size=32, formats=("png",), seed=5)
    members = [member(str(base / "m0"), 0, TEMPERATURES[0]),
               member(str(base / "m1"), 1, TEMPERATURES[1], test_time_hflip=True)]
    dest = str(base / "ensemble")
    code = main(["ensemble", "--members", *members, "--labelled", str(base / "ph" / "train"), "--out", dest,
                 "--set", "ood.quantile=0.99", "--extensions", ".png"])
    assert code == 0
    test_files = sorted(str(p) for p in (base / "ph" / "test").rglob("*.png"))
    return members, dest, test_files, base


def score_table(model_path, paths):
    """Prediction rows as scoring writes them (decode stage + Predictor), as in tests/monitor/test_drift.py."""
    card = load_card(model_path)
    predictor = Predictor(model_path, "run", threads=1, ood_action="flag")
    batches = load_images({"path": np.array(paths, object)}, card.preprocess, rows_per_batch=16,
                          gate=input_gate(card, "flag"))
    return pa.concat_tables([predictor(b) for b in batches]).to_pandas()


def probabilities(model_path, paths) -> np.ndarray:
    rows = score_table(model_path, paths)
    assert (rows["status"] == "ok").all(), rows[["status", "error"]]
    return rows[[prob_column(c) for c in CLASSES]].to_numpy()


def pixels(paths, size=32) -> np.ndarray:
    spec = load_config(None, [f"preprocess.image_size={size}"]).preprocess
    return np.stack([preprocess_gray(decode(open(p, "rb").read(), p).image, spec) for p in paths])


def test_scored_probabilities_are_the_mean_of_the_members_calibrated_ones(made):
    members, dest, test_files, _ = made
    expected = np.mean([probabilities(m, test_files) for m in members], axis=0)
    got = probabilities(dest, test_files)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # the members disagree, so the mean is not either member's answer
    assert np.abs(probabilities(members[0], test_files) - probabilities(members[1], test_files)).max() > 1e-3


def test_card_records_members_threshold_and_no_adaptation_verdict(made):
    members, dest, _, _ = made
    card = load_card(dest)
    assert card.arch == ENSEMBLE_ARCH and card.temperature == 1.0 and card.adaptation is None
    entries = card.config["ensemble"]["members"]
    assert [e["model_id"] for e in entries] == [load_card(m).model_id for m in members]
    assert [e["temperature"] for e in entries] == list(TEMPERATURES)
    assert [e["test_time_hflip"] for e in entries] == [False, True]
    assert card.threshold is not None and card.threshold_rule.startswith("youden on 60 labelled films")
    assert card.metrics["labelled_films"]["n"] == 60
    from medclf.score.adaptation import verdict_of

    assert verdict_of(card) == "absent"  # score.adapt=auto keeps the training statistics


def test_domain_is_fitted_on_the_members_features_and_the_reference_exists(made):
    members, dest, test_files, _ = made
    card = load_card(dest)
    x = to_model_input(torch.from_numpy(pixels(test_files[:2])))
    widths = []
    for path in members:
        model, member_card = load_artifact(path)
        with torch.inference_mode():
            widths.append(penultimate(model, member_card.arch, x)[1].shape[1])
    assert card.domain is not None and card.domain["feature_dim"] == sum(widths) == 256
    assert card.domain["modalities"] == ["CR", "DX"]  # the first member's, inherited by the CLI
    assert card.reference is not None and card.reference["n"] == 60
    files = read_artifact(dest)
    assert set(files.files) == {card.domain["file"], card.reference["file"]}


def test_the_guard_reads_each_members_features_at_unit_length_and_old_cards_keep_the_raw_join(made):
    """Each member's half of the joined features is a unit vector, so neither member's scale decides
    the guard's distances; a card without `features` (made before) is built joining them raw, as its
    stored guard was fitted."""
    from medclf.model.ensemble import FEATURES_RAW, FEATURES_UNIT_PER_MEMBER, build_ensemble

    members, dest, test_files, _ = made
    x = to_model_input(torch.from_numpy(pixels(test_files[:3])))
    raw = []
    for path in members:
        model, member_card = load_artifact(path)
        with torch.inference_mode():
            raw.append(penultimate(model, member_card.arch, x)[1])
    model, card = load_artifact(dest)
    assert card.config["ensemble"]["features"] == FEATURES_UNIT_PER_MEMBER
    with torch.inference_mode():
        joined = penultimate(model, card.arch, x)[1]
    halves = torch.split(joined, [r.shape[1] for r in raw], dim=1)
    for half, r in zip(halves, raw):
        torch.testing.assert_close(half, r / r.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(r.norm(dim=1), torch.ones(3))  # the members' own are not unit length

    old_config = {**card.config, "ensemble": {k: v for k, v in card.config["ensemble"].items() if k != "features"}}
    old = build_ensemble(dataclasses.replace(card, config=old_config), len(card.classes))
    old.load_state_dict(model.state_dict())
    assert old.eval().features == FEATURES_RAW
    with torch.inference_mode():
        torch.testing.assert_close(penultimate(old, card.arch, x)[1], torch.cat(raw, dim=1), atol=1e-5, rtol=1e-4)


def test_onnx_and_torchscript_exports_give_the_same_probabilities(made):
    ort = pytest.importorskip("onnxruntime")
    from medclf.model.export import ONNX_FILE, TORCHSCRIPT_FILE, export_artifact

    members, dest, test_files, base = made
    out = str(base / "exported")
    doc = export_artifact(dest, out)
    assert doc["arch"] == ENSEMBLE_ARCH
    scored = probabilities(dest, test_files)
    session = ort.InferenceSession(os.path.join(out, ONNX_FILE), providers=["CPUExecutionProvider"])
    batch = pixels(test_files)
    for part in (batch[:1], batch):  # dynamic batch: one image and many through the same file
        _, onnx_probs = session.run(None, {"image": part})
        np.testing.assert_allclose(onnx_probs, scored[:len(part)], atol=1e-4)
    scripted = torch.jit.load(os.path.join(out, TORCHSCRIPT_FILE))
    with torch.inference_mode():
        _, ts_probs = scripted(torch.from_numpy(batch[:5]))
    np.testing.assert_allclose(ts_probs.numpy(), scored[:5], atol=1e-4)


def test_grad_cam_is_the_mean_of_the_members_maps(made):
    members, dest, test_files, _ = made
    x = to_model_input(torch.from_numpy(pixels(test_files[:1])))
    ensemble, card = load_artifact(dest)
    heat, probs, target = grad_cam(ensemble, x, default_layer(card.arch), lambda p: p.argmax(axis=1))
    maps = []
    for path in members:
        model, member_card = load_artifact(path)
        maps.append(grad_cam(model, x, default_layer(member_card.arch), target, member_card.temperature)[0])
    assert heat.shape == (1, 32, 32)
    np.testing.assert_allclose(heat, np.mean(maps, axis=0), atol=1e-5)
    assert np.abs(maps[0] - maps[1]).max() > 1e-3  # the members' maps differ: the mean is not one of them
    np.testing.assert_allclose(probs, probabilities(dest, test_files[:1]), atol=1e-5)


@pytest.mark.parametrize("field", ["preprocess", "classes"])
def test_a_member_with_another_spec_or_other_classes_is_refused_naming_it(made, field, capsys):
    members, _, _, base = made
    odd = str(base / f"odd-{field}")
    if field == "preprocess":
        member(odd, 2, 1.0, image_size=64)
    else:
        member(odd, 2, 1.0, classes=["NORMAL", "PNEUMONIA"])
    out = str(base / f"refused-{field}")
    code = main(["ensemble", "--members", members[0], odd, "--labelled", str(base / "ph" / "train"), "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and f"member {odd}: {field}" in err and not os.path.exists(out)
    if field == "preprocess":
        assert "one preprocessing function" in err


def test_members_with_different_threshold_rules_are_refused_unless_the_rule_is_named(made, capsys):
    """The first member's rule is not silently the ensemble's: differing rules are refused naming both,
    before any film is read; a named rule is applied and recorded."""
    members, _, _, base = made
    odd = member(str(base / "odd-rule"), 3, 1.0, train={"threshold": "target_sensitivity",
                                                         "target_sensitivity": 0.9})
    refused = str(base / "refused-rule")
    code = main(["ensemble", "--members", members[0], odd, "--labelled", str(base / "ph" / "train"),
                 "--out", refused, "--extensions", ".png"])
    err = capsys.readouterr().err
    assert code == 2 and not os.path.exists(refused)
    assert f"{members[0]}: youden" in err and f"{odd}: target_sensitivity 0.9" in err and "--threshold-rule" in err

    named = str(base / "named-rule")
    code = main(["ensemble", "--members", members[0], odd, "--labelled", str(base / "ph" / "train"),
                 "--out", named, "--extensions", ".png", "--threshold-rule", "target_sensitivity",
                 "--target-sensitivity", "0.8"])
    assert code == 0
    card = load_card(named)
    assert card.threshold_rule.startswith("target_sensitivity 0.8 on 60 labelled films")
    assert card.config["train"] == {"threshold": "target_sensitivity", "target_sensitivity": 0.8}
    # the rule did decide: the named target is reached on the labelled films, the members' youden is not asked
    assert card.metrics["labelled_films"]["sensitivity"] >= 0.8


def test_the_model_card_lists_the_members(made):
    members, dest, _, _ = made
    text = model_card.render(load_card(dest))
    assert open(os.path.join(dest, model_card.CARD_MARKDOWN)).read() == text  # written by `medclf ensemble`
    for path in members:
        assert load_card(path).model_id in text
    assert "## Ensemble members" in text
    for section in model_card.REQUIRED_SECTIONS:
        assert section in text


def test_training_config_refuses_ensemble_as_model_arch():
    with pytest.raises(ConfigError):
        load_config(None, ["model.arch=ensemble"])


def test_an_ensemble_card_without_its_members_is_refused(made):
    from medclf.errors import ModelError

    _, dest, _, _ = made
    files = read_artifact(dest)
    files.card = dataclasses.replace(files.card, config={})
    with pytest.raises(ModelError, match="config.ensemble.members"):
        files.network()


def test_label_free_adaptation_is_refused_for_an_ensemble_even_with_the_override(made):
    from medclf.score.adaptation import check_adapt_config

    _, dest, _, _ = made
    card = load_card(dest)
    for overrides in (["score.adapt=bn"], ["score.adapt=bn", "score.adapt_override=true"]):
        with pytest.raises(ConfigError, match="not offered for an ensemble"):
            check_adapt_config(load_config(None, overrides).score, card)
    check_adapt_config(load_config(None, ["score.adapt=auto"]).score, card)  # auto: allowed, never adapts


@pytest.mark.ray
def test_serve_answers_with_the_ensembles_probability(made, ray_cluster):
    from ray import serve

    from medclf.score.serve import run_server
    from tests.score.test_serve import _free_port, _post

    _, dest, test_files, _ = made
    rows = score_table(dest, test_files)
    in_scope = rows.loc[rows["ood_score"] <= load_card(dest).domain["threshold"]].iloc[0]  # not refused by the guard
    serve.shutdown()  # a Serve an earlier test left running would keep its own proxy port
    cfg = load_config(None, [f"serve.port={_free_port()}", "serve.cpus_per_replica=0.5", "serve.max_batch_size=4",
                             "serve.batch_wait_timeout_s=0.05"])
    url = run_server(cfg, dest, blocking=False)
    try:
        status, answer = _post(f"{url}/predict", open(in_scope["path"], "rb").read())
    finally:
        serve.shutdown()
    assert status == 200 and answer["model_id"] == load_card(dest).model_id, answer
    for c in CLASSES:
        assert answer["probabilities"][c] == pytest.approx(float(in_scope[prob_column(c)]), abs=1e-5)


def test_the_explain_actor_writes_the_ensembles_map(made, tmp_path):
    """The Explainer (what `medclf explain` runs in Ray Data actors), called on one decoded batch."""
    from medclf.report.gradcam import ENSEMBLE_LAYER, Explainer

    members, dest, test_files, _ = made
    card = load_card(dest)
    explainer = Explainer(dest, str(tmp_path / "explained"))
    batch = next(iter(load_images({"path": np.array(test_files[:2], object)}, card.preprocess, rows_per_batch=16)))
    rows = explainer(batch)
    assert list(rows["status"]) == ["ok", "ok"] and set(rows["layer"]) == {ENSEMBLE_LAYER}
    ensemble, _ = load_artifact(dest)
    x = to_model_input(torch.from_numpy(pixels(test_files[:2])))
    heat, probs, _ = grad_cam(ensemble, x, ENSEMBLE_LAYER, explainer._targets)
    for j in range(2):
        np.testing.assert_allclose(np.load(rows["heatmap_npy"][j]), heat[j], atol=1e-5)
    explained = [probs[j, card.classes.index(rows["target_class"][j])] for j in range(2)]
    np.testing.assert_allclose(rows["probability"], explained, atol=1e-5)


def test_drift_compares_the_ensembles_rows_with_its_reference(made):
    from medclf.config import DriftConfig
    from medclf.monitor.drift import compare
    from medclf.monitor.opened import open_model

    _, dest, test_files, _ = made
    opened = open_model(dest, network=False)
    table = compare(score_table(dest, test_files), opened.reference, opened.domain, opened.card, DriftConfig())
    assert len(table) and {"statistic", "flag"} <= set(table.columns)
    embedding = table.set_index("statistic").loc["embedding"]  # the members' joint embedding is compared
    assert np.isfinite(embedding["value"])


def test_site_calibration_fits_on_the_ensembles_output(made):
    from medclf.model.site_fit import calibrate_site

    _, dest, _, base = made
    card, cal = calibrate_site(dest, str(base / "ph" / "train"), [".png"])
    assert cal.model_id == card.model_id and cal.fitted_on["k"] == 60 and cal.temperature > 0


@pytest.mark.ray
def test_batch_scoring_with_ray_writes_the_ensembles_probabilities(made, ray_cluster, tmp_path):
    """`medclf score`'s pipeline (Ray Data decode tasks -> Predictor actors -> the sink) on the ensemble."""
    from medclf.data.predictions import read_predictions
    from medclf.score.batch import run_scoring
    from tests.conftest import TINY

    _, dest, test_files, base = made
    cfg = load_config(None, TINY + [f"run.root={tmp_path / 'runs'}", "ood.action=flag"])
    run_scoring(cfg, "ensemble-run", str(base / "ph" / "test"), dest, str(tmp_path / "pred"))
    rows = read_predictions(str(tmp_path / "pred")).set_index("path").loc[test_files]
    assert (rows["status"] == "ok").all() and (rows["model_id"] == load_card(dest).model_id).all()
    cols = [prob_column(c) for c in CLASSES]
    np.testing.assert_allclose(rows[cols].to_numpy(), probabilities(dest, test_files), atol=1e-5)


@pytest.mark.ray
def test_evaluate_drift_and_explain_commands_run_on_an_ensemble(made, ray_cluster, tmp_path):
    """The commands after scoring, end to end on the ensemble: `medclf evaluate` (labels from the class
    folders), `medclf drift` against the ensemble's own reference, `medclf explain` through its Ray Data
    pipeline (member-averaged maps)."""
    import json

    from medclf.cli import run_command
    from medclf.report.gradcam import ENSEMBLE_LAYER
    from medclf.score.batch import run_scoring
    from tests.conftest import TINY

    _, dest, test_files, base = made
    test_folder = str(base / "ph" / "test")
    predictions, runs = str(tmp_path / "pred"), str(tmp_path / "runs")
    cfg = load_config(None, TINY + [f"run.root={runs}", "ood.action=flag"])
    run_scoring(cfg, "night", test_folder, dest, predictions)
    model_id = load_card(dest).model_id

    assert run_command("evaluate", ["--predictions", predictions, "--model", dest, "--output", str(tmp_path / "rep"),
                                    "--run-root", runs, "--set", "evaluate.bootstrap_resamples=0"]) == 0
    summary = json.load(open(tmp_path / "rep" / "summary.json"))
    assert summary["model_ids"] == [model_id] and summary["n_evaluated"] == len(test_files)

    code = run_command("drift", ["--model", dest, "--predictions", predictions, "--scoring-run", "night",
                                 "--output", str(tmp_path / "drift"), "--run-root", runs])
    assert code in (0, 4) and (tmp_path / "drift" / "drift.parquet").exists()  # 4: something flagged

    assert run_command("explain", ["--model", dest, "--input", test_folder, "--output", str(tmp_path / "cam"),
                                   "--extensions", ".png", "--run-root", runs,
                                   "--set", "explain.cpus_per_actor=0.5"]) == 0
    index = pd.read_parquet(tmp_path / "cam" / "explanations.parquet")
    # Files the ensemble's guard refuses at decode time get no map (its pixel statistics, fitted on 60
    # phantoms, refuse a few of these); every other file is explained at the members' layers.
    ok = index[index["status"] == "ok"]
    assert len(index) == len(test_files) and set(index["status"]) <= {"ok", "out_of_scope"}
    assert len(ok) >= len(test_files) // 2, index[["status", "error"]]
    assert set(ok["layer"]) == {ENSEMBLE_LAYER} and set(index["model_id"]) == {model_id}
    assert ok["heatmap_npy"].map(os.path.exists).all()
