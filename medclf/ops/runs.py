"""Ray start-up and run folders: what every job (and every benchmark) does before its work.

`init_ray` joins a cluster or starts a local Ray with medclf's allocator settings; `run_folder`
makes `<run.root>/<run id>`; on a multi-node cluster outputs must be on storage every node reaches.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import datetime, timezone

from medclf import storage
from medclf.config import Config, ConfigError, dump_config
from medclf.ops import logs


# glibc hands large freed blocks (a CNN's activations) back to the OS after every batch, and the kernel
# re-zeroes them page by page on the next one: on the 2-core VM that was ~60% of a training worker's
# CPU time. Keeping freed memory in the process (never mmap, never trim) made a training step 1.6x and
# inference 2.6x cheaper (docs/benchmarks.md); memory stays at the process's peak, which it reaches anyway.
# One arena: Ray Data's actors and Ray Train's workers run user code in a thread, and a thread's arena is
# a 64 MiB heap, so any larger block (a batch's activations) was mmapped afresh whatever the threshold:
# the pneumonia model's forward pass in an actor's thread ran at 108 images/s without it, 137 with it
# (bfloat16: 167 and 233; docs/performance.md).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**30), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),
                 "MALLOC_ARENA_MAX": "1"}


# Ray Train's PlacementGroupCleaner (a detached actor, one per training run) asks the state API every
# second whether the run's controller is alive, and removes the workers' placement group when it is not.
# With no RAY_API_SERVER_ADDRESS it asks whichever Ray started last on this machine
# (/tmp/ray/ray_current_cluster): another Ray with a dashboard (a `ray start`, a second job) does not know
# our controller, and our workers were killed mid-run (a benchmark, after epoch 2). Pointing it at a closed
# port stopped that, but every failed query then logged "Failed to query Ray Train Controller actor state"
# (50 lines of a 243-line demo). So a local Ray that may train starts its own state API (the dashboard, on
# 127.0.0.1 and a free port) and the cleaner is pointed at that one: it finds our controller alive and stays silent.
def local_ray_options(num_cpus: int | None = None, state_api: bool = True) -> dict:
    """`ray.init` keyword arguments for a local Ray (jobs and the tests' session cluster alike).

    `state_api`: start the dashboard, whose state API Ray Train's cleaner needs (above). Jobs that never
    train (score, explain) leave it out: on the 2-core build machine it added 1.5 s to Ray's start and
    about a second to the first run's start-up, its processes starting on the same cores
    (docs/performance.md)."""
    if not state_api:
        return {"num_cpus": num_cpus, "include_dashboard": False}
    port = _free_port()
    return {"num_cpus": num_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}  # workers only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(cfg: Config, state_api: bool = True) -> None:
    """Join the cluster in ray.address / RAY_ADDRESS, or start Ray in this process; `state_api` False (jobs
    that never run Ray Train) starts a local Ray without the dashboard (`local_ray_options`)."""
    import ray

    if ray.is_initialized():
        return
    # Workers read the allocator settings at exec: a local raylet inherits this process's environment,
    # a cluster's workers get them through the job's runtime_env. A user's own setting wins.
    allocator = {k: os.environ.get(k, v) for k, v in ALLOCATOR_ENV.items()}
    os.environ.update(allocator)
    if logs.verbose():  # workers on a joined cluster learn -v through the job's environment
        allocator[logs.VERBOSE_ENV] = "1"
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": True, "logging_level": logs.ray_logging_level()}
    if address:
        ray.init(address=address, runtime_env={"env_vars": allocator}, **quiet)
    else:
        options = local_ray_options(cfg.ray.num_cpus, state_api)
        if "runtime_env" in options:  # (none without the state API: the local raylet's workers inherit this environment)
            options["runtime_env"]["env_vars"].update(allocator)
        ray.init(**options, **quiet)
    logs.quiet_python_warnings()  # also for library callers (the notebook), not only the CLI's run_command
    logs.configure_ray_data()


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
