"""MLflow tracking: a training run appears in the store with its params, per-epoch metrics and
artifact; a scoring run is linked to the training run of its model; `medclf runs` lists both."""

import glob
import os

import pandas as pd
import pytest

from medclf.cli import run_command
from medclf.config import load_config
from medclf.ops.tracking import JOB_TAG, MODEL_RUN_TAG, MODEL_TAG, RUN_TAG, _client, flat_params, tracking_uri


def _store(model_path: str) -> str:
    # conftest's trained_model: run.root = <train_run>, run folder <train_run>/run
    return "file:" + os.path.join(os.path.dirname(os.path.dirname(model_path)), "mlruns")


def _runs(uri: str, job: str):
    client = _client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments, f"tags.`{JOB_TAG}` = '{job}'")


def test_store_location_follows_env_config_and_run_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"run.root={tmp_path}"])
    assert tracking_uri(cfg) == f"file:{tmp_path}/mlruns"
    assert tracking_uri(load_config(None, ["run.root=s3://bucket/runs"])) is None  # no file store on S3
    assert tracking_uri(load_config(None, ["tracking.enabled=false"])) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(cfg) == "http://127.0.0.1:5000"
    assert flat_params({"train": {"lr": 0.001, "augment": {"rotate_deg": 10}}}) == {
        "train.lr": "0.001", "train.augment.rotate_deg": "10"}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_training_run_is_tracked_and_scoring_links_to_it(ray_cluster, trained_model, phantom_root, tmp_path, capsys):
    uri = _store(trained_model.model_path)
    client, runs = _runs(uri, "train")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[MODEL_TAG] == trained_model.card.model_id and run.data.tags[RUN_TAG] == "run"
    assert run.data.params["train.epochs"] == "1" and run.data.params["model.arch"] == "small_cnn"
    # per-epoch metrics of rank 0, logged by the Ray Train callback with the epoch as the step
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == list(trained_model.history["epoch"])
    assert history[0].value == pytest.approx(float(trained_model.history["val_loss"].iloc[0]), rel=1e-6)
    assert "validation.roc_auc" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "validation_report", "history.parquet", "curves.png"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/model.json", "model/weights.pt"}

    # a scoring run with the same store: linked to the training run by the model id
    files = sorted(glob.glob(os.path.join(phantom_root, "test", "*", "*.png")))[:6]
    manifest = str(tmp_path / "inputs.csv")
    pd.DataFrame({"path": files}).to_csv(manifest, index=False)
    root = os.path.dirname(os.path.dirname(trained_model.model_path))
    rc = run_command("score", ["--set", "score.cpus_per_actor=0.5", "--set", "score.batch_size=8",
                               "--set", "tracking.experiment=test", "--run-root", root, "--run-id", "score-tracked",
                               "--input", manifest, "--model", trained_model.model_path,
                               "--output", str(tmp_path / "pred"), "--set", f"score.allowed_roots=['{phantom_root}']"])
    assert rc == 0
    _, scored = _runs(uri, "score")
    assert len(scored) == 1
    assert scored[0].data.tags[MODEL_RUN_TAG] == run.info.run_id
    assert scored[0].data.metrics["scored"] == len(files)

    capsys.readouterr()
    assert run_command("runs", ["--run-root", root]) == 0
    listing = capsys.readouterr().out
    assert "score-tracked" in listing and trained_model.card.model_id in listing and "train" in listing
