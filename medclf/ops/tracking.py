"""Experiment tracking with MLflow: every training, scoring and evaluation run, comparable in one place.

Where runs go: `MLFLOW_TRACKING_URI` if set (a tracking server: what a multi-node cluster should
use), else `tracking.uri`, else a file store at `<run.root>/mlruns` beside the run folders. A run
root on object storage has no default store (MLflow's file store is local): set a URI there.

What is logged:
- training: the resolved config as params, per-epoch metrics of rank 0 (a Ray Train callback on
  the controller, so the loop itself stays free of tracking code), then the model artifact, the
  validation reports, history and curves, and the validation figures; tagged with the medclf run
  id and the model id. A resumed run (same run id) continues its MLflow run.
- scoring and evaluation: their summary counts and metrics, tagged with the model id and linked
  (`medclf.model_run`) to the training run that made the model, when the store has it.

`medclf runs` lists the store's runs with their key figures; `mlflow ui --backend-store-uri
<store>` (the full `mlflow` package) browses them.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from ray.train import UserCallback

from medclf import storage
from medclf.config import Config

log = logging.getLogger(__name__)

URI_ENV = "MLFLOW_TRACKING_URI"
STORE_FOLDER = "mlruns"
RUN_TAG, MODEL_TAG, JOB_TAG, MODEL_RUN_TAG = "medclf.run_id", "medclf.model_id", "medclf.job", "medclf.model_run"


def tracking_uri(cfg: Config) -> Optional[str]:
    """The store this config's runs go to, or None when tracking is off or has nowhere to go."""
    if not cfg.tracking.enabled:
        return None
    uri = os.environ.get(URI_ENV) or cfg.tracking.uri
    if uri:
        return uri
    if storage.is_remote(cfg.run.root):
        return None  # MLflow's file store cannot live on S3; a server URI is needed there
    return "file:" + os.path.abspath(os.path.join(cfg.run.root, STORE_FOLDER))


def _client(uri: str):
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store for existing users only; it is what needs no server here.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.001}} -> {"train.lr": "0.001"}; MLflow caps a value at 6,000 characters."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def numeric_metrics(values: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics dict, keys prefixed; MLflow metric names allow [\\w.-/ ]."""
    import math

    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{prefix}{key}".replace("@", "_at_")] = float(value)
    return out


class EpochLogger(UserCallback):
    """Ray Train callback, run on the controller: rank 0's metrics of each epoch into the MLflow run."""

    def __init__(self, uri: str, mlflow_run_id: str):
        self.uri, self.mlflow_run_id = uri, mlflow_run_id

    def after_report(self, run_context, metrics: list, checkpoint) -> None:
        rank0 = metrics[0] if metrics else {}
        step = int(rank0.get("epoch", 0))
        try:
            client = _client(self.uri)
            for key, value in numeric_metrics(rank0).items():
                if key != "epoch":
                    client.log_metric(self.mlflow_run_id, key, value, step=step)
        except Exception as exc:  # tracking must never stop a training run
            log.warning("MLflow: epoch %s metrics not logged: %s", step, exc)


class Tracker:
    """One medclf run's MLflow run; every method is a no-op when tracking is off."""

    def __init__(self, uri: Optional[str] = None, mlflow_run_id: Optional[str] = None):
        self.uri, self.mlflow_run_id = uri, mlflow_run_id

    @classmethod
    def start(cls, cfg: Config, run_id: str, job: str, tags: Optional[dict] = None) -> "Tracker":
        uri = tracking_uri(cfg)
        if uri is None:
            return cls()
        try:
            client = _client(uri)
            experiment = _experiment_id(client, cfg.tracking.experiment or cfg.run.name)
            previous = client.search_runs([experiment], f"tags.`{RUN_TAG}` = '{run_id}' and tags.`{JOB_TAG}` = '{job}'",
                                          max_results=1) if job == "train" else []
            if previous:  # a resumed training run carries on in its MLflow run
                run = previous[0]
                client.update_run(run.info.run_id, status="RUNNING")
            else:
                run = client.create_run(experiment, run_name=run_id, tags={RUN_TAG: run_id, JOB_TAG: job, **(tags or {})})
                client.log_batch(run.info.run_id, params=_param_list(flat_params(cfg.model_dump(mode="json"))))
        except Exception as exc:
            log.warning("MLflow tracking at %s is unavailable, this run is not tracked: %s", uri, exc)
            return cls()
        print(f"[medclf] MLflow run {run.info.run_id} in {uri}", flush=True)
        return cls(uri, run.info.run_id)

    def callbacks(self) -> list:
        """Ray Train callbacks (RunConfig(callbacks=...)) that log each epoch."""
        return [EpochLogger(self.uri, self.mlflow_run_id)] if self.mlflow_run_id else []

    def log(self, metrics: Optional[dict] = None, tags: Optional[dict] = None, artifacts: Optional[dict] = None) -> None:
        """Final metrics, tags and artifacts ({artifact folder: local file or folder})."""
        if not self.mlflow_run_id:
            return
        try:
            client = _client(self.uri)
            if metrics or tags:
                import time

                from mlflow.entities import Metric, RunTag

                now = int(time.time() * 1000)
                client.log_batch(self.mlflow_run_id,
                                 metrics=[Metric(k, v, now, 0) for k, v in (metrics or {}).items()],
                                 tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
            for folder, path in (artifacts or {}).items():
                if storage.is_remote(path) or not os.path.exists(path):
                    continue  # run folders on S3 are already where a team finds them
                if os.path.isdir(path):
                    client.log_artifacts(self.mlflow_run_id, path, folder)
                else:
                    client.log_artifact(self.mlflow_run_id, path, folder or None)
        except Exception as exc:
            log.warning("MLflow: results of run %s not logged: %s", self.mlflow_run_id, exc)

    def end(self, status: str = "FINISHED") -> None:
        if not self.mlflow_run_id:
            return
        try:
            _client(self.uri).set_terminated(self.mlflow_run_id, status=status)
        except Exception as exc:
            log.warning("MLflow: run %s not closed: %s", self.mlflow_run_id, exc)

    def training_run_of(self, model_id: str) -> Optional[str]:
        """The MLflow run of the training that produced `model_id`, in this store."""
        if not self.mlflow_run_id:
            return None
        try:
            client = _client(self.uri)
            experiments = [e.experiment_id for e in client.search_experiments()]
            found = client.search_runs(experiments, f"tags.`{MODEL_TAG}` = '{model_id}' and tags.`{JOB_TAG}` = 'train'",
                                       max_results=1)
            return found[0].info.run_id if found else None
        except Exception:
            return None


def _param_list(params: dict[str, str]) -> list:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in params.items()]


def log_job(cfg: Config, job: str, run_id: str, model_id: Optional[str], metrics: dict[str, Any]) -> None:
    """A scoring or evaluation run: its figures, its model, and the training run that made the model."""
    tracker = Tracker.start(cfg, run_id, job, tags={MODEL_TAG: model_id} if model_id else None)
    if model_id:
        model_run = tracker.training_run_of(model_id)
        tracker.log(tags={MODEL_RUN_TAG: model_run} if model_run else None)
    tracker.log(metrics=numeric_metrics(metrics))
    tracker.end()


KEY_METRICS = ["validation.roc_auc", "validation.accuracy", "validation.sensitivity", "validation.specificity",
               "validation.f1", "accuracy", "roc_auc", "scored", "failed", "seconds"]


def list_runs(uri: str, max_results: int = 200):
    """The store's runs, newest first: job, run id, status, model id and the key figures (a DataFrame)."""
    import pandas as pd

    client = _client(uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    runs = client.search_runs(list(experiments), order_by=["attributes.start_time DESC"], max_results=max_results) \
        if experiments else []
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        row = {"started": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC").strftime("%Y-%m-%d %H:%M"),
               "experiment": experiments.get(run.info.experiment_id), "job": tags.get(JOB_TAG),
               "run": tags.get(RUN_TAG), "status": run.info.status, "model_id": tags.get(MODEL_TAG)}
        row.update({k: metrics[k] for k in KEY_METRICS if k in metrics})
        rows.append(row)
    return pd.DataFrame(rows)
