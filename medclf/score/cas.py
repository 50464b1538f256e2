"""Compare-and-swap on one small file (the lease), local or S3, and the local publish lock.

- `read_versioned(path)` -> (bytes, version): S3: the object's ETag, read *before* the bytes, so a
  change in between makes the version older than the bytes and the swap fails (never the reverse);
  local: the sha256 of the bytes.
- `replace_if(path, data, version)`: write only if the file is still at `version`. S3: a conditional
  PUT (`If-Match: <ETag>`, 412 otherwise); local: under an exclusive flock of `<path>.lock`,
  re-read, compare, replace atomically. Stores that ignore If-Match are detected at start
  (`check_conditional_writes`) and refused.
- `publish_lock(path, shared=True)`: the local flock itself. Publishers hold it shared while they
  check their lease and link their file; lease changes hold it exclusive: a publish is atomic
  with respect to a takeover (local disk on one machine, or a filesystem with working flock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import uuid
from typing import Iterator, Optional

from medclf import storage
from medclf.errors import UserError


class UnsafeStore(UserError):
    """An S3-compatible store that does not honour conditional writes: exactly-once cannot hold."""


def _lock_name(path: str) -> str:
    return path + ".lock"  # `_lease.json.lock`: '_' keeps it out of Parquet readers


@contextlib.contextmanager
def publish_lock(path: str, shared: bool) -> Iterator[None]:
    """flock on `<path>.lock` (local paths only; a no-op on S3, where publishes are fenced by name)."""
    if storage.is_remote(path):
        yield
        return
    _, p = storage.filesystem(path)
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    with open(_lock_name(p), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_versioned(path: str) -> tuple[Optional[bytes], Optional[str]]:
    """(bytes, version) of `path`, or (None, None) when it does not exist."""
    fs, p = storage.filesystem(path)
    try:
        if storage.is_remote(path):
            fs.invalidate_cache(p)
            version = fs.info(p)["ETag"]
            return fs.cat_file(p), version
        data = fs.cat_file(p)
    except FileNotFoundError:
        return None, None
    return data, hashlib.sha256(data).hexdigest()


def _precondition_failed(exc: OSError) -> bool:
    return exc.errno == errno.EINVAL or "PreconditionFailed" in str(exc) or "412" in str(exc)


def replace_if(path: str, data: bytes, version: str) -> bool:
    """Write `data` to `path` only if it is still at `version`; False when someone changed it."""
    fs, p = storage.filesystem(path)
    if storage.is_remote(path):
        try:
            fs.pipe_file(p, data, IfMatch=version)  # small: one PUT (s3fs sends kwargs on put_object)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True
    with publish_lock(path, shared=False):
        current, now = read_versioned(path)
        if current is None or now != version:
            return False
        storage.write_atomic(path, data)
    return True


def check_conditional_writes(folder: str) -> None:
    """Refuse an S3-compatible store that ignores `If-None-Match: *` or `If-Match` (it would let two
    runs, or a stale and a live one, both write): probe with a scratch object under `folder`."""
    if not storage.is_remote(folder):
        return
    probe = storage.join(folder, f"_cas-probe-{uuid.uuid4().hex}")
    try:
        if not storage.create_exclusive(probe, b"1"):
            raise UnsafeStore(f"{probe}: a fresh name already existed")
        second = storage.create_exclusive(probe, b"2")
        _, version = read_versioned(probe)
        stale = "\"0000000000000000000000000000000\""
        swapped_stale = replace_if(probe, b"3", stale)
        if second or swapped_stale:
            raise UnsafeStore(
                f"{folder}: this S3-compatible store does not honour conditional writes "
                f"({'If-None-Match: *' if second else 'If-Match'} was ignored); scoring would not be exactly-once. "
                "Use AWS S3, or a store that supports them (docs/security.md, 'Stores')")
        if not replace_if(probe, b"4", version):
            raise UnsafeStore(f"{folder}: a conditional write (If-Match) with the current ETag was refused")
    finally:
        storage.remove(probe)
