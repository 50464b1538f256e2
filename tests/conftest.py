"""Shared fixtures: small phantom datasets, one local Ray cluster, one tiny trained model.

Everything is generated here; nothing is downloaded and no GPU is needed.
"""

from __future__ import annotations

import os

import pytest

from medclf.config import load_config
from medclf.data.phantoms import PATIENT_REGEX, generate
from medclf.imaging.privacy import UID_KEY_ENV

# score.uids=hash (the default) needs a site key; set before Ray starts, so workers and jobs see it.
os.environ.setdefault(UID_KEY_ENV, "test-site-key")
# Serving refuses to start without a bearer token (medclf.score.auth); Serve replicas read it from their env.
os.environ.setdefault("MEDCLF_SERVE_TOKEN", "test-serve-token-0123456789abcdef")
# The test PACS's user (tests/score/test_pacs.py): credentials reach Ray's read tasks through the environment only,
# so they are set before Ray starts, as a site sets them for its workers.
os.environ.setdefault("MEDCLF_DICOMWEB_USER", "medclf-test")
os.environ.setdefault("MEDCLF_DICOMWEB_PASSWORD", "test-password-not-secret")
# On a loaded 2-core machine the raylet's dashboard agent can take over Ray's 30 s default to register,
# and the node then dies at start-up; the tests wait longer instead of failing on load.
os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")

TINY = [
    "run.name=test",
    "data.classes=[NORMAL, POSITIVE]",
    "data.positive_class=POSITIVE",
    "data.extensions=[.png]",
    f"data.patient_regex='{PATIENT_REGEX}'",
    "preprocess.image_size=32",
    "model.arch=small_cnn",
    "train.epochs=1",
    "train.batch_size=16",
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "train.augment=true",
    "score.batch_size=16",
    "score.decode_batch_size=8",
    "score.cpus_per_actor=0.5",
    # The shared model has no out-of-scope guard: the tests using it check rows and scores, and a
    # guard fitted on ~12 validation phantoms flags some in-domain ones. tests/monitor/test_ood.py trains with it.
    "ood.enabled=false",
]


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("phantoms"))
    generate(root, n_train=60, n_test=24, image_size=32, seed=7)
    return root


@pytest.fixture
def tiny_config(phantom_root, tmp_path):
    return load_config(None, TINY + [f"data.root={phantom_root}", f"run.root={tmp_path / 'runs'}"])


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto, server mode) on 127.0.0.1 for this test session."""
    from medclf.ops.devserver import local_s3_server

    with local_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; returns its s3:// URL."""
    import re

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One in-process Ray for the whole session (2 CPUs, no dashboard)."""
    import ray

    if ray.is_initialized():  # a test that started Ray by itself must not break the session
        ray.shutdown()
    from medclf.ops.runs import local_ray_options

    # as the jobs start it: its own state API, so another Ray on the machine cannot reap our train workers
    ray.init(**local_ray_options(2), log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def trained_model(ray_cluster, phantom_root, tmp_path_factory):
    """A 1-epoch model trained with Ray Train on the tiny phantoms (shared by scoring tests)."""
    from medclf.train.driver import run_training

    run_dir = str(tmp_path_factory.mktemp("train_run"))
    cfg = load_config(None, TINY + [f"data.root={phantom_root}", f"run.root={run_dir}"])
    result = run_training(cfg, os.path.join(run_dir, "run"))
    return result



RAY_FIXTURES = {"ray_cluster"}  # every fixture that starts Ray depends on this one (trained_model does)


def pytest_collection_modifyitems(config, items):
    """A test that reaches the session Ray through its fixtures is marked `ray` here, whether or not its
    file says so: `make test-fast` (-m "not ray") then never starts Ray. One rule, in one place."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)
