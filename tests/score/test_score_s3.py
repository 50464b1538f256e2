"""Scoring against a real S3-compatible server (moto, server mode, 127.0.0.1): listing, reading,
writing, incremental nightly re-runs, --rescore, and a run killed halfway then restarted."""

import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import s3fs

from medclf import storage
from medclf.config import load_config
from medclf.data.predictions import read_predictions
from medclf.score.batch import run_scoring
from tests.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fs():
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})


def upload_test_split(phantom_root, dest, limit=None):
    files = sorted(os.path.join(d, f) for d, _, fs_ in os.walk(os.path.join(phantom_root, "test")) for f in fs_)
    files = files[:limit] if limit else files
    s3 = fs()
    urls = []
    for f in files:
        url = f"{dest}/{os.path.relpath(f, phantom_root)}"
        s3.pipe(url, open(f, "rb").read())
        urls.append(url)
    return urls


def test_score_s3_archive_nightly_incremental_and_rescore(ray_cluster, trained_model, phantom_root, s3_bucket):
    archive, out = f"{s3_bucket}/archive", f"{s3_bucket}/predictions"
    model = f"{s3_bucket}/models/m1"
    storage.upload_dir(trained_model.model_path, model)  # the artifact is read from S3 too
    cfg = load_config(None, TINY + ["score.rows_per_file=10"])
    first = upload_test_split(phantom_root, archive, limit=20)

    night1 = run_scoring(cfg, "night-1", archive, model, out)
    assert (night1.seen, night1.skipped, night1.scored, night1.failed) == (20, 0, 20, 0)
    assert night1.files and all(f.startswith(f"{out}/run_date=") for f in night1.files)
    pred = read_predictions(out)
    assert sorted(pred.path) == sorted(first) and "run_date" in pred.columns

    # Night 2: same archive plus new files -> only the new ones are scored and appended.
    everything = upload_test_split(phantom_root, archive)
    night2 = run_scoring(cfg, "night-2", archive, model, out)
    assert (night2.seen, night2.skipped, night2.scored) == (len(everything), 20, len(everything) - 20)
    pred = read_predictions(out)
    assert len(pred) == len(everything) and not pred.duplicated(["path", "checksum", "model_id"]).any()
    assert set(pred[pred.run_id == "night-2"].path) == set(everything) - set(first)

    # Night 3: nothing new -> nothing written.
    night3 = run_scoring(cfg, "night-3", archive, model, out)
    assert (night3.skipped, night3.scored, night3.files) == (len(everything), 0, [])

    # A file whose bytes changed is new content: it is scored again, once.
    changed = everything[0]
    other = everything[-1]
    fs().pipe(changed, fs().cat(other))
    night4 = run_scoring(cfg, "night-4", archive, model, out)
    assert night4.scored == 1 and read_predictions(out).path.value_counts()[changed] == 2

    forced = run_scoring(cfg, "forced", archive, model, out, rescore=True)
    assert forced.skipped == 0 and forced.scored == len(everything)


def test_killed_run_restarts_without_loss_or_duplicates(ray_cluster, trained_model, phantom_root, s3_bucket, tmp_path):
    import ray

    archive, out = f"{s3_bucket}/archive", f"{s3_bucket}/predictions"
    urls = upload_test_split(phantom_root, archive)
    for i in range(6):  # a larger archive: many files, so one commit is a fraction of the run
        upload_test_split(phantom_root, f"{archive}/copy{i}")
    total = len(urls) * 7
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "score.py"), "--config", os.path.join(ROOT, "configs", "demo.yaml"),
           "--input", archive, "--model", trained_model.model_path, "--output", out,
           "--run-root", str(tmp_path / "runs"), "--set", f"ray.address={address}",
           "--set", "score.rows_per_file=16", "--set", "score.batch_size=8", "--set", "score.decode_batch_size=4",
           "--set", "score.cpus_per_actor=0.5", "--set", "score.lease_seconds=2"]
    # The driver is SIGKILLed by the write task that commits the first predictions file (medclf.ops.faults,
    # once per run): a kill at a known point mid-run, not one timed against a poll of the bucket, which
    # on a fast machine saw the first file only after the last was committed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCLF_FAULT")}
    env.update(MEDCLF_FAULT="after_commit:kill", MEDCLF_FAULT_ONCE=str(tmp_path / "fault-once"))
    killed = subprocess.run(cmd + ["--run-id", "killed"], capture_output=True, text=True, timeout=400, env=env)
    assert killed.returncode in (137, -9), killed.stderr[-3000:]
    partial = read_predictions(out)
    assert 0 < len(partial) < total, "the kill should land mid-run"
    assert storage.exists(f"{out}/_lease.json")  # the killed run's lease ...
    time.sleep(2.5)  # ... expires (score.lease_seconds), and the restarted run takes it over

    done = subprocess.run(cmd + ["--run-id", "restarted"], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped {len(partial)}" in done.stdout
    final = read_predictions(out)
    assert len(final) == total and final.path.nunique() == total  # every input exactly once
    assert set(final.run_id) == {"killed", "restarted"} and "took over the expired lease of run killed" in done.stderr
    pd.testing.assert_frame_equal(  # rows committed before the kill were kept as they were
        final[final.run_id == "killed"].sort_values("path").reset_index(drop=True),
        partial.sort_values("path").reset_index(drop=True),
    )
