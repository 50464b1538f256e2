"""The one-writer lease and exclusive creation, on local disk and on the local S3 server (no Ray)."""

import json
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medclf import storage
from medclf.score.lease import LEASE_FILE, Lease, LeaseHeld, LeaseLost, read_lease, verify
from medclf.data.predictions import prediction_schema, read_predictions
from medclf.score.batch import scored_keys


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "pred")
    return f"{request.getfixturevalue('s3_bucket')}/pred"


def test_create_exclusive_refuses_an_existing_name(output):
    path = storage.join(output, "x.bin")
    assert storage.create_exclusive(path, b"first")
    assert not storage.create_exclusive(path, b"second")
    assert storage.read_bytes(path) == b"first"


def test_create_exclusive_has_one_winner_among_racers(output):
    path = storage.join(output, "raced.bin")
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(storage.create_exclusive(path, b"%d" % i)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_second_run_refuses_while_the_first_holds_the_lease(output):
    with Lease(output, "night-1", 60) as first:
        lease = read_lease(output)
        assert lease["run_id"] == "night-1" and lease["token"] == first.token and lease["expires"] > time.time()
        with pytest.raises(LeaseHeld, match=r"is being written by run night-1 .*lease expires"):
            Lease(output, "night-2", 60).acquire()
        verify(output, first.token)
    assert read_lease(output) is None  # released at the end
    with Lease(output, "night-2", 60):  # and the next run gets it
        pass


def test_expired_lease_of_a_dead_run_is_taken_over_once(output):
    dead = Lease(output, "killed", 1)
    dead.acquire()
    dead._stop.set()  # the run died: nobody renews its lease any more
    time.sleep(1.2)
    racers = [Lease(output, f"next-{i}", 60) for i in range(4)]
    outcomes = []

    def take(lease):
        try:
            lease.acquire()
            outcomes.append(lease)
        except LeaseHeld:
            outcomes.append(None)

    threads = [threading.Thread(target=take, args=(r,)) for r in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o is not None]
    assert len(winners) == 1 and winners[0].taken_over["run_id"] == "killed"
    assert read_lease(output)["token"] == winners[0].token
    with pytest.raises(LeaseLost, match="no longer holds the lease"):
        verify(output, dead.token)  # the dead run's write tasks, were any still alive, commit nothing
    dead.renew()
    assert dead.lost and read_lease(output)["token"] == winners[0].token  # a late renewal takes nothing back
    winners[0].release()
    assert read_lease(output) is None


def test_lease_is_renewed_while_the_run_lives(output):
    with Lease(output, "long", 1.5) as held:
        first = read_lease(output)["expires"]
        time.sleep(2.0)  # longer than the lease: renewals keep it
        assert read_lease(output)["expires"] > first
        verify(output, held.token)
        held.check()


def test_unreadable_lease_is_reported_with_its_path(output):
    storage.write_bytes(storage.join(output, LEASE_FILE), b"{not json")
    with pytest.raises(LeaseHeld, match=r"_lease.json: unreadable lease"):
        Lease(output, "x", 60).acquire()


def _write_part(folder, name, table):
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(folder, name), buf.getvalue().to_pybytes())


def _rows(classes, model_id, paths, prob=0.5):
    schema = prediction_schema(classes)
    data = {f.name: [None] * len(paths) for f in schema}
    data.update(path=paths, checksum=["c"] * len(paths), model_id=[model_id] * len(paths),
                status=["ok"] * len(paths), size=[1] * len(paths))
    for f in schema:
        if f.name.startswith("prob_"):
            data[f.name] = [prob] * len(paths)
    return pa.table(data, schema=schema)


def test_output_with_only_a_temp_file_or_nothing_has_no_scored_keys(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(scored_keys(str(empty), "m")) == 0
    killed = tmp_path / "killed" / "run_date=2026-11-23"
    killed.mkdir(parents=True)
    (killed / ".part-night-abcdef12-00000.parquet.123.tmp").write_bytes(b"PAR1 half a file")
    assert len(scored_keys(str(tmp_path / "killed"), "m")) == 0
    assert read_predictions(str(tmp_path / "killed")).empty


def test_read_predictions_merges_the_schemas_of_all_files(output):
    _write_part(storage.join(output, "run_date=2026-11-22"), "part-a.parquet", _rows(["NORMAL", "POSITIVE"], "m1", ["a"]))
    _write_part(storage.join(output, "run_date=2026-11-23"), "part-b.parquet",
                _rows(["benign", "malignant", "normal"], "m2", ["b"], prob=0.25))
    pred = read_predictions(output).set_index("model_id")
    assert pred.loc["m2", "prob_malignant"] == 0.25 and pred.loc["m1", "prob_POSITIVE"] == 0.5
    assert pred[["prob_NORMAL", "prob_benign"]].isna().sum().tolist() == [1, 1]
    assert sorted(pred["run_date"].astype(str)) == ["2026-11-22", "2026-11-23"]


def test_lease_file_is_invisible_to_readers(output):
    _write_part(storage.join(output, "run_date=2026-11-22"), "part-a.parquet", _rows(["A", "B"], "m1", ["a"]))
    with Lease(output, "r", 60):
        assert len(read_predictions(output)) == 1
        assert json.loads(storage.read_bytes(storage.join(output, LEASE_FILE)))["run_id"] == "r"
