"""Ray Train and Ray Data on a real local Ray cluster (2 CPUs), tiny phantom data."""

import os

import numpy as np
import pandas as pd
import pytest
import torch

from medclf.config import load_config
from medclf.imaging.manifest import DatasetError
from medclf.imaging.decode import decode
from medclf.report.evaluate import run_evaluation
from medclf.model.artifact import load_artifact
from medclf.model.networks import class_probabilities
from medclf.data.predictions import prob_column, read_predictions
from medclf.imaging.preprocess import preprocess
from medclf.score.batch import run_scoring
from tests.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_one_epoch_of_ray_train_writes_a_usable_artifact(trained_model):
    h = trained_model.history
    assert list(h.epoch) == [1] and np.isfinite(h.val_loss).all() and (h.images_per_s > 0).all()
    card = trained_model.card
    assert card.classes == ["NORMAL", "POSITIVE"] and card.positive_class == "POSITIVE"
    assert 0.0 <= card.threshold <= 1.0 and card.threshold_rule == "youden on clean patient validation, calibrated"
    run_dir = os.path.dirname(trained_model.model_path)
    for name in ("history.parquet", "curves.png", "splits.parquet", "model/weights.pt", "model/model.json",
                 "validation_report/metrics.parquet", "validation_report/summary.html", "validation_report/roc.png"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    splits = pd.read_parquet(os.path.join(run_dir, "splits.parquet"))
    assert not set(splits[splits.split == "train"].patient_id) & set(splits[splits.split == "val"].patient_id)
    model, _ = load_artifact(trained_model.model_path)
    assert sum(p.numel() for p in model.parameters()) > 0


def plain_loop(paths, model_path):
    model, card = load_artifact(model_path)
    out = {}
    for p in paths:
        x = preprocess(decode(open(p, "rb").read(), p).image, card.preprocess_spec)
        with torch.no_grad():
            out[p] = class_probabilities(model(torch.from_numpy(x)[None]), card.temperature)[0].numpy()  # calibrated
    return out, card


def test_ray_data_scoring_equals_plain_loop(ray_cluster, trained_model, phantom_root, tmp_path):
    cfg = load_config(None, TINY)
    src = os.path.join(phantom_root, "test")
    out = str(tmp_path / "pred")
    summary = run_scoring(cfg, "run-x", src, trained_model.model_path, out)
    pred = read_predictions(out)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)
    assert summary.seen == len(files) == len(pred) and summary.failed == 0
    assert sorted(pred.path) == files  # one row per input, PNG and DICOM alike
    expected, card = plain_loop(files, trained_model.model_path)
    cols = [prob_column(c) for c in card.classes]
    for row in pred.itertuples(index=False):
        np.testing.assert_allclose([getattr(row, c) for c in cols], expected[row.path], atol=1e-5)
        p_pos = expected[row.path][1]
        assert row.predicted_label == ("POSITIVE" if p_pos >= card.threshold else "NORMAL")
    assert (pred.model_id == card.model_id).all() and (pred.run_id == "run-x").all()
    assert pred.checksum.str.len().eq(64).all() and pred.error.isna().all() and (pred.status == "ok").all()
    dicom = pred[pred.format == "dicom"]
    assert len(dicom) == len(pred) / 2 and dicom.study_instance_uid.notna().all() and (dicom.modality == "DX").all()

    report = run_evaluation(out, str(tmp_path / "report"), card.classes, card.positive_class,
                            os.path.join(phantom_root, "manifest.parquet"), allow_unscored=True)  # test/ only
    assert report.n_evaluated == len(pred)
    for name in ("metrics.parquet", "confusion.parquet", "roc.parquet", "pr.parquet", "calibration.parquet",
                 "roc.png", "confusion.png"):
        assert os.path.getsize(tmp_path / "report" / name) > 0
    m = pd.read_parquet(tmp_path / "report" / "metrics.parquet").set_index("rule")
    assert (m.roc_auc_ci_low <= m.roc_auc).all() and (m.roc_auc <= m.roc_auc_ci_high).all()
    assert m.loc["stored", "n"] == len(pred) and 0 <= m.loc["stored", "ece"] <= 1


def test_bad_files_become_error_rows(ray_cluster, trained_model, phantom_root, tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    good = sorted(os.listdir(os.path.join(phantom_root, "test", "NORMAL")))[:2]
    for f in good:
        (src / f).write_bytes(open(os.path.join(phantom_root, "test", "NORMAL", f), "rb").read())
    (src / "empty.png").write_bytes(b"")
    (src / "notes.png").write_text("not an image")
    cfg = load_config(None, TINY)
    summary = run_scoring(cfg, "run-bad", str(src), trained_model.model_path, str(tmp_path / "pred"))
    pred = read_predictions(str(tmp_path / "pred")).set_index("path")
    assert (summary.seen, summary.scored, summary.failed) == (4, 2, 2)
    assert "empty file" in pred.loc[str(src / "empty.png"), "error"]
    assert "not a PNG, JPEG or DICOM" in pred.loc[str(src / "notes.png"), "error"]
    assert pred.loc[str(src / "notes.png"), "status"] == "error"
    assert np.isnan(pred.loc[str(src / "notes.png"), "prob_NORMAL"])


def test_unreadable_training_image_fails_before_training(ray_cluster, phantom_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(os.path.join(phantom_root, "train"), root / "train")
    (root / "train" / "NORMAL" / "P99999_0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    cfg = load_config(None, TINY + [f"data.root={root}", f"run.root={tmp_path}"])
    from medclf.train.driver import run_training

    with pytest.raises(DatasetError, match=r"(?s)1 unreadable image\(s\) in the (train|val) split.*P99999_0.png: corrupt or truncated PNG"):
        run_training(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "ray_train")  # no training was started


def test_small_archives_are_cut_into_a_decode_task_per_cpu(ray_cluster):
    from medclf.imaging.stage import decode_blocks

    cpus = int(ray_cluster.cluster_resources()["CPU"])
    assert cpus == 2
    assert decode_blocks(48, 16) == 2  # a small night: both CPUs (on a cluster, both nodes) decode
    assert decode_blocks(20, 16) == 1  # never a block smaller than one decode batch
    assert decode_blocks(1000, 16) == 15  # large archives: ~64 files a task, whatever the CPU count
    assert decode_blocks(10**6, 16) == 200
