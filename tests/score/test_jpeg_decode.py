"""score.jpeg_decode (issue 35): with `actor`, the decode tasks hand JPEG bytes to the inference actor, which
decodes them on its device (medclf.imaging.device_decode). On a real local Ray the rows it writes are the
rows the tasks' decoding writes: answers, statistics, refusals and errors."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from medclf.config import load_config
from medclf.data.predictions import read_predictions
from medclf.score.batch import run_scoring
from medclf.imaging.stats import STAT_COLUMNS
from tests.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _jpeg_archive(phantom_root: str, dest) -> list[str]:
    dest.mkdir()
    for label in ("NORMAL", "POSITIVE"):
        folder = os.path.join(phantom_root, "test", label)
        for name in sorted(f for f in os.listdir(folder) if f.endswith(".png"))[:4]:
            buf = io.BytesIO()
            Image.open(os.path.join(folder, name)).convert("L").save(buf, "JPEG", quality=95)
            (dest / name.replace(".png", ".jpeg")).write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(buf, "JPEG")
    (dest / "blank.jpeg").write_bytes(buf.getvalue())
    (dest / "truncated.jpeg").write_bytes((dest / sorted(os.listdir(dest))[0]).read_bytes()[:200])
    return sorted(str(p) for p in dest.iterdir())


def test_the_actor_decoding_jpegs_writes_the_rows_the_tasks_write(ray_cluster, trained_model, phantom_root,
                                                                  tmp_path):
    paths = _jpeg_archive(phantom_root, tmp_path / "jpegs")
    preds = {}
    for where in ("tasks", "actor"):
        cfg = load_config(None, TINY + ["score.extensions=[.jpeg]", f"score.jpeg_decode={where}"])
        summary = run_scoring(cfg, f"run-{where}", str(tmp_path / "jpegs"), trained_model.model_path,
                              str(tmp_path / where))
        assert summary.seen == len(paths)
        preds[where] = read_predictions(str(tmp_path / where)).set_index("path").sort_index()
    tasks, actor = preds["tasks"], preds["actor"]
    assert list(actor.index) == list(tasks.index) == paths
    assert list(actor.status) == list(tasks.status)
    assert (tasks.status == "ok").sum() == 9  # the shared model has no guard: the blank film is answered
    truncated = str(tmp_path / "jpegs" / "truncated.jpeg")
    assert actor.loc[truncated, "status"] == "error" and "corrupt or truncated JPEG" in actor.loc[truncated, "error"]
    assert list(actor.error.fillna("")) == list(tasks.error.fillna(""))
    assert list(actor.error_kind.fillna("")) == list(tasks.error_kind.fillna(""))
    ok = tasks.status == "ok"
    probs = [c for c in tasks.columns if c.startswith("prob_")]
    np.testing.assert_allclose(actor.loc[ok, probs].to_numpy(), tasks.loc[ok, probs].to_numpy(), rtol=0, atol=1e-4)
    assert list(actor.predicted_label) == list(tasks.predicted_label)
    for name in STAT_COLUMNS:
        np.testing.assert_allclose(actor.loc[ok, name].to_numpy(), tasks.loc[ok, name].to_numpy(), rtol=0,
                                   atol=1e-4, err_msg=name)


def test_the_predictor_writes_the_refusals_and_errors_of_the_jpegs_it_decodes(tmp_path):
    """In one process, no Ray: the rows of a batch whose JPEGs the actor decodes, with the content checks on."""
    import torch

    from medclf.imaging.stage import load_images
    from medclf.model.artifact import ModelCard, save_artifact
    from medclf.model.networks import build_model
    from medclf.score.predictor import Predictor
    from tests.imaging.test_draft import _film

    torch.manual_seed(0)
    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], positive_class="POSITIVE",
                     preprocess={"image_size": 32}, threshold=0.5)
    save_artifact(build_model("small_cnn", 2), card, str(tmp_path / "model"))
    files = {"film.jpeg": _film(300, seed=1), "blank.jpeg": np.zeros((300, 300), np.uint8)}
    for name, pixels in files.items():
        Image.fromarray(pixels).save(tmp_path / name, "JPEG", quality=90)
    (tmp_path / "cut.jpeg").write_bytes((tmp_path / "film.jpeg").read_bytes()[:2000])
    paths = np.array([str(tmp_path / n) for n in ("film.jpeg", "blank.jpeg", "cut.jpeg")])
    gate = {"modalities": [], "min_size": 0, "content": True}
    predictor = Predictor(str(tmp_path / "model"), "run", threads=1)
    predictor.gate = gate  # (a card with a domain record sets it: medclf.model.records.input_gate)
    tables = {}
    for where, side in (("tasks", None), ("actor", 0)):
        [batch] = list(load_images({"path": paths}, card.preprocess_spec.model_dump(), actor_jpeg=side, gate=gate))
        tables[where] = predictor(batch).to_pandas()
    tasks, actor = tables["tasks"], tables["actor"]
    assert list(actor.status) == list(tasks.status) == ["ok", "out_of_scope", "error"]
    assert list(actor.error.fillna("")) == list(tasks.error.fillna(""))
    assert "all pixels are zero" in actor.error[1] and "corrupt or truncated JPEG" in actor.error[2]
    assert list(actor.error_kind.fillna("")) == list(tasks.error_kind.fillna("")) == ["", "", "permanent"]
    np.testing.assert_allclose(actor.prob_POSITIVE[0], tasks.prob_POSITIVE[0], rtol=0, atol=1e-3)
    assert abs(actor.img_mean[0] - tasks.img_mean[0]) < 1e-3 and actor.img_height[0] == tasks.img_height[0] == 75  # draft: 300 / 4
    assert actor.t_decode[0] > 0  # the actor's decoding is counted as decode time
