"""Evaluation reports from a predictions dataset + labels: tables, plots, page, and clear errors.

The predictions are written here in the exact schema `score` writes (no Ray needed), for real
phantom image files, so the gallery decodes real images.
"""

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medclf.report.evaluate import EvaluationError, run_evaluation
from medclf.data.predictions import prediction_schema, prob_column

CLASSES = ["NORMAL", "POSITIVE"]


def write_predictions(folder, paths, probs, classes, threshold=0.5, fmt=None, model_id="small_cnn-abc", run_id="r1",
                      scored_at=None, frames=None, checksums=None, adaptation_id=None):
    """Predictions Parquet in score's layout and schema; probs (N, C)."""
    n = len(paths)
    schema = prediction_schema(classes)
    cols = {name: [None] * n for name in schema.names}
    cols["path"] = list(paths)
    cols["size"] = [1] * n
    cols["checksum"] = checksums or [f"{i:064x}" for i in range(n)]
    cols["format"] = fmt or [p.rsplit(".", 1)[-1] for p in paths]
    for k, c in enumerate(classes):
        cols[prob_column(c)] = np.asarray(probs)[:, k].astype(np.float32)
    cols["predicted_label"] = [classes[int(i)] for i in np.asarray(probs).argmax(1)]
    cols["threshold"] = [threshold] * n
    cols["model_id"] = [model_id] * n
    cols["run_id"] = [run_id] * n
    cols["scored_at"] = [scored_at] * n
    cols["status"] = ["ok"] * n
    if frames is not None:
        cols["frame"] = frames
    if adaptation_id is not None:
        cols["adaptation_id"] = [adaptation_id] * n
    part = os.path.join(folder, "run_date=2026-11-22")
    os.makedirs(part, exist_ok=True)
    pq.write_table(pa.table(cols, schema=schema), os.path.join(part, f"part-{run_id}-0.parquet"))
    return folder


@pytest.fixture
def scored(phantom_root, tmp_path):
    """Phantom test files (PNG + DICOM) with informative but imperfect scores."""
    manifest = pd.read_parquet(os.path.join(phantom_root, "manifest.parquet"))
    test = manifest[manifest.split == "test"].reset_index(drop=True)
    paths = [os.path.join(phantom_root, p) for p in test.path]
    rng = np.random.default_rng(0)
    y = (test.label == "POSITIVE").to_numpy().astype(int)
    p = np.clip(0.5 + (y - 0.5) * 0.5 + rng.normal(0, 0.25, len(y)), 0.01, 0.99)
    pred = write_predictions(str(tmp_path / "pred"), paths, np.stack([1 - p, p], 1), CLASSES, threshold=0.45)
    labels = test.assign(path=paths, site=np.where(np.arange(len(test)) % 3 == 0, "A", "B"))
    labels_path = str(tmp_path / "labels.parquet")
    labels.to_parquet(labels_path)
    return pred, labels_path, y, p


def test_report_tables_plots_and_page(scored, tmp_path):
    pred, labels, y, p = scored
    out = str(tmp_path / "report")
    report = run_evaluation(pred, out, CLASSES, "POSITIVE", labels, bootstrap_resamples=200)
    for name in ("metrics", "per_class", "confusion", "roc", "pr", "calibration", "subgroups"):
        assert os.path.getsize(os.path.join(out, f"{name}.parquet")) > 0, name
    for name in ("roc", "pr", "confusion", "reliability", "histogram", "gallery"):
        with open(os.path.join(out, f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name

    m = report.metrics.set_index("rule")
    assert {"stored", "youden_on_this_data", "sensitivity_0.95_on_this_data", "argmax"} <= set(m.index)
    stored = m.loc["stored"]
    assert stored["threshold"] == pytest.approx(0.45) and stored["n"] == len(y)
    assert stored["sensitivity"] == pytest.approx(((p >= 0.45) & (y == 1)).sum() / y.sum())
    assert m.loc["sensitivity_0.95_on_this_data", "sensitivity"] >= 0.95
    for metric in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        assert m.loc["stored", f"{metric}_ci_low"] <= stored[metric] <= m.loc["stored", f"{metric}_ci_high"]

    # subgroups: format (from the predictions) and site (from the labels manifest), with counts
    sub = pd.read_parquet(os.path.join(out, "subgroups.parquet"))
    assert set(sub.group) >= {"format", "site"}
    for group, part in sub.groupby("group"):
        assert part["n"].sum() == len(y), group
        assert (part["n_NORMAL"] + part["n_POSITIVE"] == part["n"]).all()
    site_a = sub[(sub.group == "site") & (sub.value == "A")].iloc[0]
    assert site_a["n"] == (np.arange(len(y)) % 3 == 0).sum()

    per_class = pd.read_parquet(os.path.join(out, "per_class.parquet")).set_index("class")
    assert per_class.loc["POSITIVE", "recall"] == pytest.approx(stored["sensitivity"])
    assert per_class.loc["NORMAL", "recall"] == pytest.approx(stored["specificity"])

    page = open(os.path.join(out, "summary.html")).read()
    # 7 pictures: the six of before plus the risk-coverage curve (issue 33)
    assert "small_cnn-abc" in page and "0.4500" in page and page.count("data:image/png;base64,") == 7
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["n_evaluated"] == len(y) and summary["subgroup_columns"] == ["format", "site"]
    # nothing refused here: full coverage, and the accuracy on the answered is the stored accuracy
    assert summary["selective"]["coverage"] == 1.0 and summary["selective"]["abstention_rate"] == 0.0
    assert summary["selective"]["accuracy_on_scored"] == pytest.approx(stored["accuracy"])


def test_multiclass_report(phantom_root, tmp_path):
    classes = ["benign", "malignant", "normal"]
    files = sorted(os.listdir(os.path.join(phantom_root, "test", "NORMAL")))[:9]
    paths = [os.path.join(phantom_root, "test", "NORMAL", f) for f in files]
    y = np.arange(9) % 3
    probs = np.full((9, 3), 0.1)
    probs[np.arange(9), y] = 0.8
    probs[0] = [0.1, 0.8, 0.1]  # one benign called malignant
    pred = write_predictions(str(tmp_path / "pred"), paths, probs, classes, threshold=None)
    labels = str(tmp_path / "labels.csv")
    pd.DataFrame({"path": paths, "label": [classes[k] for k in y]}).to_csv(labels, index=False)
    report = run_evaluation(pred, str(tmp_path / "rep"), classes, None, labels, bootstrap_resamples=0)
    row = report.metrics.iloc[0]
    assert row["rule"] == "argmax" and row["accuracy"] == pytest.approx(8 / 9)
    # recall per class 2/3, 1, 1 -> macro 8/9; precision 1, 3/4, 1 -> macro 11/12
    assert row["sensitivity"] == pytest.approx(8 / 9) and row["precision"] == pytest.approx(11 / 12)
    assert row["precision_weighted"] == pytest.approx(11 / 12)  # equal class counts
    per_class = pd.read_parquet(str(tmp_path / "rep" / "per_class.parquet")).set_index("class")
    assert per_class.loc["benign", "recall"] == pytest.approx(2 / 3)
    assert per_class.loc["malignant", "specificity"] == pytest.approx(5 / 6)


def test_wrong_input_is_explained(scored, phantom_root, tmp_path):
    pred, labels, _, _ = scored
    out = str(tmp_path / "r")
    # labels that cover none of the scored files (predictions without labels)
    other = str(tmp_path / "other.csv")
    pd.DataFrame({"path": ["/elsewhere/a.png"], "label": ["NORMAL"]}).to_csv(other, index=False)
    with pytest.raises(EvaluationError, match="none of the .* scored files has a label"):
        run_evaluation(pred, out, CLASSES, "POSITIVE", other)
    # some scored files unlabelled
    lab = pd.read_parquet(labels)
    partial = str(tmp_path / "partial.parquet")
    lab.iloc[2:].to_parquet(partial)
    with pytest.raises(EvaluationError, match="no label for 2 scored file"):
        run_evaluation(pred, out, CLASSES, "POSITIVE", partial)
    # labels for files never scored
    extra = str(tmp_path / "extra.parquet")
    pd.concat([lab, lab.iloc[:1].assign(path="/never/scored.png")]).to_parquet(extra)
    with pytest.raises(EvaluationError, match="1 labelled file.* never scored.*never/scored.png"):
        run_evaluation(pred, out, CLASSES, "POSITIVE", extra)
    run_evaluation(pred, out, CLASSES, "POSITIVE", extra, bootstrap_resamples=0, allow_unscored=True)
    # class names that differ between model and labels
    renamed = str(tmp_path / "renamed.parquet")
    lab.assign(label=lab.label.replace({"POSITIVE": "PNEUMONIA"})).to_parquet(renamed)
    with pytest.raises(EvaluationError, match=r"labels \['PNEUMONIA'\] are not among the model's classes"):
        run_evaluation(pred, out, CLASSES, "POSITIVE", renamed)
    with pytest.raises(EvaluationError, match=r"no probability columns \['prob_PNEUMONIA'\]"):
        run_evaluation(pred, out, ["NORMAL", "PNEUMONIA"], "PNEUMONIA", labels)
    # an empty predictions set, and a missing one
    empty = str(tmp_path / "empty")
    write_predictions(empty, [], np.zeros((0, 2)), CLASSES)
    with pytest.raises(EvaluationError, match="predictions set is empty"):
        run_evaluation(empty, out, CLASSES, "POSITIVE", labels)
    with pytest.raises(EvaluationError, match="predictions folder not found"):
        run_evaluation(str(tmp_path / "nope"), out, CLASSES, "POSITIVE", labels)
    # a grouping column that does not exist
    with pytest.raises(EvaluationError, match=r"group_by names \['scanner'\]"):
        run_evaluation(pred, out, CLASSES, "POSITIVE", labels, bootstrap_resamples=0, group_by=["scanner"])


def _twenty(phantom_root):
    manifest = pd.read_parquet(os.path.join(phantom_root, "manifest.parquet"))
    test = manifest[manifest.split == "test"].head(20)
    paths = [os.path.join(phantom_root, p) for p in test.path]
    y = (test.label == "POSITIVE").to_numpy().astype(int)
    right = np.stack([1 - y, y], 1) * 0.8 + 0.1
    return paths, y, right, right[:, ::-1]


def test_the_report_says_which_site_profile_the_rows_were_scored_with(phantom_root, tmp_path):
    paths, y, right, _ = _twenty(phantom_root)
    labels = str(tmp_path / "labels.csv")
    pd.DataFrame({"path": paths, "label": np.where(y == 1, "POSITIVE", "NORMAL")}).to_csv(labels, index=False)
    plain = write_predictions(str(tmp_path / "plain"), paths, right, CLASSES)
    run_evaluation(plain, str(tmp_path / "r0"), CLASSES, "POSITIVE", labels, bootstrap_resamples=0)
    summary = json.load(open(tmp_path / "r0" / "summary.json"))
    assert summary["adaptation"] == {"training statistics": 20}
    adapted = write_predictions(str(tmp_path / "adapted"), paths, right, CLASSES, adaptation_id="ab" * 32)
    run_evaluation(adapted, str(tmp_path / "r1"), CLASSES, "POSITIVE", labels, bootstrap_resamples=0)
    assert json.load(open(tmp_path / "r1" / "summary.json"))["adaptation"] == {"ab" * 32: 20}
    assert "site profile abababababab (20 rows)" in open(tmp_path / "r1" / "summary.html").read()


def test_old_model_rows_are_left_out_of_the_new_models_evaluation(phantom_root, tmp_path):
    """The documented rollout: old model all wrong, new model all right, same output."""
    paths, y, right, wrong = _twenty(phantom_root)
    pred = str(tmp_path / "pred")
    write_predictions(pred, paths, wrong, CLASSES, model_id="small_cnn-old", run_id="n1", scored_at="2026-11-21T01:00:00")
    write_predictions(pred, paths, right, CLASSES, model_id="small_cnn-new", run_id="n2", scored_at="2026-11-22T01:00:00")
    out = str(tmp_path / "rep")
    report = run_evaluation(pred, out, CLASSES, "POSITIVE", bootstrap_resamples=0, model_id="small_cnn-new")
    row = report.metrics.iloc[0]
    assert row["n"] == 20 and row["accuracy"] == 1.0
    assert report.rows_dropped == {"other_models": 20, "superseded": 0}
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["model_ids"] == ["small_cnn-new"] and summary["rows_dropped"] == report.rows_dropped
    assert "20 scored by other models than small_cnn-new" in open(os.path.join(out, "summary.html")).read()
    old = run_evaluation(pred, str(tmp_path / "old"), CLASSES, "POSITIVE", bootstrap_resamples=0,
                         model_id="small_cnn-old")
    assert old.metrics.iloc[0]["accuracy"] == 0.0 and old.metrics.iloc[0]["n"] == 20
    with pytest.raises(EvaluationError, match=r"rows from 2 models \['small_cnn-new', 'small_cnn-old'\]; choose one"):
        run_evaluation(pred, out, CLASSES, "POSITIVE", bootstrap_resamples=0)
    with pytest.raises(EvaluationError, match="no rows scored by model small_cnn-other"):
        run_evaluation(pred, out, CLASSES, "POSITIVE", bootstrap_resamples=0, model_id="small_cnn-other")


def test_rescored_rows_count_once_newest_first(phantom_root, tmp_path):
    paths, y, right, wrong = _twenty(phantom_root)
    pred = str(tmp_path / "pred")
    write_predictions(pred, paths, wrong, CLASSES, run_id="n1", scored_at="2026-11-21T01:00:00")
    write_predictions(pred, paths, right, CLASSES, run_id="rescore", scored_at="2026-11-22T01:00:00")
    report = run_evaluation(pred, str(tmp_path / "rep"), CLASSES, "POSITIVE", bootstrap_resamples=0)
    assert report.metrics.iloc[0]["n"] == 20 and report.metrics.iloc[0]["accuracy"] == 1.0
    assert report.rows_dropped == {"other_models": 0, "superseded": 20}


def test_frames_of_one_file_are_not_superseded(phantom_root, tmp_path):
    paths, y, right, _ = _twenty(phantom_root)
    pred = str(tmp_path / "pred")
    # two frames of each of 10 files (same bytes): neither frame supersedes the other; evaluation is
    # per file (frames averaged), so n counts files
    write_predictions(pred, paths[:10] * 2, np.concatenate([right[:10], right[:10]]), CLASSES, run_id="f",
                      scored_at="2026-11-22T01:00:00", frames=[1] * 10 + [2] * 10,
                      checksums=[f"{i:064x}" for i in range(10)] * 2)
    report = run_evaluation(pred, str(tmp_path / "rep"), CLASSES, "POSITIVE", bootstrap_resamples=0)
    assert report.metrics.iloc[0]["n"] == 10 and report.metrics.iloc[0]["accuracy"] == 1.0
    assert report.rows_dropped["superseded"] == 0


def test_evaluate_command_prints_what_it_left_out(phantom_root, tmp_path, capsys):
    from medclf.cli import main

    paths, y, right, wrong = _twenty(phantom_root)
    pred = str(tmp_path / "pred")
    write_predictions(pred, paths, wrong, CLASSES, model_id="small_cnn-old", run_id="n1", scored_at="2026-11-21T01:00:00")
    write_predictions(pred, paths, right, CLASSES, model_id="small_cnn-new", run_id="n2", scored_at="2026-11-22T01:00:00")
    status = main(["evaluate", "--predictions", pred, "--model-id", "small_cnn-new", "--run-root", str(tmp_path / "runs"),
                   "--set", "data.classes=[NORMAL, POSITIVE]", "--set", "data.positive_class=POSITIVE",
                   "--set", "evaluate.bootstrap_resamples=0"])
    printed = capsys.readouterr().out
    assert status == 0 and "rows not evaluated: 20 scored by other models than small_cnn-new, 0 superseded" in printed
    assert main(["evaluate", "--predictions", pred, "--run-root", str(tmp_path / "runs"),
                 "--set", "data.classes=[NORMAL, POSITIVE]", "--set", "evaluate.bootstrap_resamples=0"]) == 2


def test_frame_rows_are_evaluated_per_file():
    from medclf.report.evaluate import per_file

    pred = pd.DataFrame({
        "path": ["cine.dcm"] * 3 + ["cr.dcm", "report.dcm"],
        "checksum": ["c"] * 3 + ["d", "e"], "model_id": ["m"] * 5, "run_id": ["r"] * 5,
        "frame": pd.array([1, 2, 3, None, None], dtype="Int32"),
        "status": ["ok", "ok", "error", "ok", "skipped"],
        "prob_NORMAL": [0.2, 0.4, np.nan, 0.9, np.nan], "prob_POSITIVE": [0.8, 0.6, np.nan, 0.1, np.nan],
    })
    out = per_file(pred, ["NORMAL", "POSITIVE"]).set_index("path")
    assert sorted(out.index) == ["cine.dcm", "cr.dcm"]  # one row per file; not-an-image rows left out
    assert out.loc["cine.dcm", "prob_POSITIVE"] == pytest.approx(0.7) and out.loc["cine.dcm", "frames"] == 2
    assert out.loc["cine.dcm", "status"] == "ok" and out.loc["cr.dcm", "prob_POSITIVE"] == pytest.approx(0.1)
