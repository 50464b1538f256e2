"""Training on Ray Train: data prep on the driver, `train_loop_per_worker` on each worker.

Flow:
  1. discover the labelled files, carve a patient-level validation split (medclf.data);
  2. decode + preprocess every image once with the scoring stage (Ray Data tasks), so a bad
     file fails the run before training starts, and workers never re-decode per epoch;
  3. TorchTrainer runs `train_loop_per_worker` on N workers (DDP); each epoch reports metrics
     and a checkpoint (latest state + best-so-far weights); a restarted worker or a re-run of the
     same run id resumes from the latest checkpoint;
  4. the driver picks the decision threshold on validation scores of the best epoch and writes
     the model artifact, the metrics history (Parquet) and curves (PNG).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch

from medclf import data as data_mod
from medclf import storage
from medclf.config import Config, ConfigError
from medclf.metrics import choose_threshold, classification_metrics
from medclf.ood import fit_domain
from medclf.augment import augment_batch
from medclf.preprocess import to_model_input
from medclf.calibration import softmax_with_temperature
from medclf.models import (
    ModelCard,
    apply_transfer_mode,
    build_model,
    class_probabilities,
    count_parameters,
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
    "epoch_seconds": "wall time of the epoch (train + validation)",
}


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainResult:
    model_path: str
    history: pd.DataFrame
    card: ModelCard


# ---------------------------------------------------------------- worker side


def _lr_lambda(cfg: dict):
    epochs, warmup, kind = cfg["epochs"], cfg["warmup_epochs"], cfg["scheduler"]

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
    config: dict
    trainable: int
    total: int

    @classmethod
    def build(cls, config: dict, device: torch.device, wrap=lambda m: m) -> "TrainingParts":
        """`wrap`: ray.train.torch.prepare_model on a Train worker (DDP + device), identity otherwise."""
        mc, tc = config["model"], config["train"]
        model = build_model(mc["arch"], len(config["classes"]), mc["weights"], mc["dropout"])
        frozen = apply_transfer_mode(model, mc["arch"], mc["transfer"])
        trainable, total = count_parameters(model)
        if tc["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        model = wrap(model.to(device))
        params = [p for p in model.parameters() if p.requires_grad]
        if tc["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(params, lr=tc["lr"], momentum=0.9, weight_decay=tc["weight_decay"], nesterov=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=tc["lr"], weight_decay=tc["weight_decay"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tc))
        class_weights = torch.tensor(config["class_weights"], dtype=torch.float32, device=device)
        criterion = torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=tc["label_smoothing"])
        use_amp = device.type == "cuda"
        unwrapped = model.module if hasattr(model, "module") else model
        ema = None
        if tc["ema_decay"] > 0:
            # Weight averaging (torch's AveragedModel): the averaged copy, BatchNorm buffers included,
            # is what gets validated and saved; it generalises better than the last step's weights.
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(unwrapped, multi_avg_fn=get_ema_multi_avg_fn(tc["ema_decay"]), use_buffers=True)
        return cls(model, unwrapped, frozen, optimizer, scheduler, criterion, torch.amp.GradScaler("cuda", enabled=use_amp),
                   ema, use_amp, device, config, trainable, total)

    def step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment, forward, backward, optimiser step, weight average; returns (loss, logits)."""
        tc, pc = self.config["train"], self.config["preprocess"]
        if tc["augment"]["enabled"]:
            x = augment_batch(x.cpu(), tc["augment"], pc["mean"], pc["std"], gen)  # 1-channel form: 3x cheaper
        x = to_model_input(x.to(self.device))
        y = y.to(self.device)
        if tc["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
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


def train_loop_per_worker(config: dict) -> None:
    """The training loop Ray Train runs on every worker (one config dict in, reports out)."""
    import ray
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, TensorDataset

    tc = config["train"]
    # One progress line per epoch is ours; Train's own per-report INFO lines are noise here.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    device = ray.train.torch.get_device()

    arrays = ray.get(config["data_ref"])  # zero-copy from the object store
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # object-store arrays are read-only; we never write them
        train_ds = TensorDataset(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]))
        val_ds = TensorDataset(
            torch.from_numpy(arrays["val_x"]), torch.from_numpy(arrays["val_y"]), torch.arange(len(arrays["val_y"]))
        )
    train_loader = ray.train.torch.prepare_data_loader(
        DataLoader(train_ds, batch_size=tc["batch_size"], shuffle=True, num_workers=tc["loader_workers"], drop_last=len(train_ds) > tc["batch_size"] * world)
    )
    val_loader = ray.train.torch.prepare_data_loader(DataLoader(val_ds, batch_size=tc["batch_size"] * 2, shuffle=False))

    parts = TrainingParts.build(config, device, wrap=ray.train.torch.prepare_model)
    if rank == 0:
        mc = config["model"]
        _say(f"{mc['arch']} transfer={mc['transfer']}: {parts.trainable:,} of {parts.total:,} parameters trainable")
    model, unwrapped, ema, frozen = parts.model, parts.unwrapped, parts.ema, parts.frozen
    optimizer, scheduler, use_amp = parts.optimizer, parts.scheduler, parts.use_amp
    eval_model = ema.module if ema is not None else model
    select_key = tc["select_by"]

    # Where each worker runs (node id per rank), kept with the run for placement checks.
    workers = _gather([{"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "device": str(device)}])
    start_epoch, history = 0, []
    # best: the epoch kept (by select_by); lowest_loss: what early stopping watches
    best = {"val_loss": float("inf"), "score": -float("inf"), "epoch": -1, "state": None, "val_log_probs": None}
    lowest_loss = {"val_loss": float("inf"), "epoch": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        unwrapped.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            parts.scaler.load_state_dict(state["scaler"])
        start_epoch, history, best, lowest_loss = state["epoch"] + 1, state["history"], state["best"], state["lowest_loss"]
        if rank == 0:
            _say(f"resuming from the checkpoint of epoch {start_epoch}")

    gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    if ckpt and state.get("rng"):  # continue the random streams where the checkpointed epoch left them
        set_rng_state(state["rng"][rank], gen)
    epochs, patience = tc["epochs"], tc["early_stopping_patience"]
    run_start = time.time()
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        if world > 1:
            train_loader.sampler.set_epoch(epoch)
        set_train_mode(model, frozen)
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in train_loader:
            loss, logits = parts.step(x, y, gen)
            loss_sum += float(loss) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        train_seconds = time.time() - t0
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        eval_model.eval()
        idx_all, logp_all = [], []
        with torch.inference_mode():
            for x, _, idx in val_loader:
                x = to_model_input(x)
                if tc["channels_last"]:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    logits = eval_model(x)
                logp_all.extend(torch.log_softmax(logits.float(), 1).cpu().tolist())
                idx_all.extend(idx.cpu().tolist())
        # elapsed time travels with the totals so every worker takes the same time-box decision
        totals = _gather([(loss_sum, correct, seen, time.time() - run_start)])
        pairs = dict(zip(_gather(idx_all), _gather(logp_all)))  # DistributedSampler pads: dedupe by index
        val_log_probs = np.array([pairs[i] for i in sorted(pairs)], np.float32)
        vm = _validation_metrics(val_log_probs, arrays, config["positive_index"])
        n_seen = sum(t[2] for t in totals)
        row = {
            "epoch": epoch + 1,
            "train_loss": sum(t[0] for t in totals) / max(1, n_seen),
            "train_accuracy": sum(t[1] for t in totals) / max(1, n_seen),
            "val_loss": vm["log_loss"],
            "val_accuracy": vm["accuracy"],
            "val_roc_auc": vm["roc_auc"],
            "val_patient_roc_auc": vm["patient_roc_auc"],
            "lr": lr,
            "images_per_s": n_seen / max(train_seconds, 1e-9),
            "epoch_seconds": time.time() - t0,
        }
        history.append(row)
        score = -row["val_loss"] if select_key == "val_loss" else row[select_key]
        improved = score > best["score"] or best["epoch"] < 0
        if improved:
            kept = ema.module if ema is not None else unwrapped
            best = {
                "val_loss": row["val_loss"],
                "score": float(score),
                "epoch": epoch + 1,
                "state": {k: v.detach().cpu().clone() for k, v in kept.state_dict().items()},
                "val_log_probs": torch.from_numpy(val_log_probs),
            }
        if row["val_loss"] < lowest_loss["val_loss"]:
            lowest_loss = {"val_loss": row["val_loss"], "epoch": epoch + 1}
        stale = (epoch + 1) - lowest_loss["epoch"]
        elapsed = max(t[3] for t in totals)
        out_of_time = tc["max_minutes"] is not None and elapsed * (1 + 1 / (epoch + 1 - start_epoch)) > tc["max_minutes"] * 60
        stop = epoch + 1 < epochs and (stale >= patience or out_of_time)
        if rank == 0:
            left = (time.time() - run_start) / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
            _say(
                f"epoch {epoch + 1}/{epochs} train_loss {row['train_loss']:.4f} "
                f"val_loss {row['val_loss']:.4f} val_auc {row['val_roc_auc']:.4f} val_acc {row['val_accuracy']:.3f} "
                f"| {row['images_per_s']:.0f} img/s | {row['epoch_seconds']:.1f}s"
                + ("" if stop else f", ~{left:.0f}s left") + (" *" if improved else "")
                + (f" | early stop: no val_loss gain for {stale} epochs" if stop and stale >= patience else "")
                + (f" | stop: next epoch would pass train.max_minutes={tc['max_minutes']}" if stop and stale < patience else "")
            )
        metrics = {**row, "best_epoch": best["epoch"], "best_val_loss": best["val_loss"]}
        rng_states = _gather([rng_state(gen)])  # every rank's streams, in rank order
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(
                    {
                        "model": unwrapped.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "best": best,
                        "lowest_loss": lowest_loss,
                        "ema": ema.state_dict() if ema is not None else None,
                        "scaler": parts.scaler.state_dict(),
                        "rng": rng_states,
                        "workers": workers,
                    },
                    os.path.join(tmp, STATE_FILE),
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        if stop:
            break


def _validation_metrics(val_log_probs: np.ndarray, arrays: dict, positive_index) -> dict:
    """Epoch metrics on the selection part of validation, plus the patient-level part's AUC."""
    probs = np.exp(val_log_probs)
    select, patient = arrays["val_select"], arrays["val_patient"]
    vm = classification_metrics(arrays["val_y"][select], probs[select], positive_index, None)
    vm["patient_roc_auc"] = (classification_metrics(arrays["val_y"][patient], probs[patient], positive_index, None)
                             ["roc_auc"] if patient.any() else float("nan"))
    return vm


# ---------------------------------------------------------------- driver side


def preprocess_all(paths: list[str], cfg: Config) -> tuple[np.ndarray, list[str]]:
    """Decode + preprocess every image once (Ray Data tasks); returns tensors and error messages."""
    from medclf.images import images_dataset, text_or_none

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
    df = data_mod.assign_validation(df, cfg.data, cfg.run.seed)
    source = cfg.data.manifest or cfg.data.root or "data"
    data_mod.check_nonempty(df, classes, [cfg.data.train_split, cfg.data.val_split], source)
    if cfg.data.positive_class and len(classes) != 2:
        raise data_mod.DatasetError(f"data.positive_class is set but there are {len(classes)} classes {classes}")
    return df, classes


def shifted_scores(model: torch.nn.Module, val_x: np.ndarray, cfg: Config, positive_index: int,
                   temperature: float = 1.0) -> list[np.ndarray]:
    """Calibrated positive-class scores of the validation images under each acquisition shift."""
    from medclf.augment import ACQUISITION_SHIFTS, acquisition_shift

    x_all = torch.from_numpy(val_x)
    out = []
    with torch.inference_mode():
        for kind in ACQUISITION_SHIFTS:
            x = acquisition_shift(x_all, kind, cfg.preprocess.mean, cfg.preprocess.std)
            out.append(np.concatenate([class_probabilities(model(to_model_input(x[i:i + 128])), temperature)
                                       [:, positive_index].numpy() for i in range(0, len(x), 128)]))
    return out


def worker_config(cfg: Config, classes: list[str], train_y: np.ndarray) -> dict:
    """The plain-data part of the config dict a training process gets (see TrainingParts)."""
    counts = np.bincount(train_y, minlength=len(classes)).astype(float)
    if cfg.train.class_weighting == "balanced":
        class_weights = (counts.sum() / (len(classes) * np.maximum(counts, 1))).tolist()
    else:
        class_weights = [1.0] * len(classes)
    return {
        "classes": classes,
        "class_weights": class_weights,
        "seed": cfg.run.seed,
        "train": cfg.train.model_dump(),
        "model": cfg.model.model_dump(),
        "preprocess": cfg.preprocess.model_dump(),
    }


def run_training(cfg: Config, run_dir: str, prepared: tuple[pd.DataFrame, list[str]] | None = None,
                 restart: bool = False) -> TrainResult:
    """Train per `cfg`; `prepared` is `prepare_data(cfg)` when the caller already checked the data.
    A re-used run id resumes only if its classes, architecture, preprocessing and data are unchanged
    (check_resume); `restart` starts it over."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    df, classes = prepared or prepare_data(cfg)
    positive = cfg.data.positive_class or (classes[-1] if len(classes) == 2 else None)
    positive_index = classes.index(positive) if positive else None
    splits = {s: df[df["split"] == s].reset_index(drop=True) for s in (cfg.data.train_split, cfg.data.val_split)}
    log.info("train %d images, validation %d images, classes %s", *(len(v) for v in splits.values()), classes)
    print(
        f"[medclf] data: {len(splits[cfg.data.train_split])} train / {len(splits[cfg.data.val_split])} validation "
        f"images, {df[df.split.isin(list(splits))].patient_id.nunique()} patients, classes {classes}",
        flush=True,
    )
    storage.makedirs(run_dir)
    check_resume(run_dir, run_fingerprint(cfg, classes, df), restart)
    split_file = storage.join(run_dir, "splits.parquet")
    buf = df.to_parquet(index=False)
    storage.write_bytes(split_file, buf)

    arrays = {}
    for name, part in (("train", splits[cfg.data.train_split]), ("val", splits[cfg.data.val_split])):
        pixels, errors = preprocess_all(list(part["path"]), cfg)
        if errors:
            shown = "\n  ".join(errors[:10])
            raise data_mod.DatasetError(
                f"{len(errors)} unreadable image(s) in the {name} split; fix or remove them before training:\n  {shown}"
                + ("\n  ..." if len(errors) > 10 else "")
            )
        arrays[f"{name}_x"] = pixels
        arrays[f"{name}_y"] = np.array([classes.index(c) for c in part["label"]], np.int64)
    val_groups = validation_groups(splits[cfg.data.val_split])
    select_group = "family" if (val_groups == "family").any() else "patient"
    arrays["val_select"], arrays["val_patient"] = val_groups == select_group, val_groups == "patient"
    loop_config = {
        **worker_config(cfg, classes, arrays["train_y"]),
        "data_ref": ray.put(arrays),
        "positive_index": positive_index,
    }
    storage_path = run_dir if storage.is_remote(run_dir) else os.path.abspath(run_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name="ray_train",
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # Ray keeps the latest checkpoint (resume) plus the 2 best by the selection metric; each
            # holds the best-so-far weights too, so the kept model never depends on deleted files.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=cfg.train.select_by,
                checkpoint_score_order="min" if cfg.train.select_by == "val_loss" else "max",
            ),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise TrainingError(f"training produced no checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    best, history = state["best"], pd.DataFrame(state["history"])

    model = build_model(cfg.model.arch, len(classes), "none", cfg.model.dropout)
    model.load_state_dict(best["state"])
    log_probs = best["val_log_probs"].numpy()
    select = arrays["val_select"]
    temperature, calibration = fit_calibration(log_probs[select], arrays["val_y"][select], positive_index,
                                               f"{select_group} validation")
    val_probs = softmax_with_temperature(log_probs, temperature).astype(np.float32)
    threshold, rule = decision_threshold(cfg, model.eval(), temperature, val_probs[select], arrays["val_x"][select],
                                         arrays["val_y"][select], positive_index, select_group)
    val_metrics = {}
    for group in dict.fromkeys([select_group, "patient"]):  # the selection part first
        rows = val_groups == group
        if rows.any():
            val_metrics[group] = metrics_with_ci(arrays["val_y"][rows], val_probs[rows], positive_index, threshold, cfg)
            val_metrics[group].update(best_epoch=best["epoch"], n=int(rows.sum()))

    card = ModelCard(
        arch=cfg.model.arch,
        classes=classes,
        preprocess=cfg.preprocess.model_dump(),
        positive_class=positive,
        threshold=threshold,
        threshold_rule=rule,
        temperature=temperature,
        calibration=calibration,
        metrics={"validation": val_metrics[select_group], "selected_on": f"{select_group} validation",
                 **{f"validation_{group}": m for group, m in val_metrics.items()}},
        config=cfg.model_dump(mode="json"),
    )
    domain = fit_domain(model.eval(), cfg.model.arch, cfg, arrays["val_x"], arrays["val_y"],
                        list(splits[cfg.data.val_split]["path"]))  # the out-of-scope guard (medclf.ood)
    card.domain = domain and domain.record.model_dump()
    model_path = storage.join(run_dir, "model")
    card = save_artifact(model, card, model_path, domain and {domain.record.file: domain.to_bytes()})
    write_history(history, run_dir)
    val = splits[cfg.data.val_split]
    for group in val_metrics:
        rows = val_groups == group
        folder = "validation_report" if group == select_group else f"validation_report_{group}"
        write_validation_report(cfg, val[rows], classes, val_probs[rows], card, storage.join(run_dir, folder),
                                f"{group}-level validation split")
    storage.write_bytes(storage.join(run_dir, "workers.json"), json.dumps(state["workers"], indent=2).encode())
    return TrainResult(model_path, history, card)


def validation_groups(val: pd.DataFrame) -> np.ndarray:
    """Per validation row: `family` (held-out families / patient ranges) or `patient` (medclf.data)."""
    if data_mod.VAL_GROUP_COLUMN not in val:
        return np.full(len(val), "patient", dtype=object)
    return val[data_mod.VAL_GROUP_COLUMN].fillna("patient").to_numpy(dtype=object)


def fit_calibration(log_probs: np.ndarray, y: np.ndarray, positive_index, fitted_on: str) -> tuple[float, dict]:
    """Temperature fitted on validation log-probabilities; log loss and ECE before and after."""
    from medclf.calibration import fit_temperature, negative_log_likelihood
    from medclf.metrics import expected_calibration_error

    temperature = fit_temperature(log_probs, y)

    def ece(t: float) -> float:
        probs = softmax_with_temperature(log_probs, t)
        if positive_index is not None:
            return expected_calibration_error((y == positive_index).astype(int), probs[:, positive_index])
        return expected_calibration_error((probs.argmax(1) == y).astype(int), probs.max(1))

    calibration = {"method": "temperature", "fitted_on": fitted_on, "n": int(len(y)),
                   "log_loss_before": negative_log_likelihood(log_probs, y, 1.0),
                   "log_loss_after": negative_log_likelihood(log_probs, y, temperature),
                   "ece_before": ece(1.0), "ece_after": ece(temperature)}
    _say(f"calibration: temperature {temperature:.3f} fitted on {fitted_on} (n={len(y)}); ECE "
         f"{calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}, log loss "
         f"{calibration['log_loss_before']:.4f} -> {calibration['log_loss_after']:.4f}")
    return temperature, calibration


def decision_threshold(cfg: Config, model: torch.nn.Module, temperature: float, probs: np.ndarray, x: np.ndarray,
                       y: np.ndarray, positive_index, group: str) -> tuple[Optional[float], str]:
    """The operating point on calibrated validation scores (`train.threshold`); None for multi-class."""
    if positive_index is None:
        return None, "argmax"
    y_pos = (y == positive_index).astype(int)
    scores, labels = probs[:, positive_index], y_pos
    if cfg.train.threshold_validation == "shifted":
        shifted = shifted_scores(model, x, cfg, positive_index, temperature)
        scores = np.concatenate([scores, *shifted])
        labels = np.tile(y_pos, 1 + len(shifted))
    threshold = choose_threshold(labels, scores, cfg.train.threshold, cfg.train.target_sensitivity)
    rule = cfg.train.threshold + (f" {cfg.train.target_sensitivity:g}" if cfg.train.threshold == "target_sensitivity"
                                  else "") + f" on {cfg.train.threshold_validation} {group} validation, calibrated"
    _say(f"decision threshold {threshold:.4f} ({rule})")
    return threshold, rule


def metrics_with_ci(y: np.ndarray, probs: np.ndarray, positive_index, threshold, cfg: Config) -> dict:
    """Validation metrics at the stored operating point, with 95% bootstrap CIs for binary tasks."""
    from medclf.metrics import bootstrap_ci

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
    """The evaluation report (medclf.evaluate, same tables and plots) of the kept epoch on validation."""
    from medclf.evaluate import write_report
    from medclf.models import prob_column

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
    from medclf.plots import training_curves

    storage.write_bytes(storage.join(run_dir, "history.parquet"), history.to_parquet(index=False))
    storage.write_bytes(storage.join(run_dir, "curves.png"), training_curves(history))
