"""How many inference actors a scoring run starts (`score.num_actors`), `auto` resolved from the cluster.

On GPUs: one actor per GPU of the cluster, whichever nodes they are on (Ray places each actor, which
asks for one GPU, on a node that has one), so N GPUs over M nodes need no new code or config. A large
`score.batch_size` keeps each GPU busy. On CPUs: half the cluster's CPUs go to inference actors of
`cpus_per_actor` each, the other half to the decode tasks, which on full-size films cost as much.
"""

from __future__ import annotations

from medclf.errors import UserError


def resolve_num_actors(setting, use_gpu: bool, cpus_per_actor: float, resources: dict, per_gpu: int = 1) -> int:
    """`setting` (an int, or "auto") -> the number of actors; `resources`: ray.cluster_resources();
    `per_gpu`: actors sharing one GPU (score.actors_per_gpu)."""
    if setting != "auto":
        return int(setting)
    if use_gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise UserError("score.num_actors=auto with score.use_gpu=true, but the Ray cluster has no GPU "
                            "(set score.use_gpu=false, or start Ray on GPU nodes)")
        return gpus * per_gpu
    cpus = float(resources.get("CPU", 1))
    return max(1, int(cpus / 2 // cpus_per_actor))


def gpus_per_actor(use_gpu: bool, per_gpu: int = 1) -> float:
    """The GPU share each inference actor asks Ray for."""
    return 1.0 / per_gpu if use_gpu else 0
