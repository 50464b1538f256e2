"""The out-of-scope guard (medclf.monitor.ood): a model trained on phantoms records its domain; scoring
marks a CT slice, a 1x1 PNG and noise as out_of_scope; the artifact's domain file is checked."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from sklearn.metrics import roc_auc_score

from medclf.config import load_config
from medclf.imaging.stage import load_images
from medclf.model.artifact import CARD_FILE, ModelError, load_artifact
from medclf.model.networks import build_model, penultimate
from medclf.monitor.ood import DOMAIN_FILE
from medclf.monitor.opened import open_model
from medclf.imaging.scope import reason_kind
from medclf.score.batch import Predictor
from tests.conftest import TINY

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def guarded(trained_model, tmp_path_factory):
    """The shared 1-epoch phantom model with a domain record for chest-film modalities, fitted on its
    own validation images (the function training calls, via `add_domain`: no second training;
    tests/train/test_training.py checks that training writes the record itself)."""
    from medclf.monitor.ood import add_domain

    run_dir = os.path.dirname(trained_model.model_path)
    val = pd.read_parquet(os.path.join(run_dir, "splits.parquet")).query("split == 'val'")
    cfg = load_config(None, TINY + ["ood.enabled=true", "ood.quantile=0.95", "data.modalities=[cr, DX]",
                                    "data.views=[PA, AP]"])
    dest = str(tmp_path_factory.mktemp("guarded") / "model")
    add_domain(trained_model.model_path, dest, cfg, list(val.path), list(val.label))
    assert load_artifact(dest)[1].model_id == trained_model.card.model_id  # same weights, same model
    return dest


def score_rows(model_path, paths, ood_action="out_of_scope"):
    """The decode stage and the model stage as plain functions (no Ray), as scoring runs them."""
    from medclf.model.artifact import load_card
    from medclf.model.records import input_gate

    card = load_card(model_path)
    predictor = Predictor(model_path, "run", threads=1, ood_action=ood_action)
    batches = load_images({"path": np.array(paths, object)}, card.preprocess, rows_per_batch=8,
                          gate=input_gate(card, ood_action))
    return pa.concat_tables([predictor(b) for b in batches]).to_pandas().set_index("path")


def noise_images(folder, n=24, size=32, seed=0):
    """Phantom-sized images that are nothing like a phantom: uniform, gaussian, constant, stripes."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    kinds = [lambda: rng.uniform(0, 255, (size, size)),
             lambda: np.clip(rng.normal(128, 60, (size, size)), 0, 255),
             lambda: np.full((size, size), rng.uniform(0, 255)),
             lambda: np.tile((np.arange(size) // rng.integers(1, 5) % 2) * 255.0, (size, 1))]
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"noise{i}.png")
        Image.fromarray(kinds[i % len(kinds)]().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_training_records_the_domain_and_the_threshold_is_the_validation_quantile(guarded):
    opened = open_model(guarded, network=False)  # the artifact read once: card, domain, reference
    card, domain = opened.card, opened.domain
    record = domain.record
    assert card.files[DOMAIN_FILE] and os.path.exists(os.path.join(guarded, DOMAIN_FILE))
    assert record.modalities == ["CR", "DX"] and record.formats_seen == ["png"]
    assert record.photometric_seen == ["MONOCHROME2"] and record.smallest_side_seen == 32 and record.min_size == 16
    assert record.score == "knn" and record.k == 10 and record.feature_dim == 128  # the small CNN's last width
    bank = domain.arrays["bank"]  # the validation features, unit length
    assert bank.shape == (record.n_fit, 128) and np.allclose(np.linalg.norm(bank, axis=1), 1, atol=1e-5)
    val = domain.arrays["validation_scores"]
    assert len(val) == record.n_fit >= 4 and record.quantile == 0.95
    assert record.threshold == pytest.approx(np.quantile(val, 0.95))
    assert record.validation_flag_rate == pytest.approx((val > record.threshold).mean())


def test_ct_slice_small_png_and_noise_are_out_of_scope(guarded, phantom_root, tmp_path):
    ct = get_testdata_file("CT_small.dcm")
    tiny = str(tmp_path / "tiny.png")
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(tiny)
    held_out = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(phantom_root, "test"))
                      for f in fs if f.endswith(".png"))
    dicom_phantoms = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(phantom_root, "test"))
                            for f in fs if f.endswith(".dcm"))[:4]  # modality DX: passes the modality check
    noise = noise_images(str(tmp_path / "noise"))
    rows = score_rows(guarded, [ct, tiny, *held_out, *dicom_phantoms, *noise])

    for path, kind, says in ((ct, "modality", "DICOM modality CT is not one this model is for (CR, DX)"),
                             (tiny, "too_small", "image too small: 1x1 px, the model's domain starts at 16 px a side")):
        row = rows.loc[path]
        assert row.status == "out_of_scope" and row.error == f"{path}: {says}" and reason_kind(row.error) == kind
        assert pd.isna(row.predicted_label) and np.isnan(row.ood_score) and np.isnan(row.prob_POSITIVE)
    assert rows.loc[dicom_phantoms, "ood_score"].notna().all()
    # ood.action=flag (refusal off): every noise image is scored, with its ood_score, and the answers stand
    flag_rows = score_rows(guarded, held_out + noise, "flag")
    assert (flag_rows.loc[noise, "status"] == "ok").all() and flag_rows.loc[noise, "predicted_label"].notna().all()
    auroc = roc_auc_score([0] * len(held_out) + [1] * len(noise), flag_rows.loc[held_out + noise, "ood_score"])
    print(f"noise vs held-out phantoms: AUROC {auroc:.3f}")
    assert auroc >= 0.9, auroc
    # ood.action=out_of_scope (the default): uniform and gaussian noise fail the content checks, constant
    # images too (no forward pass: no score, no probabilities); the stripes are left to the feature score.
    refused = rows.loc[noise][rows.loc[noise].status == "out_of_scope"]
    assert len(refused) >= 3 * len(noise) // 4, rows.loc[noise, ["status", "ood_score", "error"]]
    kinds = refused.error.map(reason_kind)
    for i, path in enumerate(noise):
        if i % 4 in (0, 1, 2):
            assert kinds[path] == ("constant" if i % 4 == 2 else "noise"), rows.loc[path, "error"]
            assert np.isnan(rows.loc[path, "ood_score"]) and np.isnan(rows.loc[path, "prob_POSITIVE"])
    assert set(kinds) <= {"noise", "constant", "ood_score", "appearance"}
    by_score = refused[kinds == "ood_score"]
    # feature-space out of scope: probabilities kept for audit, no label, the score and the reason
    assert by_score.prob_POSITIVE.notna().all() and by_score.error.str.contains("above the threshold").all()
    assert refused.predicted_label.isna().all()
    # the same score either way (up to float32 batch-composition noise: the two runs batch different rows;
    # kNN distances near 0 amplify it, hence an absolute tolerance too)
    np.testing.assert_allclose(flag_rows.loc[by_score.index, "ood_score"], by_score.ood_score, rtol=1e-4, atol=1e-4)
    ok = rows[rows.status == "ok"]
    assert ok.predicted_label.notna().all() and ok.error.isna().all()
    assert (rows.loc[held_out, "status"] == "ok").mean() >= 0.75  # in-domain mostly passes (quantile 0.95)


def test_tampered_or_missing_domain_file_is_refused(guarded, tmp_path):
    altered = str(tmp_path / "altered")
    shutil.copytree(guarded, altered)
    with open(os.path.join(altered, DOMAIN_FILE), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ModelError, match=r"altered/domain.npz: its sha256 is not the one model.json records"):
        load_artifact(altered)
    os.remove(os.path.join(altered, DOMAIN_FILE))
    with pytest.raises(ModelError, match=r"domain.npz: file not found; model.json lists it"):
        Predictor(altered, "run", threads=1)


def test_artifact_without_a_domain_still_scores(guarded, tmp_path):
    old = str(tmp_path / "old")
    shutil.copytree(guarded, old)
    os.remove(os.path.join(old, DOMAIN_FILE))
    card = json.load(open(os.path.join(old, CARD_FILE)))
    del card["domain"], card["files"], card["reference"]  # a card written before the guard existed
    json.dump(card, open(os.path.join(old, CARD_FILE), "w"))
    ct = get_testdata_file("CT_small.dcm")
    rows = score_rows(old, [ct])
    assert rows.loc[ct, "status"] == "ok" and np.isnan(rows.loc[ct, "ood_score"])


def test_scoring_and_evaluation_count_out_of_scope(ray_cluster, guarded, phantom_root, tmp_path, caplog):
    from medclf.report.evaluate import run_evaluation
    from medclf.data.predictions import read_predictions
    from medclf.score.batch import run_scoring

    src = tmp_path / "archive"
    normal = src / "NORMAL"
    normal.mkdir(parents=True)
    for f in sorted(os.listdir(os.path.join(phantom_root, "test", "NORMAL")))[:6]:
        shutil.copy(os.path.join(phantom_root, "test", "NORMAL", f), normal / f)
    shutil.copy(get_testdata_file("CT_small.dcm"), normal / "ct.dcm")
    Image.fromarray(np.zeros((2, 3), np.uint8)).save(normal / "tiny.png")
    # What a new user tried (issue 33): blank, grey, noise and a lateral film; refused by the default config.
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(normal / "blank.png")
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(normal / "grey.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(normal / "noise.png")
    phantom_dcm = next(f for f in sorted(os.listdir(os.path.join(phantom_root, "test", "NORMAL"))) if f.endswith(".dcm"))
    ds = pydicom.dcmread(os.path.join(phantom_root, "test", "NORMAL", phantom_dcm))
    ds.ViewPosition = "LL"
    ds.save_as(normal / "lateral.dcm")
    cfg = load_config(None, TINY + ["score.extensions=[.png, .dcm]"])
    assert cfg.ood.action == "out_of_scope"  # the default
    out = str(tmp_path / "pred")
    summary = run_scoring(cfg, "oos", str(src), guarded, out)
    pred = read_predictions(out).set_index("path")
    expected = {"ct.dcm": "modality", "tiny.png": "too_small", "blank.png": "all_zero", "grey.png": "constant",
                "noise.png": "noise", "lateral.dcm": "view"}
    for name, kind in expected.items():
        row = pred.loc[str(normal / name)]
        assert row.status == "out_of_scope" and reason_kind(row.error) == kind and pd.isna(row.predicted_label), name
    n_oos = int((pred.status == "out_of_scope").sum())
    assert summary.out_of_scope == n_oos >= len(expected) and summary.seen == len(pred) == summary.scored + n_oos
    kinds = pred.loc[pred.status == "out_of_scope", "error"].map(reason_kind).value_counts().to_dict()
    assert summary.out_of_scope_reasons == kinds and all(summary.out_of_scope_reasons[k] >= 1 for k in expected.values())
    assert f"out of scope {n_oos} (" in str(summary) and "view 1" in str(summary), str(summary)
    assert pred.loc[pred.status == "ok", "ood_score"].notna().all()

    report = run_evaluation(out, str(tmp_path / "report"), ["NORMAL", "POSITIVE"], "POSITIVE",
                            bootstrap_resamples=0)
    assert report.out_of_scope["n"] == n_oos and report.n_failed == 0 and report.n_evaluated == len(pred) - n_oos
    assert report.out_of_scope["rate"] == pytest.approx(n_oos / len(pred))
    assert report.out_of_scope["reasons"]["modality"] == 1 and report.out_of_scope["reasons"]["too_small"] == 1
    assert all(report.out_of_scope["reasons"][k] == kinds[k] for k in kinds)
    summary_json = json.load(open(tmp_path / "report" / "summary.json"))
    assert summary_json["out_of_scope"]["n"] == n_oos
    # coverage beside accuracy: the refused rows lower coverage, the accuracy is that of the answered
    selective = summary_json["selective"]
    assert selective["coverage"] == pytest.approx(report.n_evaluated / (report.n_evaluated + n_oos))
    assert selective["abstention_rate"] == pytest.approx(n_oos / (report.n_evaluated + n_oos))
    assert (tmp_path / "report" / "risk_coverage.png").stat().st_size > 1000
    assert "Coverage" in (tmp_path / "report" / "summary.html").read_text()
    assert pd.read_parquet(tmp_path / "report" / "metrics.parquet")["n_out_of_scope"].iloc[0] == n_oos


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "efficientnet_lite0", "mobilenet_v3_small",
                                  "efficientnet_b0"])
def test_penultimate_features_come_from_the_same_forward_pass(arch):
    torch.manual_seed(0)
    model = build_model(arch, 3, dropout=0.2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        logits, features = penultimate(model, arch, x)
        expected = model(x)
    assert torch.allclose(logits, expected, atol=1e-5) and features.shape[0] == 2 and features.ndim == 2
    head = model.fc if arch.startswith("resnet") else model._fc if arch == "efficientnet_lite0" else model.classifier
    with torch.inference_mode():
        assert torch.allclose(head(features), logits, atol=1e-5)


def test_embedding_from_batches_in_any_order_matches_the_whole_array():
    """The finish step embeds validation streamed from the cache in whatever order Ray Data yields
    it; rows must land where they belong, and a missing row must fail, not leave garbage."""
    from medclf.monitor.ood import embed, features_and_logits

    torch.manual_seed(0)
    model = build_model("small_cnn", 2).eval()
    x = np.random.default_rng(0).normal(size=(37, 1, 32, 32)).astype(np.float32)
    order = np.random.default_rng(1).permutation(37)
    batches = [(order[i:i + 8], x[order[i:i + 8]]) for i in range(0, 37, 8)]
    embedding = embed(model, "small_cnn", iter(batches), 37)
    features, logits = features_and_logits(model, "small_cnn", x)
    np.testing.assert_allclose(embedding.features, features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embedding.logits, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embedding.input_sds, x.std(axis=(1, 2, 3)), rtol=1e-5)
    with pytest.raises(ModelError, match="5 of 37 images"):
        embed(model, "small_cnn", iter(batches[:-1]), 37)


def test_gather_rows_returns_the_selected_images_in_row_order():
    from medclf.train.finish import gather_rows

    x = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((10, 1, 2, 2), np.float32)
    rows = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 1], bool)
    order = np.array([9, 3, 0, 5, 2, 8, 1, 7, 6, 4])
    out = gather_rows(((order[i:i + 3], x[order[i:i + 3]]) for i in range(0, 10, 3)), rows)
    assert out[:, 0, 0, 0].tolist() == [0, 2, 3, 6, 9]


def test_old_predictions_without_ood_score_still_read(tmp_path):
    from medclf.data.predictions import prediction_schema, read_predictions

    schema = prediction_schema(["NORMAL", "POSITIVE"])
    old = pa.schema([f for f in schema if f.name != "ood_score"])
    folder = tmp_path / "pred" / "run_date=2026-01-01"
    folder.mkdir(parents=True)
    table = pa.table({f.name: pa.array([None], f.type) for f in old}, schema=old)
    import pyarrow.parquet as pq

    pq.write_table(table, folder / "part-old.parquet")
    rows = read_predictions(str(tmp_path / "pred"))
    assert "ood_score" in rows.columns and rows.ood_score.isna().all()


def test_knn_score_is_the_distance_to_the_kth_nearest_reference_and_folds_keep_patients_together():
    from medclf.monitor.ood import fold_of, knn_distance, out_of_fold_scores, unit_bank

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 8))
    query = rng.normal(size=(7, 8))
    exact = np.sort(np.linalg.norm(unit_bank(query).astype(np.float64)[:, None] - unit_bank(ref).astype(np.float64)[None],
                                   axis=2), axis=1)[:, 2]  # third nearest
    np.testing.assert_allclose(knn_distance(unit_bank(ref), query, 3), exact, atol=2e-3)
    assert knn_distance(unit_bank(ref), ref[:5], 1) == pytest.approx(0, abs=2e-3)  # a bank row is its own nearest
    # Folds by patient: never a patient in two folds; so a patient's twin films cannot vouch for each other.
    groups = [f"p{i // 2}" for i in range(40)]
    fold = fold_of(40, groups, 10, seed=0)
    assert all(fold[i] == fold[i + 1] for i in range(0, 40, 2)) and len(set(fold)) == 10
    twins = np.repeat(rng.normal(size=(20, 8)), 2, axis=0)  # every patient has two identical films
    labels, logits = np.zeros(40, int), np.zeros((40, 2))
    by_image = out_of_fold_scores("knn", twins, logits, labels, k=1)
    by_patient = out_of_fold_scores("knn", twins, logits, labels, groups=groups, k=1)
    assert by_image.min() == pytest.approx(0, abs=2e-3)  # some twin was in another fold: distance 0
    assert by_patient.min() > 0.05  # the threshold then comes from other patients' films, as at a new site


def test_images_unlike_the_validation_images_pixel_statistics_are_refused_before_the_model(trained_model, tmp_path):
    """medclf.imaging.appearance: a phantom model's features may take a CT slice for a phantom; its pixel
    statistics do not. Refused at decode time (no probabilities), held-out phantoms scored, `flag` scores all.
    The record is fitted on 160 phantoms (add_domain): the shared model's 16 validation images are too few."""
    from medclf.data.phantoms import PATIENT_REGEX, generate, render_ct_like
    from medclf.imaging.appearance import STAT_NAMES
    from medclf.monitor.ood import add_domain

    fit = generate(str(tmp_path / "fit"), n_train=160, n_test=0, image_size=32, formats=("png",), seed=7)
    cfg = load_config(None, TINY + ["ood.enabled=true", f"data.patient_regex={PATIENT_REGEX}"])
    guarded = str(tmp_path / "model")
    add_domain(trained_model.model_path, guarded, cfg, [str(tmp_path / "fit" / p) for p in fit.path], list(fit.label))
    record = open_model(guarded, network=False).domain.record
    looks = record.appearance
    assert looks and len(looks["mean"]) == len(STAT_NAMES) and looks["quantile"] == 0.995
    assert looks["validation_flag_rate"] <= 0.02 and looks["n_fit"] == 160
    rng = np.random.default_rng(5)
    ct = []
    for i in range(12):
        path = str(tmp_path / f"ct{i}.png")
        Image.fromarray((render_ct_like(rng, 32) * 255).astype(np.uint8)).save(path)
        ct.append(path)
    new = generate(str(tmp_path / "new"), n_train=60, n_test=0, image_size=32, formats=("png",), seed=8)
    held_out = [str(tmp_path / "new" / p) for p in new.path]
    rows = score_rows(guarded, ct + held_out)
    kinds = rows.loc[ct, "error"].fillna("").map(reason_kind)
    # Every slice refused; at 32 px the pixel statistics catch a third of them (4 of 12 measured) before the
    # model, kNN the rest after it. Real films against the 64 px demo model: 200 of 200 (docs/ood.md).
    assert (rows.loc[ct, "status"] == "out_of_scope").all() and (kinds == "appearance").sum() >= 3, kinds
    by_looks = rows.loc[ct][kinds == "appearance"]
    assert by_looks.error.str.contains("image statistics unlike the training images").all()
    assert by_looks.prob_POSITIVE.isna().all() and by_looks.ood_score.isna().all()  # before the model
    refused = rows.loc[held_out][rows.loc[held_out].error.fillna("").map(reason_kind) == "appearance"]
    assert len(refused) <= 3, refused.error.tolist()  # new phantoms look like validation: scored
    flag = score_rows(guarded, ct, "flag")  # refusal off: no pixel-statistics check, every image answered
    assert (flag.status == "ok").all()


def test_pixel_statistics_tell_photographs_from_phantoms():
    """The check's own function, no model: a reference of 200 phantoms at 64 px refuses Pillow scenes."""
    from PIL import ImageDraw

    from medclf.data.phantoms import render
    from medclf.imaging.appearance import appearance_reason, appearance_stats, fit_appearance
    from medclf.imaging.preprocess import preprocess_gray

    spec = load_config(None, TINY + ["preprocess.image_size=64"]).preprocess
    rng = np.random.default_rng(0)
    phantoms = [preprocess_gray(render(rng, rng, 64, i % 2 == 0).image, spec) for i in range(260)]
    groups = [f"p{i // 2}" for i in range(200)]
    reference = fit_appearance(np.array([appearance_stats(x) for x in phantoms[:200]]), groups, 0.995)
    assert sum(appearance_reason(x, reference) is not None for x in phantoms[200:]) <= 2  # new phantoms pass
    photos = []
    for i in range(20):
        img = Image.new("RGB", (96, 80), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, 60)), int(rng.integers(0, 50))
            draw.rectangle([x0, y0, x0 + 30, y0 + 20], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        photos.append(preprocess_gray(np.asarray(img.convert("L"), np.float32) / 255, spec))
    reasons = [appearance_reason(x, reference) for x in photos]
    assert all(r and r.startswith("image statistics unlike the training images") for r in reasons), reasons
