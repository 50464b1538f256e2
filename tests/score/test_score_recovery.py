"""Nightly scoring that a kill at any point cannot corrupt, and that two runs cannot write at once.

Faults are injected at named stages (medclf.ops.faults, `MEDCLF_FAULT`), never by timing. Each run is
`jobs/score.py` in a subprocess joined to the test session's Ray cluster, as a scheduler runs it.
"""

import os
import subprocess
import sys
import time

import pytest

from medclf.score.lease import LEASE_HELD_EXIT, read_lease
from medclf.data.predictions import read_predictions

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEASE_SECONDS = 2.0


def score_job(input_dir, model, output, tmp_path, run_id, fault=None, once=None, wait=True, own_ray=False):
    """`jobs/score.py` as a subprocess: on the tests' session cluster, or (own_ray) on a Ray of its own,
    as two scheduler runs on two machines would be."""
    import ray

    where = ["--set", "ray.num_cpus=2"] if own_ray else ["--set", f"ray.address={ray.get_runtime_context().gcs_address}"]
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "score.py"), "--config", os.path.join(ROOT, "configs", "demo.yaml"),
           "--input", str(input_dir), "--model", model, "--output", str(output), "--run-root", str(tmp_path / "runs"),
           "--run-id", run_id, *where,
           "--set", "score.cpus_per_actor=0.5", "--set", "score.extensions=[.png]", "--set", "score.rows_per_file=4",
           "--set", "score.batch_size=4", "--set", "score.decode_batch_size=4",
           "--set", f"score.lease_seconds={LEASE_SECONDS}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCLF_FAULT")}
    if fault:
        env["MEDCLF_FAULT"] = fault
    if once:
        env["MEDCLF_FAULT_ONCE"] = once
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if not wait:
        return proc
    start = time.time()
    out, err = proc.communicate(timeout=600)
    print(f"{run_id} ({fault or 'no fault'}): exit {proc.returncode} after {time.time() - start:.0f}s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained artifact: recovery is about rows, not about how good the scores are (and it
    spares the tests a Ray Train run)."""
    from medclf.model.artifact import ModelCard, save_artifact
    from medclf.model.networks import build_model

    path = str(tmp_path_factory.mktemp("recovery") / "model")
    save_artifact(build_model("small_cnn", 2), ModelCard(arch="small_cnn", classes=["NORMAL", "POSITIVE"],
                                                         preprocess={"image_size": 32}), path)
    return path


def temp_files(folder):
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".tmp")]


def test_kill_at_every_stage_then_every_input_is_scored_exactly_once(ray_cluster, model, phantom_root, tmp_path):
    archive = os.path.join(phantom_root, "test")
    expected = {os.path.join(d, f) for d, _, fs in os.walk(archive) for f in fs if f.endswith(".png")}
    out = tmp_path / "pred"
    out.mkdir()  # an empty pre-created output is a valid start
    stages = ["leased", "listing", "before_commit", "after_commit", "before_release"]
    for i, stage in enumerate(stages):
        job = score_job(archive, model, out, tmp_path, f"night-{i}", fault=f"{stage}:kill")
        assert job.returncode in (137, -9), f"{stage}: {job.returncode} {job.stderr[-2000:]}"
        assert read_lease(str(out)) is not None  # a dead run leaves its lease behind ...
        if stage == "before_commit":
            assert temp_files(out), "the kill between write and publish should leave a temporary file"
        time.sleep(LEASE_SECONDS + 0.3)  # ... which the next run may take over once it expired
        committed = read_predictions(str(out))
        assert not committed.duplicated("path").any(), f"duplicate rows after the kill at {stage}"
    assert 0 < len(committed) == len(expected), "the before_release kill comes after every commit"

    final = score_job(archive, model, out, tmp_path, "night-final")
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"took over the expired lease of run night-{len(stages) - 1}" in final.stderr
    n = len(expected)
    assert f"scored 0, skipped {n} ({n} already scored, 0 not an image), failed 0" in final.stdout
    pred = read_predictions(str(out))
    assert set(pred.path) == expected and len(pred) == len(expected)  # every input exactly once
    assert temp_files(out) == [] and read_lease(str(out)) is None
    # the after_commit kill kept its commits (here all of them: 24 rows are one part file, so the
    # before_release night found nothing left to write)
    assert "night-3" in set(pred.run_id)


def test_a_retried_write_task_adds_no_rows(ray_cluster, model, phantom_root, tmp_path):
    archive = os.path.join(phantom_root, "test")
    n = sum(f.endswith(".png") for _, _, fs in os.walk(archive) for f in fs)
    out, once = tmp_path / "pred", tmp_path / "fired"
    # The first write task to commit loses its worker right after publishing: Ray runs it again.
    job = score_job(archive, model, out, tmp_path, "retried", fault="after_commit:exit",
                    once=str(once))
    assert job.returncode == 0, job.stderr[-3000:]
    assert once.exists(), "the fault should have fired"
    pred = read_predictions(str(out))
    assert len(pred) == n and not pred.duplicated("path").any()
    assert f"scored {n}, skipped 0 (0 already scored, 0 not an image), failed 0" in job.stdout


def test_two_concurrent_runs_on_s3_one_refuses(ray_cluster, model, phantom_root, s3_bucket, tmp_path):
    from tests.score.test_score_s3 import upload_test_split

    archive, out = f"{s3_bucket}/archive", f"{s3_bucket}/predictions"
    urls = upload_test_split(phantom_root, archive)
    n = sum(u.endswith(".png") for u in urls)
    go = tmp_path / "go"
    first = score_job(archive, model, out, tmp_path, "first", fault=f"leased:wait={go}", wait=False)
    try:
        deadline = time.time() + 120
        while read_lease(out) is None and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)  # waits for a state (the lease exists), not for a guessed duration
        assert read_lease(out)["run_id"] == "first"
        second = score_job(archive, model, out, tmp_path, "second")
        assert second.returncode == LEASE_HELD_EXIT, second.stderr[-2000:]
        assert f"error: {out} is being written by run first" in second.stderr
    finally:
        go.touch()
    stdout, stderr = first.communicate(timeout=400)
    assert first.returncode == 0, stderr[-3000:]
    pred = read_predictions(out)
    assert len(pred) == n and not pred.duplicated("path").any() and set(pred.run_id) == {"first"}
    assert read_lease(out) is None  # released: a tombstone (released: true) stays, no live lease
