"""Refusal by default (issue 33): content checks, DICOM header rules, and the decode stage, the model
stage and the online endpoint's request handler turning blank, grey, noise and lateral inputs into
`out_of_scope` rows with their reasons. No Ray here: the domain record is fitted on phantoms
(`add_domain`, the function training calls) for an untrained small CNN; scoring through Ray is in
tests/monitor/test_ood.py."""

import asyncio
import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medclf.config import ServeConfig, load_config
from medclf.data.phantoms import generate, render
from medclf.imaging.decode import open_images
from medclf.imaging.stage import load_images
from medclf.model.artifact import ModelCard, load_card, save_artifact
from medclf.model.networks import build_model
from medclf.imaging.content import content_reason, measures
from medclf.imaging.header import header_reason
from medclf.monitor.ood import add_domain
from medclf.model.records import input_gate
from medclf.imaging.scope import reason_kind
from medclf.score.batch import Predictor
from tests.conftest import TINY

pytestmark = pytest.mark.timeout(300)
REAL_DICOM = ["RG1_UNCR.dcm", "CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm", "693_UNCR.dcm", "JPEG2000.dcm"]


# ---------------------------------------------------------------- content checks (pure numpy)


def test_blank_grey_saturated_and_noise_get_their_reasons():
    rng = np.random.default_rng(0)
    assert content_reason(np.zeros((300, 200), np.float32)).startswith("all pixels are zero")
    for constant in (np.full((512, 512), 0.5, np.float32), np.ones((64, 64), np.float32),
                     np.clip(0.3 + rng.normal(0, 0.004, (400, 400)), 0, 1)):
        assert content_reason(constant).startswith("near-constant image"), measures(constant)
    for noise in (rng.uniform(0, 1, (224, 224)), np.clip(rng.normal(0.5, 0.2, (1000, 800)), 0, 1),
                  rng.uniform(0, 1, (32, 32))):
        assert content_reason(noise.astype(np.float32)).startswith("no image structure"), measures(noise)


def test_phantoms_and_real_dicom_pass_the_content_checks():
    for k in range(20):
        for size in (32, 224):
            image = render(np.random.default_rng(k), np.random.default_rng(100 + k), size, positive=k % 2 == 1).image
            assert content_reason(image) is None, (k, size, measures(image))
    for name in REAL_DICOM:
        path = get_testdata_file(name)
        images = open_images(open(path, "rb").read(), path, "middle")
        image = images.image(images.frames[0]).image
        assert content_reason(image) is None, (name, measures(image))


# ---------------------------------------------------------------- header rules


CHEST = {"views": ["PA", "AP"], "body_parts": ["CHEST"], "lateralities": [], "allow_missing": True}


def test_header_rules_refuse_lateral_and_other_body_parts_and_say_why():
    dicom = {"format": "dicom"}
    assert header_reason({**dicom, "view_position": "PA", "body_part": "CHEST"}, CHEST) is None
    assert header_reason({**dicom, "view_position": "LL", "body_part": "CHEST"}, CHEST) == (
        "DICOM view lateral (ViewPosition) is not one this model is for (PA, AP)")
    assert header_reason({**dicom, "patient_orientation": "P\\F"}, CHEST).startswith(
        "DICOM view lateral (PatientOrientation)")
    assert header_reason({**dicom, "patient_orientation": "L\\F"}, CHEST) is None  # frontal, PA or AP
    assert header_reason({**dicom, "view_position": "AP", "body_part": "KNEE"}, CHEST) == (
        "DICOM body part KNEE is not one this model is for (CHEST)")
    # Missing tags: the policy decides, and says which tag.
    assert header_reason(dict(dicom), CHEST) is None
    strict = {**CHEST, "allow_missing": False}
    assert header_reason(dict(dicom), strict) == (
        "DICOM header lacks ViewPosition/PatientOrientation (data.allow_missing is false)")
    assert header_reason({**dicom, "view_position": "PA"}, strict) == (
        "DICOM header lacks BodyPartExamined (data.allow_missing is false)")
    # JPEG/PNG carry no header to judge.
    assert header_reason({"format": "png"}, strict) is None
    # A value that is not a short code is not echoed (it could be free text).
    assert "a non-standard value" in header_reason({**dicom, "view_position": "Mr. Smith's"}, CHEST)


def test_decoder_exposes_the_header_fields():
    path = get_testdata_file("RG1_UNCR.dcm")  # a real chest CR, PA
    meta = open_images(open(path, "rb").read(), path, "middle").meta
    assert (meta["view_position"], meta["patient_orientation"], meta["body_part"]) == ("PA", "L\\F", "CHEST")


def test_config_declares_views_and_refusal_is_the_default():
    cfg = load_config(None, ["data.views=[pa, ap]", "data.body_parts=[chest]"])
    assert cfg.data.views == ["PA", "AP"] and cfg.data.body_parts == ["CHEST"] and cfg.data.allow_missing
    assert cfg.ood.action == "out_of_scope"
    shipped = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "pneumonia_xray.yaml"), [])
    assert shipped.data.views == ["PA", "AP"] and shipped.data.body_parts == ["CHEST"]


# ---------------------------------------------------------------- through the decode and model stages


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """An untrained small CNN with a domain record for frontal chest DX/CR films, fitted on 60 phantoms."""
    base = tmp_path_factory.mktemp("abstain")
    manifest = generate(str(base / "ph"), n_train=60, n_test=12, image_size=32, formats=("png", "dcm"), seed=3)
    manifest["path"] = [str(base / "ph" / p) for p in manifest.path]
    fit = manifest[(manifest.split == "train") & manifest.path.str.endswith(".png")]
    raw = str(base / "raw")
    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], preprocess={"image_size": 32},
                     positive_class="POSITIVE")
    import torch

    torch.manual_seed(0)
    save_artifact(build_model("small_cnn", 2).eval(), card, raw)
    cfg = load_config(None, TINY + ["ood.enabled=true", "ood.quantile=0.99", "data.modalities=[CR, DX]",
                                    "data.views=[PA, AP]", "data.body_parts=[CHEST]"])
    dest = str(base / "model")
    add_domain(raw, dest, cfg, list(fit.path), list(fit.label))
    return dest, manifest, base


def probes(base, manifest):
    """Files a user might send: blank, grey, noise PNGs, a lateral and a knee DICOM, a normal phantom."""
    d = base / "probes"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(d / "blank.png")
    Image.fromarray(np.full((256, 256), 128, np.uint8)).save(d / "grey.png")
    Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(d / "noise.png")
    phantom_dcm = manifest[(manifest.split == "test") & manifest.path.str.endswith(".dcm")].path.iloc[0]
    for name, keyword, value in (("lateral.dcm", "ViewPosition", "LL"), ("knee.dcm", "BodyPartExamined", "KNEE")):
        ds = pydicom.dcmread(phantom_dcm)
        setattr(ds, keyword, value)
        ds.save_as(d / name)
    real = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))  # the real chest CR, relabelled lateral
    real.ViewPosition = "RL"
    real.save_as(d / "real_lateral.dcm")
    normal = manifest[(manifest.split == "train") & manifest.path.str.endswith(".png")
                      & (manifest.label == "NORMAL")].path.iloc[0]  # a film the record was fitted on
    shutil.copy(normal, d / "normal_phantom.png")
    return {name: str(d / name) for name in ("blank.png", "grey.png", "noise.png", "lateral.dcm", "knee.dcm",
                                               "real_lateral.dcm", "normal_phantom.png")}


EXPECTED = {"blank.png": ("all_zero", "all pixels are zero"), "grey.png": ("constant", "near-constant image"),
            "noise.png": ("noise", "no image structure"),
            "lateral.dcm": ("view", "DICOM view lateral (ViewPosition) is not one this model is for (PA, AP)"),
            "real_lateral.dcm": ("view", "DICOM view lateral (ViewPosition)"),
            "knee.dcm": ("body_part", "DICOM body part KNEE is not one this model is for (CHEST)")}


def score_rows(model_path, paths, action):
    card = load_card(model_path)
    predictor = Predictor(model_path, "run", threads=1, ood_action=action)
    batches = load_images({"path": np.array(paths, object)}, card.preprocess, rows_per_batch=4,
                          gate=input_gate(card, action))
    return pa.concat_tables([predictor(b) for b in batches]).to_pandas().set_index("path")


def test_blank_grey_noise_and_lateral_are_out_of_scope_with_reasons_and_flag_restores_scoring(guarded):
    model, manifest, base = guarded
    files = probes(base, manifest)
    rows = score_rows(model, list(files.values()), "out_of_scope")
    for name, (kind, says) in EXPECTED.items():
        row = rows.loc[files[name]]
        assert row.status == "out_of_scope" and row.error.startswith(f"{files[name]}: {says}"), (name, row.error)
        assert reason_kind(row.error) == kind and pd.isna(row.predicted_label), name
    normal = rows.loc[files["normal_phantom.png"]]
    assert normal.status == "ok" and normal.predicted_label in ("NORMAL", "POSITIVE") and pd.isna(normal.error)

    # ood.action=flag: the behaviour before refusal was the default: every probe is scored with a label
    # (the ood_score is still written for review).
    flag = score_rows(model, list(files.values()), "flag")
    assert (flag.status == "ok").all() and flag.predicted_label.notna().all() and flag.error.isna().all()
    assert flag.ood_score.notna().all()


def test_serve_answers_422_with_the_reason_and_refuses_explain(guarded, monkeypatch):
    """The endpoint's request handler (the class Ray Serve deploys, without Serve's batcher, which needs a
    running replica), called with HTTP requests' ASGI scopes: 422 and the reason for refused inputs, no
    Grad-CAM for them; 200 for the phantom. tests/monitor/test_ood.py runs refusal through real Ray scoring."""
    from starlette.requests import Request

    from medclf.score.serve import Classifier

    model, manifest, base = guarded
    files = probes(base, manifest)
    monkeypatch.setenv("MEDCLF_SERVE_TOKEN", "abstain-test-token")  # every route but the liveness probe needs it

    async def post(app, body: bytes, query: str = ""):
        sent = {"done": False}

        async def receive():
            if sent["done"]:
                return {"type": "http.disconnect"}
            sent["done"] = True
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": query.encode(),
                 "headers": [(b"content-length", str(len(body)).encode()),
                             (b"authorization", b"Bearer abstain-test-token")]}
        response = await app(Request(scope, receive))
        return response.status_code, json.loads(response.body)

    async def run(action):
        app = Classifier(model, ServeConfig().model_dump(), action)
        batched = Classifier.predict_rows.__wrapped__  # Serve's batcher needs a replica: one row per call here

        async def one_row(row):
            return (await batched(app, [row]))[0]

        app.predict_rows = one_row
        out = {}
        for name, path in files.items():
            out[name] = await post(app, open(path, "rb").read(), "explain=1")
        return out

    answers = asyncio.run(run("out_of_scope"))
    for name, (kind, says) in EXPECTED.items():
        status, body = answers[name]
        assert status == 422 and body["status"] == "out_of_scope" and body["error"].startswith("upload: ")
        assert says in body["error"] and reason_kind(body["error"]) == kind, (name, body["error"])
        assert body["gradcam_png"] is None and body["explain"].startswith("refused") and body["label"] is None
    status, body = answers["normal_phantom.png"]
    assert status == 200 and body["status"] == "ok" and body["gradcam_png"]
    flagged = asyncio.run(run("flag"))
    assert all(status == 200 for status, _ in flagged.values())


def test_risk_coverage_counts_refusals_as_lost_coverage_not_as_errors():
    from medclf.report.selective import risk_coverage, risk_coverage_plot, selective_summary

    correct = np.array([True, True, False, True])
    confidence = np.array([0.9, 0.8, 0.99, 0.6])
    curve = risk_coverage(correct, confidence, n_refused=4)
    # most confident first: the wrong 0.99 answer, then three right ones; 8 labelled rows in all
    assert curve["coverage"].tolist() == [1 / 8, 2 / 8, 3 / 8, 4 / 8]
    assert curve["risk"].tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    summary = selective_summary(curve, n_scored=4, n_refused=4)
    assert summary["coverage"] == 0.5 and summary["abstention_rate"] == 0.5
    assert summary["accuracy_on_scored"] == 0.75 and summary["aurc"] > 0
    assert risk_coverage_plot(curve, summary)[:8] == b"\x89PNG\r\n\x1a\n"
