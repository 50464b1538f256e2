"""Training on Ray Train, from the driver: `run_training`.

Flow:
  1. discover the labelled files, carve a patient-level validation split (medclf.train.inputs,
     medclf.data.labelled);
  2. decode + preprocess every image once with the scoring stage (Ray Data tasks) into the
     preprocessed cache (medclf.data.cache: Parquet shards keyed by the files and the preprocessing),
     so a bad file fails the run before training starts, and a resume or re-run reuses it;
  3. TorchTrainer runs `train_loop_per_worker` (medclf.train.loop) on N workers (DDP); each streams
     its shard of the cache (train.data_path=stream: Ray Data, a seeded shuffle per epoch; `memory`:
     the whole cache as object-store arrays; medclf.train.worker_data), and each epoch reports
     metrics and a checkpoint (latest state + best-so-far weights); a restarted worker or a re-run of
     the same run id resumes from the latest checkpoint;
  4. the driver picks the decision threshold on validation scores of the best epoch and writes
     the model artifact, the metrics history (Parquet) and curves (PNG) (medclf.train.finish).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Optional

import pandas as pd
import torch

from medclf import storage
from medclf.config import Config
from medclf.data import cache as cache_mod
from medclf.monitor.ood import in_batches
from medclf.ops import logs
from medclf.ops.logs import say
from medclf.ops.tracking import MODEL_TAG, Tracker, numeric_metrics
from medclf.train.finish import TrainResult, finish_run
from medclf.train.inputs import TrainingInputs, start_run
from medclf.train.loop import STATE_FILE, train_loop_per_worker


class TrainingError(RuntimeError):
    pass


def run_training(cfg: Config, run_dir: str, prepared: tuple[pd.DataFrame, list[str]] | None = None,
                 restart: bool = False) -> TrainResult:
    """Train per `cfg`; `prepared` is `prepare_data(cfg)` when the caller already checked the data.
    A re-used run id resumes only if its classes, architecture, preprocessing and data are unchanged
    (check_resume); `restart` starts it over."""
    inputs = start_run(cfg, run_dir, prepared, restart)
    tracker = Tracker.start(cfg, os.path.basename(run_dir.rstrip("/")), "train")
    root = cfg.train.cache_root or storage.join(run_dir, "cache")
    caches = {name: cache_mod.ensure_cache(name, part, y, inputs.classes, cfg, root) for name, part, y in
              (("train", inputs.train, inputs.train_y), ("val", inputs.val, inputs.val_y))}
    audit = cache_mod.duplicate_audit(caches, {"train": inputs.train, "val": inputs.val})
    storage.write_bytes(storage.join(run_dir, "data_audit.json"), json.dumps(audit, indent=1).encode())
    cfg = resolve_data_path(cfg, caches)
    loop_config, data_kwargs, val_batches = feed(cfg, inputs, caches, run_dir)
    try:
        result = make_trainer(cfg, run_dir, loop_config, callbacks=tracker.callbacks(), **data_kwargs).fit()
    except BaseException:
        tracker.end("FAILED")
        raise
    if result.checkpoint is None:
        raise TrainingError(f"training produced no checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    trained = finish_run(cfg, run_dir, inputs, state, val_batches)
    trained.caches = caches
    tracker.log(metrics={**numeric_metrics(trained.card.metrics["validation"], "validation."),
                         **numeric_metrics(trained.card.calibration, "calibration.")},
                tags={MODEL_TAG: trained.card.model_id, "medclf.threshold_rule": trained.card.threshold_rule},
                artifacts={name: storage.join(run_dir, name) for name in
                           ("model", "validation_report", "validation_report_patient", "history.parquet", "curves.png")})
    tracker.end()
    return trained


def make_trainer(cfg: Config, run_dir: str, loop_config: dict, loop=None, callbacks: Optional[list] = None,
                 **data_kwargs):
    """The TorchTrainer of the run: workers, checkpoints in the run folder, failures retried.
    `loop`: train_loop_per_worker unless a test streams with another."""
    import ray.train
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, placement_strategy=tc.placement_strategy,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name="ray_train",
            storage_path=run_dir if storage.is_remote(run_dir) else os.path.abspath(run_dir),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            logging_config=logs.train_logging_config(),  # no per-epoch "Reporting training result" dump unless -v
            callbacks=callbacks or [],  # e.g. rank 0's epoch metrics into MLflow, from the controller
            # Ray keeps the latest checkpoint (resume) plus the 2 best by the selection metric; each
            # holds the best-so-far weights too, so the kept model never depends on deleted files.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="epoch" if tc.select_by == "last" else tc.select_by,
                checkpoint_score_order="min" if tc.select_by == "val_loss" else "max")),
        **data_kwargs,
    )


def resolve_data_path(cfg: Config, caches: dict) -> Config:
    """train.data_path `auto` -> `memory` for data sets up to train.memory_limit_mb, else `stream`."""
    if cfg.train.data_path != "auto":
        return cfg
    size_mb = sum(c.rows for c in caches.values()) * cfg.preprocess.image_size ** 2 * 4 / 2**20
    path = "memory" if size_mb <= cfg.train.memory_limit_mb else "stream"
    say(f"data path: {path} ({size_mb:.0f} MB of images as float32; train.memory_limit_mb "
         f"{cfg.train.memory_limit_mb:g})")
    resolved = cfg.model_copy(deep=True)
    resolved.train.data_path = path
    return resolved


def feed(cfg: Config, inputs: TrainingInputs, caches: dict, run_dir: str) -> tuple[dict, dict, Callable[[], Iterable]]:
    """How the workers get the cached images (train.data_path): their shards of the cache streamed
    (Ray Data datasets), or the whole cache as arrays in the object store. Returns the loop config,
    the trainer's data arguments and, for the driver's finish step, a reader of the validation
    images as (rows, images) batches (streamed from the cache on the stream path: never held whole)."""
    import ray

    job = {"job": inputs.job(cfg).model_dump(mode="json")}
    if cfg.train.data_path == "memory":
        arrays = {"train_x": cache_mod.read_pixels(caches["train"], cfg.preprocess), "train_y": inputs.train_y,
                  "val_x": cache_mod.read_pixels(caches["val"], cfg.preprocess)}
        return {**job, "data_ref": ray.put(arrays)}, {}, lambda: in_batches(arrays["val_x"])
    buffer_mb = cfg.train.stream_buffer_mb
    datasets = {"train": cache_mod.dataset(caches["train"], seed=cfg.run.seed, buffer_mb=buffer_mb),
                "val": cache_mod.dataset(caches["val"], buffer_mb=buffer_mb)}
    return {**job, "run_dir": run_dir}, {"datasets": datasets, "dataset_config": cache_mod.shard_config(run_dir)}, \
        lambda: cache_mod.iter_pixels(caches["val"], cfg.preprocess, buffer_mb=buffer_mb)
