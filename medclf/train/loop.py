"""The loop Ray Train runs on every worker (`train_loop_per_worker`): resume from the latest
checkpoint, then per epoch train, validate, keep the best epoch, stop early or on the time box, and
report a progress line and a checkpoint.

TorchTrainer pickles `train_loop_per_worker` by reference (module and name): it stays a top-level
function of this module, which every worker imports.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from medclf.config import TrainConfig
from medclf.model.networks import set_train_mode
from medclf.ops import logs
from medclf.ops.logs import say
from medclf.report.metrics import classification_metrics
from medclf.train.parts import LoopConfig, TrainingParts
from medclf.train.worker_data import worker_data


STATE_FILE = "state.pt"


# Per-epoch history columns (history.parquet).
HISTORY_COLUMNS = {
    "epoch": "1-based epoch number",
    "train_loss": "mean training loss (class-weighted if configured)",
    "train_accuracy": "training accuracy (augmented images)",
    "val_loss": "validation cross-entropy (unweighted), on the selection part of validation (the family part "
                "under data.val_scheme=family, else all of it)",
    "val_accuracy": "validation accuracy (argmax), same part",
    "val_roc_auc": "validation ROC AUC (binary; one-vs-rest macro for multi-class), same part",
    "val_patient_roc_auc": "ROC AUC on the patient-level part of validation (the training archive's own patients)",
    "lr": "learning rate used in the epoch",
    "images_per_s": "training images per second, all workers together",
    "data_wait_fraction": "share of the training time a worker waited for its next batch (mean over workers)",
    "epoch_seconds": "wall time of the epoch (train + validation)",
}


def rng_state(gen: torch.Generator) -> dict:
    """This process's random streams (torch, numpy, the augmentation generator), weights_only-safe."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "generator": gen.get_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def _gather(values: list) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def train_loop_per_worker(loop_config: dict) -> None:
    """The training loop Ray Train runs on every worker: resume, then per epoch train, validate,
    decide (best epoch, early stop, time box), report a line and a checkpoint."""
    import ray.train
    import ray.train.torch

    job = LoopConfig.model_validate(loop_config["job"])
    tc = job.cfg.train
    logs.quiet_train_worker()  # our epoch line is enough; -v brings Ray Train's reports back
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(job.cfg.run.seed + rank)
    device = ray.train.torch.get_device()
    parts = TrainingParts.build(job, device, wrap=ray.train.torch.prepare_model)
    if rank == 0:
        mc = job.cfg.model
        say(f"{mc.arch} transfer={mc.transfer}: {parts.trainable:,} of {parts.total:,} parameters trainable")
    # Where each worker runs (node id per rank), kept with the run for placement checks.
    workers = _gather([{"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "device": str(device)}])
    state, gen = resume(parts, ray.train.get_checkpoint(), rank)
    start_epoch, run_start = state.next_epoch, time.time()
    data = worker_data(job, loop_config, rank, world, start_epoch)
    for epoch in range(start_epoch, tc.epochs):
        t0 = time.time()
        loss_sum, correct, seen, waited = train_one_epoch(parts, data.train_batches(epoch), gen)
        train_seconds = time.time() - t0
        lr = parts.optimizer.param_groups[0]["lr"]
        parts.scheduler.step()
        val_log_probs = validate(parts, data.val_batches())
        # elapsed time travels with the totals so every worker takes the same time-box decision
        totals = _gather([(loss_sum, correct, seen, time.time() - run_start, waited)])
        row = epoch_row(epoch, totals, val_log_probs, job, lr, train_seconds, time.time() - t0)
        improved = state.record(row, parts.eval_model, val_log_probs, tc.select_by)
        stop = stop_reason(state, start_epoch, max(t[3] for t in totals), tc)
        if rank == 0:
            say(progress_line(row, tc, stop, improved, (time.time() - run_start) / (epoch + 1 - start_epoch)))
        save_checkpoint(parts, state, _gather([rng_state(gen)]), workers, rank)
        if stop:
            break


@dataclass
class LoopState:
    """What carries over from epoch to epoch (and through a checkpoint): the history, the epoch kept
    (by train.select_by) and the lowest validation loss (what early stopping watches)."""

    next_epoch: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_loss": float("inf"), "score": -float("inf"), "epoch": -1,
                                                "state": None, "val_log_probs": None})
    lowest_loss: dict = field(default_factory=lambda: {"val_loss": float("inf"), "epoch": 0})

    def record(self, row: dict, kept: torch.nn.Module, val_log_probs: np.ndarray, select_by: str) -> bool:
        """Add an epoch's row; keep its weights if it is the best so far. Returns whether it is."""
        self.history.append(row)
        self.next_epoch = row["epoch"]
        if select_by == "last":  # every epoch replaces the one before: the schedule's end is kept
            score = row["epoch"]
        else:
            score = -row["val_loss"] if select_by == "val_loss" else row[select_by]
        improved = score > self.best["score"] or self.best["epoch"] < 0
        if improved:
            self.best = {"val_loss": row["val_loss"], "score": float(score), "epoch": row["epoch"],
                         "state": {k: v.detach().cpu().clone() for k, v in kept.state_dict().items()},
                         "val_log_probs": torch.from_numpy(val_log_probs)}
        if row["val_loss"] < self.lowest_loss["val_loss"]:
            self.lowest_loss = {"val_loss": row["val_loss"], "epoch": row["epoch"]}
        return improved


def stop_reason(state: LoopState, start_epoch: int, elapsed: float, tc: TrainConfig) -> str:
    """Why training ends after the epoch just recorded ('' to go on): early stop on validation loss,
    or the time box (the next epoch, at the mean epoch time so far, would end past train.max_minutes)."""
    done = state.next_epoch
    if done >= tc.epochs:
        return ""
    stale = done - state.lowest_loss["epoch"]
    if stale >= tc.early_stopping_patience and tc.select_by != "last":
        return f"early stop: no val_loss gain for {stale} epochs"
    if tc.max_minutes is not None and elapsed * (1 + 1 / (done - start_epoch)) > tc.max_minutes * 60:
        return f"stop: next epoch would pass train.max_minutes={tc.max_minutes}"
    return ""


def resume(parts: TrainingParts, ckpt, rank: int) -> tuple[LoopState, torch.Generator]:
    """The loop state and this rank's augmentation generator, from the latest checkpoint if any."""
    gen = torch.Generator().manual_seed(parts.job.cfg.run.seed * 1000 + rank)
    if not ckpt:
        return LoopState(), gen
    with ckpt.as_directory() as d:
        saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    parts.unwrapped.load_state_dict(saved["model"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    if parts.ema is not None:
        parts.ema.load_state_dict(saved["ema"])
    if saved.get("scaler"):
        parts.scaler.load_state_dict(saved["scaler"])
    if saved.get("rng"):  # continue the random streams where the checkpointed epoch left them
        set_rng_state(saved["rng"][rank], gen)
    state = LoopState(saved["epoch"] + 1, saved["history"], saved["best"], saved["lowest_loss"])
    if rank == 0:
        say(f"resuming from the checkpoint of epoch {state.next_epoch}")
    return state, gen


def train_one_epoch(parts: TrainingParts, batches: Iterable, gen: torch.Generator) -> tuple[float, int, int, float]:
    """One pass over this worker's batches; returns (summed loss, correct, images, seconds spent
    waiting for batches) of this worker."""
    set_train_mode(parts.model, parts.frozen)
    loss_sum, correct, seen, waited = 0.0, 0, 0, 0.0
    batches, asked = iter(batches), time.perf_counter()
    for x, y in batches:
        waited += time.perf_counter() - asked
        loss, logits = parts.step(x, y, gen)
        loss_sum += float(loss) * len(y)
        correct += int((logits.argmax(1).cpu() == y.cpu()).sum())
        seen += len(y)
        asked = time.perf_counter()
    return loss_sum, correct, seen, waited


def validate(parts: TrainingParts, batches: Iterable) -> np.ndarray:
    """Validation log-probabilities of every validation row, gathered from all workers, in row order."""
    parts.share_norm_statistics()
    parts.eval_model.eval()
    rows, log_probs = [], []
    with torch.inference_mode():
        for x, row in batches:
            log_probs.extend(parts.log_probs(x).tolist())
            rows.extend(row.cpu().tolist())
    pairs = dict(zip(_gather(rows), _gather(log_probs)))  # a padded sampler repeats rows: dedupe by row
    return np.array([pairs[i] for i in sorted(pairs)], np.float32)


def epoch_row(epoch: int, totals: list, val_log_probs: np.ndarray, job: LoopConfig, lr: float,
              train_seconds: float, epoch_seconds: float) -> dict:
    """The epoch's history row (HISTORY_COLUMNS) from every worker's (loss sum, correct, seen, elapsed,
    seconds waited for batches)."""
    vm = _validation_metrics(val_log_probs, job)
    n_seen = sum(t[2] for t in totals)
    return {
        "epoch": epoch + 1,
        "train_loss": sum(t[0] for t in totals) / max(1, n_seen),
        "train_accuracy": sum(t[1] for t in totals) / max(1, n_seen),
        "val_loss": vm["log_loss"],
        "val_accuracy": vm["accuracy"],
        "val_roc_auc": vm["roc_auc"],
        "val_patient_roc_auc": vm["patient_roc_auc"],
        "lr": lr,
        "images_per_s": n_seen / max(train_seconds, 1e-9),
        "data_wait_fraction": sum(t[4] for t in totals) / len(totals) / max(train_seconds, 1e-9),
        "epoch_seconds": epoch_seconds,
    }


def _validation_metrics(val_log_probs: np.ndarray, job: LoopConfig) -> dict:
    """Epoch metrics on the selection part of validation, plus the patient-level part's AUC."""
    probs = np.exp(val_log_probs)
    y, select, patient = np.array(job.val_y), np.array(job.val_select, bool), np.array(job.val_patient, bool)
    vm = classification_metrics(y[select], probs[select], job.positive_index, None)
    vm["patient_roc_auc"] = (classification_metrics(y[patient], probs[patient], job.positive_index, None)
                             ["roc_auc"] if patient.any() else float("nan"))
    return vm


def progress_line(row: dict, tc: TrainConfig, stop: str, improved: bool, seconds_per_epoch: float) -> str:
    """The one line per epoch the driver's log shows."""
    left = seconds_per_epoch * (tc.epochs - row["epoch"])
    return (f"epoch {row['epoch']}/{tc.epochs} train_loss {row['train_loss']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_auc {row['val_roc_auc']:.4f} val_acc {row['val_accuracy']:.3f} "
            f"| {row['images_per_s']:.0f} img/s, {row['data_wait_fraction']:.0%} waiting for data "
            f"| {row['epoch_seconds']:.1f}s"
            + ("" if stop else f", ~{left:.0f}s left") + (" *" if improved else "")
            + (f" | {stop}" if stop else ""))


def save_checkpoint(parts: TrainingParts, state: LoopState, rng_states: list, workers: list, rank: int) -> None:
    """Report the epoch's metrics; rank 0 adds the checkpoint (latest state + best-so-far weights)."""
    import ray.train

    row = state.history[-1]
    metrics = {**row, "best_epoch": state.best["epoch"], "best_val_loss": state.best["val_loss"]}
    if rank != 0:
        ray.train.report(metrics)
        return
    ema = parts.ema
    saved = {"model": parts.unwrapped.state_dict(), "optimizer": parts.optimizer.state_dict(),
             "scheduler": parts.scheduler.state_dict(), "epoch": row["epoch"] - 1, "history": state.history,
             "best": state.best, "lowest_loss": state.lowest_loss, "ema": ema.state_dict() if ema is not None else None,
             "scaler": parts.scaler.state_dict(), "rng": rng_states, "workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(saved, os.path.join(tmp, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
