"""Fencing for exactly-once (issue 34, item 4), on local disk and on the local S3 server (moto), no Ray.

- lease changes are compare-and-swap: a delayed renewal or release cannot overwrite a newer lease;
- a publish that passed its lease check and stalled until after a takeover does not count;
- S3 exclusive creates refuse a second writer at every size (101 MiB: s3fs's multipart path);
- a store that ignores conditional writes is refused before anything is written.
"""

import contextlib
import io
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medclf import storage
from medclf.data.fence import part_token, valid_files
from medclf.data.predictions import prediction_schema, read_predictions
from medclf.score import cas
from medclf.score import lease as lease_mod
from medclf.score.lease import Lease, LeaseHeld, LeaseLost, fenced_publish, read_lease
from medclf.score.sink import part_name


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "pred")
    return f"{request.getfixturevalue('s3_bucket')}/pred"


def _expire(held: Lease) -> None:
    held._stop.set()  # the run is paused: nobody renews its lease
    held._thread.join()
    time.sleep(max(0.0, held.expires - time.time()) + 0.1)


def _part(paths: list[str]) -> bytes:
    table = pa.table({"path": paths, "status": ["ok"] * len(paths), "model_id": ["m"] * len(paths)})
    table = pa.concat_tables([table.cast(pa.schema([prediction_schema([]).field(n) for n in table.column_names]))])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_a_delayed_renewal_cannot_overwrite_a_newer_lease(output, monkeypatch):
    a = Lease(output, "a", 1).acquire()
    _expire(a)
    a.expires = time.time() + 60  # A believes its lease is still good (its clock, its view)
    b = None
    real = lease_mod.read_lease_versioned

    def read_then_b_takes_over(out):  # A reads the lease ... B takes over ... A writes
        nonlocal b
        seen = real(out)
        if b is None:
            b = Lease(output, "b", 60)
            b.acquire()
        return seen

    monkeypatch.setattr(lease_mod, "read_lease_versioned", read_then_b_takes_over)
    a.renew()
    monkeypatch.setattr(lease_mod, "read_lease_versioned", real)
    assert a.lost == "lease changed hands while this run was renewing it"
    assert read_lease(output)["token"] == b.token and b.taken_over["run_id"] == "a"
    assert read_lease(output)["generation"] == a.generation + 1
    a.release()  # a late release takes nothing either
    assert read_lease(output)["token"] == b.token
    b.release()
    assert read_lease(output) is None


def test_two_runs_taking_over_one_expired_lease_one_wins(output, monkeypatch):
    dead = Lease(output, "dead", 1).acquire()
    _expire(dead)
    first, second = Lease(output, "x", 60), Lease(output, "y", 60)
    real = lease_mod.read_lease_versioned
    calls = []

    def both_read_first(out):  # y reads the expired lease, then x takes it over, then y swaps
        seen = real(out)
        if not calls:
            calls.append(1)
            first.acquire()
        return seen

    monkeypatch.setattr(lease_mod, "read_lease_versioned", both_read_first)
    with pytest.raises(LeaseHeld, match="another run took the lease just now"):
        second.acquire()
    monkeypatch.setattr(lease_mod, "read_lease_versioned", real)
    assert read_lease(output)["token"] == first.token
    first.release()


def test_a_publish_that_stalled_past_a_takeover_does_not_count(output):
    """Run A's write task passed its lease check, then stalled; B took over and scored the same file.
    A's late part is fenced out: readers ignore it, B's release deletes it; each input once."""
    folder = storage.join(output, "run_date=2026-12-04")
    a = Lease(output, "a", 4).acquire()
    a._stop.set()  # A's driver is paused: nobody renews its lease
    a._thread.join()
    storage.create_exclusive(storage.join(folder, part_name("a", a.token, 0)), _part(["x.png"]))  # A's first commit
    late = storage.join(folder, part_name("a", a.token, 1))
    b = None

    @contextlib.contextmanager
    def check_then_stall():
        nonlocal b
        lease_mod.verify(output, a.token)  # passes: A still holds an unexpired lease
        time.sleep(max(0.0, a.expires - time.time()) + 0.1)  # ... the stall, past A's expiry
        b = Lease(output, "b", 60)
        b.acquire()  # B takes over and fences generation 1 out
        yield

    if storage.is_remote(output):  # S3: no write is conditional on another object; the fence drops it
        assert storage.create_exclusive(late, _part(["y.png"]), guard=check_then_stall)
    else:  # local: check and link are one step under the lease lock, so after the takeover A is refused
        time.sleep(max(0.0, a.expires - time.time()) + 0.1)
        b = Lease(output, "b", 60)
        b.acquire()
        with pytest.raises(LeaseLost):
            storage.create_exclusive(late, _part(["y.png"]), guard=lambda: fenced_publish(output, a.token))
        assert not storage.exists(late)
        assert storage.create_exclusive(late, _part(["y.png"]))  # as if it had slipped through anyway
    assert b.generation == a.generation + 1 and b.taken_over["token"] == a.token
    storage.create_exclusive(storage.join(folder, part_name("b", b.token, 0)), _part(["y.png"]))  # B scores y
    rows = read_predictions(output)
    assert sorted(rows.path) == ["x.png", "y.png"]  # A's first commit counts, its late one does not
    _, zombies = valid_files(output)
    assert [part_token(z) for z in zombies] == [a.token[:8]]
    b.release()
    assert not storage.exists(late)  # the holder removed it
    assert sorted(read_predictions(output).path) == ["x.png", "y.png"]


def test_exclusive_create_above_the_multipart_threshold_refuses_a_second_writer(s3_bucket):
    path = f"{s3_bucket}/big/part.bin"
    first = b"a" * (101 * 2**20)
    assert storage.create_exclusive(path, first)
    assert not storage.create_exclusive(path, b"b" * (101 * 2**20))
    fs, p = storage.filesystem(path)
    assert fs.info(p)["size"] == len(first) and fs.cat_file(p, start=0, end=4) == b"aaaa"


def test_a_store_ignoring_conditional_writes_is_refused_before_any_write(s3_bucket, monkeypatch):
    cas.check_conditional_writes(f"{s3_bucket}/ok")  # moto honours them
    out = f"{s3_bucket}/unsafe"
    fs, _ = storage.filesystem(out)  # fsspec hands every caller this same (cached) instance
    real = fs.pipe_file

    def ignoring(path, data, mode="overwrite", **kwargs):  # what a store that drops the headers does
        kwargs.pop("IfMatch", None)
        return real(path, data, **kwargs)

    monkeypatch.setattr(fs, "pipe_file", ignoring)
    assert storage.filesystem(out)[0] is fs
    with pytest.raises(cas.UnsafeStore, match="does not honour conditional writes"):
        Lease(out, "r", 60).acquire()
    fs, p = storage.filesystem(out)
    assert not fs.exists(p) or fs.find(p) == []
