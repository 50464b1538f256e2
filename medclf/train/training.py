"""Training on Ray Train: data prep on the driver, `train_loop_per_worker` on each worker.

Flow:
  1. discover the labelled files, carve a patient-level validation split (medclf.data.labelled);
  2. decode + preprocess every image once with the scoring stage (Ray Data tasks) into the
     preprocessed cache (medclf.data.cache: Parquet shards keyed by the files and the preprocessing),
     so a bad file fails the run before training starts, and a resume or re-run reuses it;
  3. TorchTrainer runs `train_loop_per_worker` on N workers (DDP); each streams its shard of the
     cache (train.data_path=stream: Ray Data, a seeded shuffle per epoch; `memory`: the whole cache
     as object-store arrays), and each epoch reports metrics and a checkpoint (latest state +
     best-so-far weights); a restarted worker or a re-run of the same run id resumes from the
     latest checkpoint;
  4. the driver picks the decision threshold on validation scores of the best epoch and writes
     the model artifact, the metrics history (Parquet) and curves (PNG).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from medclf.data import cache as cache_mod
from medclf.data import labelled as data_mod
from medclf import storage
from medclf.model import card as model_card
from medclf.config import Config, ConfigError, TrainConfig
from medclf.report.metrics import choose_threshold, classification_metrics
from medclf.monitor.ood import embed, fit_domain, in_batches
from medclf.monitor.reference import fit_reference
from medclf.data.augment import augment_batch
from medclf.imaging.preprocess import to_model_input
from medclf.model.calibration import softmax_with_temperature
from medclf.ops import logs
from medclf.ops.tracking import MODEL_TAG, Tracker, numeric_metrics
from medclf.model.artifact import (
    ModelCard,
    apply_transfer_mode,
    build_model,
    class_probabilities,
    count_parameters,
    predicting_model,
    save_artifact,
    set_train_mode,
)

log = logging.getLogger(__name__)
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


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainResult:
    model_path: str
    history: pd.DataFrame
    card: ModelCard
    caches: Optional[dict] = None  # split name -> medclf.data.cache.SplitCache (built or reused)


# ---------------------------------------------------------------- worker side


def _lr_lambda(tc: TrainConfig):
    epochs, warmup, kind = tc.epochs, tc.warmup_epochs, tc.scheduler

    def factor(epoch: int) -> float:
        if warmup and epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        if kind == "cosine":
            progress = (epoch - warmup) / max(1, epochs - warmup)
            return 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "step":
            return 0.1 ** ((epoch - warmup) // max(1, (epochs - warmup) // 3))
        return 1.0

    return factor


def _say(message: str) -> None:
    # Ray Train V2 patches print() to tee into its logger, which doubles each line in the
    # driver's output; writing to stdout directly prints once.
    sys.stdout.write(f"[medclf] {message}\n")
    sys.stdout.flush()


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


FINGERPRINT_FILE = "run_fingerprint.json"


class ResumeError(ConfigError):
    """A re-used run id whose checkpoints were made for other inputs."""


def run_fingerprint(cfg: Config, classes: list[str], df: pd.DataFrame) -> dict:
    """What a run id's checkpoints are only valid for: classes, architecture, preprocessing, data."""
    listing = df.sort_values("path")[[c for c in ("path", "label", "split") if c in df.columns]]
    return {"classes": list(classes), "architecture": cfg.model.arch, "preprocessing": cfg.preprocess.model_dump(),
            "data listing": hashlib.sha256(listing.to_csv(index=False).encode()).hexdigest()}


def check_resume(run_dir: str, fingerprint: dict, restart: bool = False) -> None:
    """Refuse to resume a run id whose inputs changed (naming what changed), unless `restart`,
    which drops the run's checkpoints and starts over. Records the fingerprint for the next re-use."""
    path = storage.join(run_dir, FINGERPRINT_FILE)
    if restart:
        checkpoints = storage.join(run_dir, "ray_train")
        if storage.exists(checkpoints):
            fs, p = storage.filesystem(checkpoints)
            fs.rm(p, recursive=True)
    elif storage.exists(path):
        before = json.loads(storage.read_bytes(path))
        changed = [k for k in fingerprint if before.get(k) != fingerprint[k]]
        if changed:
            detail = "; ".join(f"{k}: was {before.get(k)!r}, now {fingerprint[k]!r}" for k in changed
                               if k != "data listing")
            raise ResumeError(
                f"{run_dir}: this run id was started with other {', '.join(changed)}"
                + (f" ({detail})" if detail else "")
                + "; its checkpoints do not fit. Use a new run id, or --restart to start this run over.")
    storage.write_bytes(path, json.dumps(fingerprint, indent=2).encode())


def _gather(values: list) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


class LoopConfig(BaseModel):
    """What a training process gets: the run's typed config plus what the driver derived from the data.

    It travels as `model_dump(mode="json")` and is validated again in the worker, so the loop reads
    typed fields (`job.cfg.train.epochs`), never raw dict keys.
    """

    model_config = ConfigDict(extra="forbid")
    cfg: Config
    classes: list[str]
    class_weights: list[float]
    positive_index: Optional[int] = None
    n_train: int = 0
    val_y: list[int] = Field(default_factory=list)
    """Validation labels, by validation row (the order of the validation split)."""
    val_select: list[bool] = Field(default_factory=list)
    """Validation rows the epoch is selected on (the family part under data.val_scheme=family)."""
    val_patient: list[bool] = Field(default_factory=list)
    """Validation rows of the patient-level part."""


@dataclass
class TrainingParts:
    """Model, optimiser, schedule, loss, AMP scaler and weight average for one training process.

    Shared by the Ray Train loop and the plain single-process loop of the throughput benchmark,
    so both do exactly the same work per batch.
    """

    model: torch.nn.Module
    unwrapped: torch.nn.Module
    frozen: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: torch.nn.Module
    scaler: torch.amp.GradScaler
    ema: object
    use_amp: bool
    device: torch.device
    job: LoopConfig
    trainable: int
    total: int

    @classmethod
    def build(cls, job: LoopConfig, device: torch.device, wrap=lambda m: m) -> "TrainingParts":
        """`wrap`: ray.train.torch.prepare_model on a Train worker (DDP + device), identity otherwise."""
        mc, tc = job.cfg.model, job.cfg.train
        model = build_model(mc.arch, len(job.classes), mc.weights, mc.dropout)
        frozen = apply_transfer_mode(model, mc.arch, mc.transfer)
        trainable, total = count_parameters(model)
        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = wrap(model.to(device))
        params = [p for p in model.parameters() if p.requires_grad]
        if tc.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=tc.lr, momentum=0.9, weight_decay=tc.weight_decay, nesterov=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tc))
        class_weights = torch.tensor(job.class_weights, dtype=torch.float32, device=device)
        criterion = torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=tc.label_smoothing)
        use_amp = device.type == "cuda"
        unwrapped = model.module if hasattr(model, "module") else model
        ema = None
        if tc.ema_decay > 0:
            # Weight averaging (torch's AveragedModel): the averaged copy, BatchNorm buffers included,
            # is what gets validated and saved; it generalises better than the last step's weights.
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(unwrapped, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
        return cls(model, unwrapped, frozen, optimizer, scheduler, criterion, torch.amp.GradScaler("cuda", enabled=use_amp),
                   ema, use_amp, device, job, trainable, total)

    @property
    def eval_model(self) -> torch.nn.Module:
        """What is validated and kept: the weight average when on, else the plain (not DDP) module."""
        return self.ema.module if self.ema is not None else self.unwrapped

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = to_model_input(x.to(self.device))
        return x.contiguous(memory_format=torch.channels_last) if self.job.cfg.train.channels_last else x

    def step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment, forward, backward, optimiser step, weight average; returns (loss, logits)."""
        tc, pc = self.job.cfg.train, self.job.cfg.preprocess
        if tc.augment.enabled:
            x = augment_batch(x.cpu(), tc.augment.model_dump(), pc.mean, pc.std, gen)  # 1-channel form: 3x cheaper
        x, y = self._input(x), y.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            logits = self.model(x)
            loss = self.criterion(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.unwrapped)
        return loss.detach(), logits.detach()

    def share_norm_statistics(self) -> None:
        """Average the kept model's BatchNorm running statistics over the workers (timm's
        distribute_bn). DDP leaves each worker's updated by its own last batch; every worker scores a
        shard of validation, and all of it must be scored by the one model that is saved."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() < 2:
            return
        for buffer in self.eval_model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)  # a sum: gloo has no average
                buffer.div_(dist.get_world_size())
            else:
                dist.broadcast(buffer, src=0)  # counters (num_batches_tracked)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Validation forward pass of the kept model: log-probabilities on the CPU."""
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            logits = predicting_model(self.eval_model, self.job.cfg.model.test_time_hflip)(self._input(x))
        return torch.log_softmax(logits.float(), 1).cpu()


# ------------------------------------------------ the worker loop and its parts


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
        _say(f"{mc.arch} transfer={mc.transfer}: {parts.trainable:,} of {parts.total:,} parameters trainable")
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
            _say(progress_line(row, tc, stop, improved, (time.time() - run_start) / (epoch + 1 - start_epoch)))
        save_checkpoint(parts, state, _gather([rng_state(gen)]), workers, rank)
        if stop:
            break


class WorkerData:
    """This worker's batches: `train_batches(epoch)` -> (x, y), `val_batches()` -> (x, validation row)."""

    def train_batches(self, epoch: int) -> Iterable:
        raise NotImplementedError

    def val_batches(self) -> Iterable:
        raise NotImplementedError


class MemoryData(WorkerData):
    """The whole preprocessed data set as arrays in the object store; DataLoaders with Ray's sampler."""

    def __init__(self, job: LoopConfig, arrays_ref, world: int):
        import ray
        import ray.train.torch
        from torch.utils.data import DataLoader, TensorDataset

        bs = job.cfg.train.batch_size
        arrays = ray.get(arrays_ref)  # zero-copy from the object store
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # object-store arrays are read-only; we never write them
            train = TensorDataset(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]))
            val = TensorDataset(torch.from_numpy(arrays["val_x"]), torch.arange(len(arrays["val_x"])))
        self.world = world
        self.train = ray.train.torch.prepare_data_loader(DataLoader(
            train, batch_size=bs, shuffle=True, num_workers=job.cfg.train.loader_workers,
            drop_last=len(train) > bs * world))
        self.val = ray.train.torch.prepare_data_loader(DataLoader(val, batch_size=bs * 2, shuffle=False))

    def train_batches(self, epoch: int) -> Iterable:
        if self.world > 1:
            self.train.sampler.set_epoch(epoch)
        return self.train

    def val_batches(self) -> Iterable:
        return self.val


class ShardData(WorkerData):
    """This worker's shards of the cached datasets (Ray Data), streamed: a seeded shuffle per epoch."""

    def __init__(self, job: LoopConfig, rank: int, world: int, run_dir: Optional[str] = None, start_epoch: int = 0):
        import ray.train

        self.job, self.rank, self.world = job, rank, world
        # Before the shards are made (by whichever rank asks first): their block order starts at this
        # epoch. Every rank writes the same value, so the first to ask has always written it.
        if run_dir:
            cache_mod.announce_start_epoch(run_dir, start_epoch)
        self.train, self.val = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    def train_batches(self, epoch: int, second: str = "label") -> Iterable:
        """(x, label) batches; `second="row"`: (x, row of the split) instead, to see what a shard holds."""
        tc, spec = self.job.cfg.train, self.job.cfg.preprocess
        return self.train.iter_torch_batches(
            batch_size=tc.batch_size, drop_last=self.job.n_train > tc.batch_size * self.world,
            local_shuffle_buffer_size=max(tc.shuffle_buffer, tc.batch_size) if tc.shuffle_buffer else None,
            local_shuffle_seed=shuffle_seed(self.job.cfg.run.seed, epoch, self.rank),
            collate_fn=functools.partial(cache_mod.torch_batch, spec=spec, second=second))

    def val_batches(self) -> Iterable:
        return self.val.iter_torch_batches(
            batch_size=self.job.cfg.train.batch_size * 2,
            collate_fn=functools.partial(cache_mod.torch_batch, spec=self.job.cfg.preprocess, second="row"))


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The local shuffle's seed: another order every epoch and worker, the same on every run."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**32


def worker_data(job: LoopConfig, loop_config: dict, rank: int, world: int, start_epoch: int = 0) -> WorkerData:
    if job.cfg.train.data_path == "memory":
        return MemoryData(job, loop_config["data_ref"], world)
    return ShardData(job, rank, world, loop_config["run_dir"], start_epoch)


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
        _say(f"resuming from the checkpoint of epoch {state.next_epoch}")
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


# ---------------------------------------------------------------- driver side


def preprocess_all(paths: list[str], cfg: Config) -> tuple[np.ndarray, list[str]]:
    """Decode + preprocess every image once (Ray Data tasks); returns tensors and error messages."""
    from medclf.imaging.stage import images_dataset, text_or_none

    ds = images_dataset(paths, cfg.preprocess, cfg.score.decode_batch_size)
    pixels = np.zeros((len(paths), 1, cfg.preprocess.image_size, cfg.preprocess.image_size), np.float32)
    where = {p: i for i, p in enumerate(paths)}
    errors: list[str] = []
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        for j, (path, err) in enumerate(zip(batch["path"], text_or_none(batch["error"]))):
            if err is not None:
                errors.append(str(err))
            else:
                pixels[where[str(path)]] = batch["pixels"][j]
    return pixels, errors


def prepare_data(cfg: Config) -> tuple[pd.DataFrame, list[str]]:
    """Discover + split + validate; raises before any heavy work on bad data."""
    df = data_mod.discover(cfg.data)
    classes = data_mod.class_names(df, cfg.data)
    split_seed = cfg.run.seed if cfg.data.split_seed is None else cfg.data.split_seed
    df = data_mod.assign_validation(df, cfg.data, split_seed)
    source = cfg.data.manifest or cfg.data.root or "data"
    data_mod.check_nonempty(df, classes, [cfg.data.train_split, cfg.data.val_split], source)
    if cfg.data.positive_class and len(classes) != 2:
        raise data_mod.DatasetError(f"data.positive_class is set but there are {len(classes)} classes {classes}")
    return df, classes


def shifted_scores(model: torch.nn.Module, val_x: np.ndarray, cfg: Config, positive_index: int,
                   temperature: float = 1.0) -> list[np.ndarray]:
    """Calibrated positive-class scores of the validation images under each acquisition shift."""
    from medclf.data.augment import ACQUISITION_SHIFTS, acquisition_shift

    x_all = torch.from_numpy(val_x)
    out = []
    with torch.inference_mode():
        for kind in ACQUISITION_SHIFTS:
            x = acquisition_shift(x_all, kind, cfg.preprocess.mean, cfg.preprocess.std)
            out.append(np.concatenate([class_probabilities(model(to_model_input(x[i:i + 128])), temperature)
                                       [:, positive_index].numpy() for i in range(0, len(x), 128)]))
    return out


def worker_config(cfg: Config, classes: list[str], train_y: np.ndarray, **derived) -> LoopConfig:
    """The typed config a training process gets (see TrainingParts); `derived`: LoopConfig's data fields."""
    counts = np.bincount(train_y, minlength=len(classes)).astype(float)
    if cfg.train.class_weighting == "balanced":
        class_weights = (counts.sum() / (len(classes) * np.maximum(counts, 1))).tolist()
    else:
        class_weights = [1.0] * len(classes)
    return LoopConfig(cfg=cfg, classes=classes, class_weights=class_weights, n_train=len(train_y), **derived)


@dataclass
class TrainingInputs:
    """The run's data as the driver sees it: splits, labels as class indices, validation groups."""

    classes: list[str]
    positive: Optional[str]
    train: pd.DataFrame
    val: pd.DataFrame
    train_y: np.ndarray
    val_y: np.ndarray
    val_groups: np.ndarray

    @property
    def positive_index(self) -> Optional[int]:
        return self.classes.index(self.positive) if self.positive else None

    @property
    def select_group(self) -> str:
        """The validation part the epoch, temperature and threshold are chosen on."""
        return "family" if (self.val_groups == "family").any() else "patient"

    def job(self, cfg: Config) -> LoopConfig:
        return worker_config(cfg, self.classes, self.train_y, positive_index=self.positive_index,
                             val_y=self.val_y.tolist(), val_select=(self.val_groups == self.select_group).tolist(),
                             val_patient=(self.val_groups == "patient").tolist())


def start_run(cfg: Config, run_dir: str, prepared, restart: bool) -> TrainingInputs:
    """Split, print the data line, check a re-used run id may resume, record the splits."""
    df, classes = prepared or prepare_data(cfg)
    positive = cfg.data.positive_class or (classes[-1] if len(classes) == 2 else None)
    train, val = (df[df["split"] == s].reset_index(drop=True) for s in (cfg.data.train_split, cfg.data.val_split))
    log.info("train %d images, validation %d images, classes %s", len(train), len(val), classes)
    _say(f"data: {len(train)} train / {len(val)} validation images, "
         f"{df[df.split.isin([cfg.data.train_split, cfg.data.val_split])].patient_id.nunique()} patients, "
         f"classes {classes}")
    storage.makedirs(run_dir)
    check_resume(run_dir, run_fingerprint(cfg, classes, df), restart)
    storage.write_bytes(storage.join(run_dir, "splits.parquet"), df.to_parquet(index=False))
    labels = {name: np.array([classes.index(c) for c in part["label"]], np.int64) for name, part in
              (("train", train), ("val", val))}
    return TrainingInputs(classes, positive, train, val, labels["train"], labels["val"], validation_groups(val))


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


def resolve_data_path(cfg: Config, caches: dict) -> Config:
    """train.data_path `auto` -> `memory` for data sets up to train.memory_limit_mb, else `stream`."""
    if cfg.train.data_path != "auto":
        return cfg
    size_mb = sum(c.rows for c in caches.values()) * cfg.preprocess.image_size ** 2 * 4 / 2**20
    path = "memory" if size_mb <= cfg.train.memory_limit_mb else "stream"
    _say(f"data path: {path} ({size_mb:.0f} MB of images as float32; train.memory_limit_mb "
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


def finish_run(cfg: Config, run_dir: str, inputs: TrainingInputs, state: dict, val_batches) -> TrainResult:
    """From the best epoch's weights and validation scores: calibration, threshold, metrics with CIs,
    the model artifact, history, curves and validation reports. `val_batches()`: the validation
    images as (rows, images) batches (feed)."""
    best, history, group = state["best"], pd.DataFrame(state["history"]), inputs.select_group
    model = build_model(cfg.model.arch, len(inputs.classes), "none", cfg.model.dropout)
    model.load_state_dict(best["state"])
    model = predicting_model(model, cfg.model.test_time_hflip)  # as validated, and as the artifact predicts
    log_probs, select, y = best["val_log_probs"].numpy(), inputs.val_groups == group, inputs.val_y
    temperature, calibration = fit_calibration(log_probs[select], y[select], inputs.positive_index,
                                               f"{group} validation")
    val_probs = softmax_with_temperature(log_probs, temperature).astype(np.float32)
    threshold, rule = decision_threshold(cfg, model.eval(), temperature, val_probs[select],
                                         lambda: gather_rows(val_batches(), select),
                                         y[select], inputs.positive_index, group)
    val_metrics = {}
    for part in dict.fromkeys([group, "patient"]):  # the selection part first
        rows = inputs.val_groups == part
        if rows.any():
            val_metrics[part] = metrics_with_ci(y[rows], val_probs[rows], inputs.positive_index, threshold, cfg)
            val_metrics[part].update(best_epoch=best["epoch"], n=int(rows.sum()))
    card = ModelCard(
        arch=cfg.model.arch, classes=inputs.classes, preprocess=cfg.preprocess.model_dump(),
        positive_class=inputs.positive, threshold=threshold, threshold_rule=rule, temperature=temperature,
        test_time_hflip=cfg.model.test_time_hflip, calibration=calibration, config=cfg.model_dump(mode="json"),
        metrics={"validation": val_metrics[group], "selected_on": f"{group} validation",
                 **{f"validation_{part}": m for part, m in val_metrics.items()}},
        intended_use=cfg.model_card.model_dump(),
        provenance=model_card.provenance(cfg, pd.concat([inputs.train, inputs.val]), inputs.classes),
        failure_modes=model_card.failure_modes(list(inputs.val["path"][select]), y[select], val_probs[select],
                                               inputs.classes, threshold, inputs.positive_index, cfg.report.show_paths))
    if cfg.train.adapt_verdict:  # does score.adapt=bn help this model? (medclf.train.adapt_verdict)
        from medclf.train.adapt_verdict import measure_verdict, verdict_line

        card.adaptation = measure_verdict(model.eval(), cfg.model.arch, cfg.model.transfer,
                                          gather_rows(val_batches(), select), y[select], inputs.positive_index,
                                          temperature, cfg.preprocess.mean, cfg.preprocess.std,
                                          cfg.score.adapt_sample, cfg.run.seed)
        _say(verdict_line(card.adaptation))
    embedding = embed(model.eval(), cfg.model.arch, val_batches(), len(y))  # one pass, batch by batch
    domain = fit_domain(cfg, embedding, y, list(inputs.val["path"]))  # the out-of-scope guard (medclf.monitor.ood)
    card.domain = domain and domain.record.model_dump()
    reference = fit_reference(card, embedding, y, list(inputs.val["path"]), domain, cfg.run.seed)  # medclf.monitor.drift
    card.reference = reference.record.model_dump()
    files = {reference.record.file: reference.to_bytes(), **({domain.record.file: domain.to_bytes()} if domain else {})}
    model_path = storage.join(run_dir, "model")
    card = save_artifact(model, card, model_path, files)
    model_card.write(card, model_path)
    write_history(history, run_dir)
    for part in val_metrics:
        rows = inputs.val_groups == part
        folder = "validation_report" if part == group else f"validation_report_{part}"
        write_validation_report(cfg, inputs.val[rows], inputs.classes, val_probs[rows], card,
                                storage.join(run_dir, folder), f"{part}-level validation split")
    storage.write_bytes(storage.join(run_dir, "workers.json"), json.dumps(state["workers"], indent=2).encode())
    return TrainResult(model_path, history, card)


def gather_rows(batches: Iterable, rows: np.ndarray) -> np.ndarray:
    """The images of the rows selected by the mask `rows`, in row order, from (rows, images) batches."""
    position = np.cumsum(rows) - 1
    out = None
    for index, x in batches:
        keep = rows[index]
        if out is None:
            out = np.empty((int(rows.sum()), *x.shape[1:]), x.dtype)
        out[position[index[keep]]] = x[keep]
    return out


def validation_groups(val: pd.DataFrame) -> np.ndarray:
    """Per validation row: `family` (held-out families / patient ranges) or `patient` (medclf.data.labelled)."""
    if data_mod.VAL_GROUP_COLUMN not in val:
        return np.full(len(val), "patient", dtype=object)
    return val[data_mod.VAL_GROUP_COLUMN].fillna("patient").to_numpy(dtype=object)


def fit_calibration(log_probs: np.ndarray, y: np.ndarray, positive_index, fitted_on: str) -> tuple[float, dict]:
    """Temperature fitted on validation log-probabilities; log loss and ECE before and after."""
    from medclf.model.calibration import fit_temperature_checked, negative_log_likelihood
    from medclf.report.metrics import expected_calibration_error

    fit = fit_temperature_checked(log_probs, y)  # warns itself when the fit sat on a bound
    temperature = fit.temperature

    def ece(t: float) -> float:
        probs = softmax_with_temperature(log_probs, t)
        if positive_index is not None:
            return expected_calibration_error((y == positive_index).astype(int), probs[:, positive_index])
        return expected_calibration_error((probs.argmax(1) == y).astype(int), probs.max(1))

    calibration = {"method": "temperature", "fitted_on": fitted_on, "n": int(len(y)), "status": fit.status,
                   **({"note": fit.message} if fit.message else {}),
                   "log_loss_before": negative_log_likelihood(log_probs, y, 1.0),
                   "log_loss_after": negative_log_likelihood(log_probs, y, temperature),
                   "ece_before": ece(1.0), "ece_after": ece(temperature)}
    how = "kept (no finite fit, see warning)" if fit.status == "fallback" else "fitted"
    _say(f"calibration: temperature {temperature:.3f} {how} on {fitted_on} (n={len(y)}); ECE "
         f"{calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}, log loss "
         f"{calibration['log_loss_before']:.4f} -> {calibration['log_loss_after']:.4f}")
    return temperature, calibration


def decision_threshold(cfg: Config, model: torch.nn.Module, temperature: float, probs: np.ndarray, x,
                       y: np.ndarray, positive_index, group: str) -> tuple[Optional[float], str]:
    """The operating point on calibrated validation scores (`train.threshold`); None for multi-class.
    `x()`: the validation images, read only when the threshold is chosen on shifted copies of them."""
    if positive_index is None:
        return None, "argmax"
    y_pos = (y == positive_index).astype(int)
    scores, labels = probs[:, positive_index], y_pos
    if cfg.train.threshold_validation == "shifted":
        shifted = shifted_scores(model, x(), cfg, positive_index, temperature)
        scores = np.concatenate([scores, *shifted])
        labels = np.tile(y_pos, 1 + len(shifted))
    threshold = choose_threshold(labels, scores, cfg.train.threshold, cfg.train.target_sensitivity)
    rule = cfg.train.threshold + (f" {cfg.train.target_sensitivity:g}" if cfg.train.threshold == "target_sensitivity"
                                  else "") + f" on {cfg.train.threshold_validation} {group} validation, calibrated"
    _say(f"decision threshold {threshold:.4f} ({rule})")
    return threshold, rule


def metrics_with_ci(y: np.ndarray, probs: np.ndarray, positive_index, threshold, cfg: Config) -> dict:
    """Validation metrics at the stored operating point, with 95% bootstrap CIs for binary tasks."""
    from medclf.report.metrics import bootstrap_ci

    metrics = classification_metrics(y, probs, positive_index, threshold)
    y_pos = (y == positive_index).astype(int) if positive_index is not None else None
    if y_pos is not None and len(np.unique(y_pos)) == 2 and cfg.evaluate.bootstrap_resamples:
        ci = bootstrap_ci(y_pos, probs[:, positive_index], threshold, cfg.evaluate.bootstrap_resamples,
                          cfg.evaluate.bootstrap_seed)
        for r in ci.itertuples():
            metrics[f"{r.metric}_ci_low"], metrics[f"{r.metric}_ci_high"] = r.ci_low, r.ci_high
    return metrics


def write_validation_report(cfg: Config, val: pd.DataFrame, classes: list[str], val_probs: np.ndarray,
                            card: ModelCard, output: str, what: str) -> None:
    """The evaluation report (medclf.report.evaluate, same tables and plots) of the kept epoch on validation."""
    from medclf.report.evaluate import write_report
    from medclf.model.artifact import prob_column

    frame = pd.DataFrame({"path": val["path"].to_numpy(), "label": val["label"].to_numpy(), "status": "ok",
                          "threshold": np.nan if card.threshold is None else card.threshold,
                          "model_id": card.model_id})
    frame["format"] = [p.rsplit(".", 1)[-1].lower() for p in frame["path"]]
    for k, c in enumerate(classes):
        frame[prob_column(c)] = val_probs[:, k]
    ec = cfg.evaluate
    write_report(frame, output, classes, card.positive_class,
                 ec.bootstrap_resamples, ec.bootstrap_seed, None, ec.target_sensitivity,
                 {"predictions": f"{what} of {cfg.data.root or cfg.data.manifest}", "labels": "training labels",
                  "temperature": card.temperature})


def write_history(history: pd.DataFrame, run_dir: str) -> None:
    from medclf.report.plots import training_curves

    storage.write_bytes(storage.join(run_dir, "history.parquet"), history.to_parquet(index=False))
    storage.write_bytes(storage.join(run_dir, "curves.png"), training_curves(history))
