"""A training worker's batches (inside a Ray Train worker), by train.data_path: the whole
preprocessed cache as object-store arrays (MemoryData), or this worker's streamed shard of the cached
datasets with a seeded shuffle per epoch (ShardData).
"""

from __future__ import annotations

import functools
import warnings
from typing import Iterable, Optional

import torch

from medclf.data import cache as cache_mod
from medclf.train.parts import LoopConfig


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
