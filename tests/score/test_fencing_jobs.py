"""Issue 34, item 4, as a scheduler runs it: a scoring job parked between writing a part and
publishing it (MEDCLF_FAULT=before_commit:wait=...), its driver paused (SIGSTOP: no more renewals),
a second job takes the output over and scores everything; then the first job's parked tasks resume.
Every input must be there exactly once, on local disk and on S3 (moto)."""

import os
import signal
import time

import pytest

from medclf.data.predictions import read_predictions
from medclf.score.lease import read_lease
from tests.score.test_score_recovery import LEASE_SECONDS, model, score_job  # noqa: F401 (fixture)

# Each job starts a Ray of its own, as two scheduler runs on two machines would: on one shared 2-CPU
# cluster the second job waited for the CPUs that the paused first job's actor and parked write tasks
# still held, and never started. The S3 server (s3_bucket) is the session's moto on 127.0.0.1.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1500)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_paused_driver_takeover_gives_no_duplicates(model, phantom_root, tmp_path, request,  # noqa: F811
                                                    where):
    if where == "s3":
        from tests.score.test_score_s3 import upload_test_split

        bucket = request.getfixturevalue("s3_bucket")
        archive, out = f"{bucket}/archive", f"{bucket}/predictions"
        n = sum(u.endswith(".png") for u in upload_test_split(phantom_root, archive))
    else:
        archive, out = os.path.join(phantom_root, "test"), str(tmp_path / "pred")
        n = sum(f.endswith(".png") for _, _, fs in os.walk(archive) for f in fs)
    go = tmp_path / "go"
    first = score_job(archive, model, out, tmp_path, "first", fault=f"before_commit:wait={go}", wait=False,
                      own_ray=True)
    try:
        deadline = time.time() + 400
        while not os.path.exists(f"{go}.parked") and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)  # a write task of the first job has its part written, not yet published
        assert os.path.exists(f"{go}.parked"), first.communicate()[1][-3000:] if first.poll() is not None else ""
        os.kill(first.pid, signal.SIGSTOP)  # the driver is paused: its lease is no longer renewed
        time.sleep(LEASE_SECONDS + 0.5)
        second = score_job(archive, model, out, tmp_path, "second", own_ray=True)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "took over the expired lease of run first" in second.stderr
    finally:
        go.touch()  # the parked tasks go on to publish ...
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=600)
    print(f"first job: exit {first.returncode}")
    pred = read_predictions(out)
    assert len(pred) == n and not pred.duplicated("path").any()  # ... and add nothing
    assert read_lease(out) is None
