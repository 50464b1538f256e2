"""Every YAML under cluster/ and configs/ parses, and the fields that matter agree with the code."""

import glob
import os
import re
import shlex

import pytest
import yaml

from medclf.cli import COMMANDS
from medclf.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
            "cluster/kuberay/raycronjob-score.yaml", "cluster/kuberay/rayservice-serve.yaml"} <= names
    for p in CLUSTER_YAMLS:
        assert isinstance(load(p), dict), p


@pytest.mark.parametrize("path", [p for p in CLUSTER_YAMLS if "kuberay" in p])
def test_kuberay_manifests(path):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in {"RayCluster", "RayJob", "RayCronJob", "RayService"}
    if doc["kind"] == "RayService":  # the Serve application builds from the config it names
        from medclf.score.serve import app_builder

        serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        for app in serve_config["applications"]:
            assert app["import_path"] == "medclf.score.serve:app_builder" and callable(app_builder)
            cfg = load_config(os.path.join(ROOT, app["args"]["config"]), app["args"].get("set", []))
            assert cfg.serve.max_replicas >= cfg.serve.min_replicas
    spec = doc["spec"]
    if doc["kind"] == "RayCronJob":
        assert len(spec["schedule"].split()) == 5
    cluster = (spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
               or spec.get("jobTemplate", {}).get("rayClusterSpec") or spec)
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


def test_serve_token_comes_from_a_kubernetes_secret_and_the_job_api_is_not_open():
    """Issue 34: every RayService pod reads MEDCLF_SERVE_TOKEN from a Secret (never a literal or the config);
    the launchers keep the dashboard / job API on 127.0.0.1 (reached through SSH or kubectl port-forward)."""
    from medclf.score.auth import TOKEN_ENV

    doc = load(os.path.join(ROOT, "cluster", "kuberay", "rayservice-serve.yaml"))
    cluster = doc["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert TOKEN_ENV in env and "value" not in env[TOKEN_ENV], container["name"]
            ref = env[TOKEN_ENV]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"]
    assert "token" not in doc["spec"]["serveConfigV2"].lower()
    aws = load(os.path.join(ROOT, "cluster", "aws.yaml"))
    head = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    local = open(os.path.join(ROOT, "cluster", "local.sh")).read()
    assert "--dashboard-host 127.0.0.1" in local and "0.0.0.0" not in local


def test_local_cluster_script_mentions_every_command():
    text = open(os.path.join(ROOT, "cluster", "local.sh")).read()
    for word in ("start", "add-worker", "stop", "status"):
        assert re.search(rf"^\s+{word}\)", text, re.M), word


# ---------------------------------------------------------------- against the real schemas

CRD_DIR = os.path.join(os.path.dirname(ROOT), "shared", "kuberay")
KUBERAY_YAMLS = [p for p in CLUSTER_YAMLS if "kuberay" in p]


def crd_schema(kind):
    """The openAPIV3Schema of `kind` (version v1) from the KubeRay CRDs in ../shared/kuberay."""
    for path in glob.glob(os.path.join(CRD_DIR, "*.yaml")):
        crd = load(path)
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            return version["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD for kind {kind} in {CRD_DIR}")


TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


def strict_errors(value, schema, where="") -> list[str]:
    """What `kubectl apply --validate=strict` would reject: unknown fields (unless the schema node
    says x-kubernetes-preserve-unknown-fields), wrong types, values outside an enum, missing required."""
    if "anyOf" in schema or schema.get("x-kubernetes-int-or-string"):
        if schema.get("x-kubernetes-int-or-string") and isinstance(value, (int, str)) and not isinstance(value, bool):
            return []
        options = [strict_errors(value, s, where) for s in schema.get("anyOf", [])]
        return [] if any(not o for o in options) else [f"{where}: matches none of {schema.get('anyOf')}"]
    kind = schema.get("type")
    if kind and not (isinstance(value, TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))):
        return [f"{where}: {value!r} is not of type {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not one of {schema['enum']}"]
    errors = []
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        props = schema.get("properties")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}.{key}: required field missing")
        for key, sub in value.items():
            if props is not None and key in props:
                errors += strict_errors(sub, props[key], f"{where}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += strict_errors(sub, schema["additionalProperties"], f"{where}.{key}")
            elif props is not None or kind == "object" and where != ".metadata":
                errors.append(f"{where}.{key}: unknown field")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += strict_errors(item, schema["items"], f"{where}[{i}]")
    return errors


@pytest.mark.skipif(not os.path.isdir(CRD_DIR), reason=f"KubeRay CRDs not found at {CRD_DIR}")
@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=os.path.basename)
def test_kuberay_manifests_pass_strict_validation_against_the_crds(path):
    doc = load(path)
    schema = crd_schema(doc["kind"])
    assert strict_errors(doc, schema) == []


@pytest.mark.skipif(not os.path.isdir(CRD_DIR), reason=f"KubeRay CRDs not found at {CRD_DIR}")
def test_strict_validation_catches_what_kubectl_would():
    schema = crd_schema("RayCronJob")
    doc = load(os.path.join(ROOT, "cluster", "kuberay", "raycronjob-score.yaml"))
    doc["spec"]["concurrencyPolicy"] = "Forbid"  # the field KubeRay does not have
    doc["spec"]["jobTemplate"]["backoffLimit"] = "two"
    errors = strict_errors(doc, schema)
    assert ".spec.concurrencyPolicy: unknown field" in errors
    assert any(e.startswith(".spec.jobTemplate.backoffLimit: 'two' is not of type integer") for e in errors)
    del doc["spec"]["schedule"]
    assert ".spec.schedule: required field missing" in strict_errors(doc, schema)


def test_aws_launcher_config_matches_rays_schema():
    import json

    import jsonschema
    import ray

    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as f:
        schema = json.load(f)
    doc = load(os.path.join(ROOT, "cluster", "aws.yaml"))
    jsonschema.validate(doc, schema)  # raises with the offending field named
    broken = {**doc, "max_workers": "many"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
