"""One writer per predictions output: a lease file `<output>/_lease.json`.

A scoring run creates the lease exclusively before it reads or writes anything (local disk: a hard
link that fails if the name exists; S3: a conditional PUT, `If-None-Match: *`), renews it every
third of its duration while it runs, checks it before every commit, and deletes it at the end.
A second run finds it and refuses (`LeaseHeld`, exit status 3). A run that died stops renewing:
once its lease has expired the next run takes over, and to make that safe when two runs find the
same expired lease, each first creates `_lease.takeover-<expired token>` exclusively: one wins,
the other refuses. Expiry compares clocks of different machines: keep `score.lease_seconds` far
above any clock skew. Names starting with '_' are invisible to Parquet readers.
"""

from __future__ import annotations

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
from medclf.errors import UserError

LEASE_FILE = "_lease.json"
TAKEOVER_PREFIX = "_lease.takeover-"
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


def read_lease(output: str) -> Optional[dict]:
    """The lease on `output` as written by its holder, or None when there is none."""
    path = lease_path(output)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        lease = json.loads(data)
        float(lease["expires"]), str(lease["token"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LeaseHeld(f"{path}: unreadable lease ({exc}); if no run is writing {output}, delete it") from None
    return lease


def verify(output: str, token: str) -> None:
    """Raise LeaseLost unless `token` still holds an unexpired lease on `output` (checked before commits)."""
    lease = read_lease(output)
    if lease is None or lease["token"] != token:
        holder = "nobody" if lease is None else f"run {lease.get('run_id')}"
        raise LeaseLost(f"{output}: this run no longer holds the lease (now held by {holder}); not committing")
    if time.time() >= float(lease["expires"]):
        raise LeaseLost(f"{output}: this run's lease expired at {_iso(float(lease['expires']))}; not committing")


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
        self.started = time.time()
        self.expires = 0.0
        self.taken_over: Optional[dict] = None  # the expired lease this run took over, if any
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def _body(self) -> bytes:
        self.expires = time.time() + self.seconds
        return json.dumps({"token": self.token, "run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "started": _iso(self.started), "renewed": _iso(time.time()),
                           "expires": self.expires}).encode()

    def acquire(self) -> "Lease":
        path = lease_path(self.output)
        if not storage.create_exclusive(path, self._body()):
            current = read_lease(self.output)
            if current is None:  # released between our attempt and the read: try once more
                if not storage.create_exclusive(path, self._body()):
                    raise LeaseHeld(f"{self.output}: another run took the lease just now")
            else:
                self._take_over(current)
        self._thread = threading.Thread(target=self._renew_loop, name="medclf-lease", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, current: dict) -> None:
        if time.time() < float(current["expires"]):
            raise LeaseHeld(held_message(self.output, current))
        marker = storage.join(self.output, f"{TAKEOVER_PREFIX}{current['token']}")
        if not storage.create_exclusive(marker, self.token.encode()):
            raise LeaseHeld(f"{self.output}: another run is taking over the expired lease of run {current.get('run_id')}")
        again = read_lease(self.output)
        if again is None or again["token"] != current["token"]:
            raise LeaseHeld(f"{self.output}: the lease changed hands while this run was taking it over")
        storage.write_atomic(lease_path(self.output), self._body())
        self.taken_over = current
        log.warning("took over the expired lease of run %s on %s (it expired %s)", current.get("run_id"),
                    self.output, _iso(float(current["expires"])))

    def renew(self) -> None:
        """Push the expiry forward; only while still ours and unexpired (else the lease is lost)."""
        with self._lock:
            if self.lost:
                return
            if time.time() >= self.expires:
                self.lost = f"lease expired at {_iso(self.expires)} before it could be renewed"
            else:
                current = read_lease(self.output)
                if current is None or current["token"] != self.token:
                    self.lost = "lease was taken by another run"
                else:
                    storage.write_atomic(lease_path(self.output), self._body())
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
            current = read_lease(self.output)
            if current is not None and current["token"] == self.token:
                storage.remove(lease_path(self.output))
            if self.taken_over:
                storage.remove(storage.join(self.output, f"{TAKEOVER_PREFIX}{self.taken_over['token']}"))

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
