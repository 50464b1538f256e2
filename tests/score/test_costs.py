"""Issue 35, item 6: the scoring summary shows where the time goes, per stage (medclf.score.costs)."""

import os

import numpy as np
import pyarrow as pa
import pytest

from medclf.config import load_config
from medclf.imaging.stage import load_images
from medclf.model.artifact import ModelCard, save_artifact
from medclf.model.networks import build_model
from medclf.score.batch import Predictor, run_scoring
from medclf.score.costs import ANSWERED_COLUMN, STAGES, TIME_COLUMNS, cost_line, first_answer, sum_times
from tests.conftest import TINY


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("m") / "model")
    card = ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"], preprocess={"image_size": 32})
    save_artifact(build_model("small_cnn", 2), card, dest)
    return dest


def test_rows_carry_their_stage_seconds_without_ray(model, phantom_root):
    src = os.path.join(phantom_root, "test")
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)[:6] + ["/no/such.png"]
    predictor = Predictor(model, "run", threads=1)
    tables = [predictor(b) for b in load_images({"path": np.array(paths, object)}, {"image_size": 32},
                                                 rows_per_batch=4)]
    table = pa.concat_tables(tables)
    assert set(TIME_COLUMNS) <= set(table.column_names)
    rows = table.to_pandas()
    ok = rows.status == "ok"
    assert ok.sum() == 6 and (rows.loc[ok, "t_read"] > 0).all() and (rows.loc[ok, "t_decode"] > 0).all()
    assert (rows.t_forward > 0).all()  # every row gets its share of its batch's forward pass
    sums = sum_times(tables)
    assert sums["read"] == pytest.approx(rows.t_read.sum()) and sums["forward"] == pytest.approx(rows.t_forward.sum())
    # each batch's rows carry when the actor answered them; the run's first answer is the earliest
    answered = [t.column(ANSWERED_COLUMN).to_numpy() for t in tables]
    assert all(len(set(a)) == 1 for a in answered)  # one time per batch
    assert answered[0][0] <= answered[1][0] and first_answer(tables) == answered[0][0]
    assert first_answer([t.drop_columns([ANSWERED_COLUMN]) for t in tables]) is None


def test_a_multi_frame_file_is_read_once(model):
    from pydicom.data import get_testdata_file

    cine = get_testdata_file("emri_small.dcm")  # 10 frames
    rows = pa.concat_tables([Predictor(model, "run", threads=1)(b) for b in load_images(
        {"path": np.array([cine], object)}, {"image_size": 32}, frames="all", rows_per_batch=4)]).to_pandas()
    assert len(rows) == 10 and (rows.t_read > 0).sum() == 1 and rows.t_read.iloc[0] > 0
    assert (rows.t_decode > 0).all()


def test_cost_line_is_seconds_per_thousand_and_images_per_second():
    line = cost_line({"list": 0.5, "read": 1.0, "decode": 20.0, "forward": 4.0, "write": 0.0}, 200)
    for stage in STAGES:
        assert f"{stage} " in line
    assert "decode 100.00 s/1k (10.0 img/s)" in line and "forward 20.00 s/1k (50.0 img/s)" in line
    assert "write 0.00 s/1k (-)" in line
    assert "start-up" not in line
    assert line + "; start-up 2.5 s (wall, once per run" in cost_line(
        {"list": 0.5, "read": 1.0, "decode": 20.0, "forward": 4.0, "write": 0.0}, 200, 2.46)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_scoring_summary_prints_every_stage(ray_cluster, model, phantom_root, tmp_path):
    cfg = load_config(None, TINY)
    summary = run_scoring(cfg, "run-cost", os.path.join(phantom_root, "test"), model, str(tmp_path / "pred"))
    assert summary.scored > 0 and set(summary.stage_seconds) == set(STAGES)
    assert all(summary.stage_seconds[s] > 0 for s in STAGES), summary.stage_seconds
    text = str(summary)
    assert "stage costs" in text and all(f"{s} " in text.split("stage costs")[1] for s in STAGES)
    # the first answer came after the run started and before it ended; the summary prints it
    assert 0 < summary.startup_s < summary.seconds
    assert f"start-up {summary.startup_s:.1f} s" in text
