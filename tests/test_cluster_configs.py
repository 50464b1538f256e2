"""Every YAML under cluster/ and configs/ parses, and the fields that matter agree with the code."""

import glob
import os
import re
import shlex

import pytest
import yaml

from medclf.cli import COMMANDS
from medclf.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAMLS = sorted(glob.glob(os.path.join(ROOT, "cluster", "**", "*.yaml"), recursive=True))


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def entrypoints(doc):
    """Every job command line in a KubeRay manifest (RayJob or RayCronJob)."""
    spec = doc.get("spec", {})
    for holder in (spec, spec.get("jobTemplate", {})):
        if "entrypoint" in holder:
            yield holder["entrypoint"], holder


def test_cluster_yamls_exist_and_parse():
    names = {os.path.relpath(p, ROOT) for p in CLUSTER_YAMLS}
    assert {"cluster/aws.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob-train.yaml",
            "cluster/kuberay/raycronjob-score.yaml"} <= names
    for p in CLUSTER_YAMLS:
        assert isinstance(load(p), dict), p


@pytest.mark.parametrize("path", [p for p in CLUSTER_YAMLS if "kuberay" in p])
def test_kuberay_manifests(path):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in {"RayCluster", "RayJob", "RayCronJob"}
    spec = doc["spec"]
    if doc["kind"] == "RayCronJob":
        assert len(spec["schedule"].split()) == 5 and spec["concurrencyPolicy"] == "Forbid"
    cluster = spec.get("rayClusterSpec") or spec.get("jobTemplate", {}).get("rayClusterSpec") or spec
    assert cluster["rayVersion"] == "2.60.0"
    gpus_per_worker_pod = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                           for g in cluster["workerGroupSpecs"]]
    for command, _ in entrypoints(doc):
        argv = shlex.split(command)
        assert argv[0] == "python" and argv[1].startswith("jobs/")
        job = os.path.basename(argv[1])[:-3]
        assert os.path.exists(os.path.join(ROOT, argv[1])) and job in COMMANDS
        args = COMMANDS[job][0]().parse_args(argv[2:])  # the job accepts these options
        overrides = [o for o in args.overrides]
        cfg = load_config(os.path.join(ROOT, args.config), overrides)
        assert args.run_root.startswith("s3://")  # multi-node runs keep checkpoints and outputs on shared storage
        if job == "train":
            # one GPU per train worker: the workers fit on the GPUs the worker group offers
            assert cfg.train.use_gpu and cfg.train.num_workers <= max(gpus_per_worker_pod) * max(
                g["maxReplicas"] for g in cluster["workerGroupSpecs"])
        if job == "score" and cfg.score.use_gpu:
            assert cfg.score.num_actors <= sum(gpus_per_worker_pod)


def test_aws_launcher_config():
    doc = load(os.path.join(ROOT, "cluster", "aws.yaml"))
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types and types[doc["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 4]
    assert gpu_types and all(t["max_workers"] <= doc["max_workers"] for t in types.values())
    assert any("pip install" in c and "-e ." in c for c in doc["setup_commands"])


def test_local_cluster_script_mentions_every_command():
    text = open(os.path.join(ROOT, "cluster", "local.sh")).read()
    for word in ("start", "add-worker", "stop", "status"):
        assert re.search(rf"^\s+{word}\)", text, re.M), word
