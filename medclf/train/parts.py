"""One training process's working parts: model, optimiser, schedule, loss, AMP scaler and weight
average (TrainingParts), built from the typed config the process gets (LoopConfig).

Shared by the Ray Train loop (medclf.train.loop) and the plain single-process loop of the throughput
benchmark, so both do exactly the same work per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from medclf.config import Config, TrainConfig
from medclf.data.augment import augment_batch
from medclf.imaging.preprocess import to_model_input
from medclf.model.networks import apply_transfer_mode, build_model, count_parameters, predicting_model


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


def worker_config(cfg: Config, classes: list[str], train_y: np.ndarray, **derived) -> LoopConfig:
    """The typed config a training process gets (see TrainingParts); `derived`: LoopConfig's data fields."""
    counts = np.bincount(train_y, minlength=len(classes)).astype(float)
    if cfg.train.class_weighting == "balanced":
        class_weights = (counts.sum() / (len(classes) * np.maximum(counts, 1))).tolist()
    else:
        class_weights = [1.0] * len(classes)
    return LoopConfig(cfg=cfg, classes=classes, class_weights=class_weights, n_train=len(train_y), **derived)
