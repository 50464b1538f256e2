"""Ray start-up and run folders: what every job (and every benchmark) does before its work.

`init_ray` joins a cluster or starts a local Ray with medclf's allocator settings; `run_folder`
makes `<run.root>/<run id>`; on a multi-node cluster outputs must be on storage every node reaches.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone

from medclf import storage
from medclf.config import Config, ConfigError, dump_config


# glibc hands large freed blocks (a CNN's activations) back to the OS after every batch, and the kernel
# re-zeroes them page by page on the next one: on the 2-core VM that was ~60% of a training worker's
# CPU time. Keeping freed memory in the process (never mmap, never trim) made a training step 1.6x and
# inference 2.6x cheaper (docs/benchmarks.md); memory stays at the process's peak, which it reaches anyway.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**30), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}


# A local Ray started here has no dashboard, so no state API. Ray Train's PlacementGroupCleaner asks that
# API whether the run's controller is alive, and without an address asks whichever Ray started last on
# this machine (/tmp/ray/ray_current_cluster). If that is another Ray with a dashboard (a `ray start`, a
# second job's Ray), it does not find our controller there, takes it for dead and removes our workers'
# placement group mid-run (seen: a benchmark's workers killed after epoch 2 when another process
# started Ray). Pointed at no server, it keeps watching and never removes anything; a local cluster's
# placement groups end with the cluster anyway.
LOCAL_RAY_ENV = {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"}


def init_ray(cfg: Config) -> None:
    """Join the cluster in ray.address / RAY_ADDRESS, or start Ray in this process."""
    import ray

    if ray.is_initialized():
        return
    # Workers read the allocator settings at exec: a local raylet inherits this process's environment,
    # a cluster's workers get them through the job's runtime_env. A user's own setting wins.
    allocator = {k: os.environ.get(k, v) for k, v in ALLOCATOR_ENV.items()}
    os.environ.update(allocator)
    runtime_env = {"env_vars": allocator}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        runtime_env["env_vars"].update({k: os.environ.get(k, v) for k, v in LOCAL_RAY_ENV.items()})  # workers only
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True, runtime_env=runtime_env)


def node_count() -> int:
    import ray

    return len([n for n in ray.nodes() if n.get("Alive")])


def check_shared_storage(path: str, cfg: Config, what: str = "run.root") -> None:
    """Multi-node runs need outputs every node can reach: Ray Train writes checkpoints from worker
    nodes, and scoring commits predictions from wherever its write tasks run."""
    nodes = node_count()
    if nodes > 1 and not storage.is_remote(path) and not cfg.run.shared_filesystem:
        raise ConfigError(
            f"{what} '{path}' is a local path, but the Ray cluster has {nodes} nodes: checkpoints and outputs "
            "written on other nodes would not land there. Use object storage (s3://bucket/prefix; run.shared_root "
            "sets one used automatically on multi-node clusters), or set run.shared_filesystem=true if that path "
            "is a filesystem every node mounts."
        )


def use_shared_root(cfg: Config) -> None:
    """On a multi-node cluster, a local run.root gives way to run.shared_root when one is set."""
    if cfg.run.shared_root and not storage.is_remote(cfg.run.root) and not cfg.run.shared_filesystem \
            and node_count() > 1:
        print(f"multi-node cluster: run folders go to run.shared_root {cfg.run.shared_root}", file=sys.stderr)
        cfg.run.root = cfg.run.shared_root
    check_shared_storage(cfg.run.root, cfg)


def new_run_id(cfg: Config) -> str:
    return cfg.run.id or f"{cfg.run.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def run_folder(cfg: Config, run_id: str) -> str:
    path = storage.join(cfg.run.root, run_id)
    if not storage.is_remote(path):
        path = os.path.abspath(path)
        if "runtime_resources" in path and not os.path.isabs(cfg.run.root):
            # Under `ray job submit --working-dir`, a relative path lands in Ray's temporary copy.
            print(f"warning: run.root '{cfg.run.root}' is relative; this job's outputs go to {path}, which Ray "
                  "deletes with the session. Set --run-root to an absolute path or s3:// prefix.", file=sys.stderr)
    storage.makedirs(path)
    return path


def save_resolved_config(cfg: Config, run_dir: str, job: str) -> None:
    storage.write_bytes(storage.join(run_dir, f"{job}_config.yaml"), dump_config(cfg).encode())


def discard_unused_run_folder(run_dir: str, existed: bool, job: str) -> bool:
    """After a refused run (exit 2 or 3): remove the run folder this job created, if all it holds is
    the job's saved config (nothing was scored or trained), so a refusal leaves nothing behind."""
    if existed:
        return False
    fs, p = storage.filesystem(run_dir)
    try:
        files = [f for f in fs.find(p)]
    except FileNotFoundError:
        return False
    if any(os.path.basename(f.rstrip("/")) != f"{job}_config.yaml" for f in files):
        return False
    try:
        fs.rm(p, recursive=True)
    except FileNotFoundError:  # an object store has no empty folders to remove
        pass
    return True
