"""One writer per predictions output: a lease file `<output>/_lease.json`.

A scoring run creates the lease exclusively before it reads or writes anything (local disk: a hard
link that fails if the name exists; S3: a conditional PUT, `If-None-Match: *`), renews it every
third of its duration while it runs, checks it before every commit, and releases it at the end.
A second run finds it and refuses (`LeaseHeld`, exit status 3). A run that died stops renewing:
once its lease has expired the next run takes over. Expiry compares clocks of different machines:
keep `score.lease_seconds` far above any clock skew. Names starting with '_' are invisible to
Parquet readers.

Every change after the creation is a compare-and-swap (medclf.score.cas: `If-Match` on the lease
object's ETag on S3, a flock-guarded compare locally): a takeover replaces exactly the expired lease
it read (of two runs taking over, one wins), a renewal or a release from a run that was taken over
fails instead of overwriting the new holder's lease, and a release leaves a `released` tombstone
(deleting would race with a takeover). Each lease has a generation, one above the lease it replaced;
the holder writes a fence record for it (medclf.data.fence) so that parts a superseded run publishes
late are ignored by readers and deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Optional

from medclf import storage
from medclf.data import fence
from medclf.errors import UserError
from medclf.score import cas

LEASE_FILE = "_lease.json"
LEASE_HELD_EXIT = 3  # exit status of a run refused because another run holds the output

log = logging.getLogger(__name__)


class LeaseHeld(UserError):
    """Another run holds the output (the CLI exits with LEASE_HELD_EXIT, not 2)."""


class LeaseLost(RuntimeError):
    """This run's lease expired or was taken over: it must not commit anything more."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def lease_path(output: str) -> str:
    return storage.join(output, LEASE_FILE)


def _parse(path: str, output: str, data: Optional[bytes]) -> Optional[dict]:
    if data is None:
        return None
    try:
        lease = json.loads(data)
        float(lease["expires"]), str(lease["token"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LeaseHeld(f"{path}: unreadable lease ({exc}); if no run is writing {output}, delete it") from None
    return lease


def read_lease_versioned(output: str) -> tuple[Optional[dict], Optional[str]]:
    """(the lease file as written, its version for a compare-and-swap); (None, None) when absent."""
    data, version = cas.read_versioned(lease_path(output))
    return _parse(lease_path(output), output, data), version


def read_lease(output: str) -> Optional[dict]:
    """The lease on `output` as written by its holder, or None when there is none (or it was released)."""
    try:
        data = storage.read_bytes(lease_path(output))
    except FileNotFoundError:
        return None
    lease = _parse(lease_path(output), output, data)
    return None if lease.get("released") else lease


def verify(output: str, token: str) -> None:
    """Raise LeaseLost unless `token` still holds an unexpired lease on `output` (checked before commits)."""
    lease = read_lease(output)
    if lease is None or lease["token"] != token:
        holder = "nobody" if lease is None else f"run {lease.get('run_id')}"
        raise LeaseLost(f"{output}: this run no longer holds the lease (now held by {holder}); not committing")
    if time.time() >= float(lease["expires"]):
        raise LeaseLost(f"{output}: this run's lease expired at {_iso(float(lease['expires']))}; not committing")


@contextlib.contextmanager
def fenced_publish(output: str, token: str):
    """Around one publish: the lease is checked, and (local disk) cannot change hands until the file is
    published (a shared lock that takeovers and renewals take exclusively). On S3 no write can be
    conditional on another object: there the fence records (medclf.data.fence) drop a late publish."""
    with cas.publish_lock(lease_path(output), shared=True):
        verify(output, token)
        yield


def held_message(output: str, lease: dict) -> str:
    return (f"{output} is being written by run {lease.get('run_id')} (host {lease.get('host')}, pid {lease.get('pid')}, "
            f"started {lease.get('started')}); its lease expires {_iso(float(lease['expires']))} unless renewed. "
            "Two runs must not write one output: wait for that run to end. If it died, the first run after its lease "
            "expires takes over (docs/operations.md, 'Stuck lease').")


class Lease:
    """The lease of one run on one output; `acquire()` ... `release()` (or use as a context manager)."""

    def __init__(self, output: str, run_id: str, seconds: float):
        self.output, self.run_id, self.seconds = output, run_id, float(seconds)
        self.token = uuid.uuid4().hex
        self.generation = 0
        self.started = time.time()
        self.expires = 0.0
        self.taken_over: Optional[dict] = None  # the expired lease this run took over, if any
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def _body(self, released: bool = False) -> bytes:
        self.expires = 0.0 if released else time.time() + self.seconds
        body = {"token": self.token, "generation": self.generation, "run_id": self.run_id,
                "host": socket.gethostname(), "pid": os.getpid(), "started": _iso(self.started),
                "renewed": _iso(time.time()), "expires": self.expires}
        return json.dumps({**body, "released": True} if released else body).encode()

    def acquire(self) -> "Lease":
        cas.check_conditional_writes(self.output)  # a store ignoring If-Match / If-None-Match: refuse, not run unsafe
        path = lease_path(self.output)
        current, version = read_lease_versioned(self.output)
        if current is None:
            self.generation = 1
            if not storage.create_exclusive(path, self._body()):
                raise LeaseHeld(f"{self.output}: another run took the lease just now")
        else:
            if not current.get("released") and time.time() < float(current["expires"]):
                raise LeaseHeld(held_message(self.output, current))
            self.generation = int(current.get("generation", 0)) + 1
            if not cas.replace_if(path, self._body(), version):  # exactly the lease read, or nothing
                raise LeaseHeld(f"{self.output}: another run took the lease just now")
            if not current.get("released"):
                self.taken_over = current
                log.warning("took over the expired lease of run %s on %s (it expired %s)", current.get("run_id"),
                            self.output, _iso(float(current["expires"])))
        zombies = fence.write_fence(self.output, self.generation, self.token)  # before any task can publish
        self._remove(zombies)
        self._thread = threading.Thread(target=self._renew_loop, name="medclf-lease", daemon=True)
        self._thread.start()
        return self

    def _remove(self, zombies: list[str]) -> None:
        if zombies:
            log.warning("%s: %d file(s) published by a run after it lost its lease are ignored and removed: %s",
                        self.output, len(zombies), ", ".join(zombies[:5]))
        for name in zombies:
            storage.remove(storage.join(self.output, *name.split("/")))

    def renew(self) -> None:
        """Push the expiry forward; only while still ours and unexpired (else the lease is lost)."""
        with self._lock:
            if self.lost:
                return
            if time.time() >= self.expires:
                self.lost = f"lease expired at {_iso(self.expires)} before it could be renewed"
            else:
                current, version = read_lease_versioned(self.output)
                if current is None or current["token"] != self.token or current.get("released"):
                    self.lost = "lease was taken by another run"
                elif not cas.replace_if(lease_path(self.output), self._body(), version):
                    self.lost = "lease changed hands while this run was renewing it"
            if self.lost:
                log.error("%s: %s; this run stops committing", self.output, self.lost)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except Exception as exc:  # a failed renewal is retried; expiry is what ends the lease
                log.warning("%s: lease renewal failed (%s: %s)", self.output, type(exc).__name__, exc)

    def check(self) -> None:
        """Raise LeaseLost if the renewals found the lease gone."""
        if self.lost:
            raise LeaseLost(f"{self.output}: {self.lost}")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        with self._lock:
            current, version = read_lease_versioned(self.output)
            if current is not None and current["token"] == self.token and not current.get("released"):
                self._remove(fence.valid_files(self.output)[1])  # late parts of a superseded run, if any
                cas.replace_if(lease_path(self.output), self._body(released=True), version)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
