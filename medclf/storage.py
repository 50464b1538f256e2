"""Bytes in and out of local disk or object storage (s3://), through fsspec/s3fs.

Everything that touches a path goes through here, so a local folder and an S3 prefix behave
the same everywhere. S3 settings are the standard AWS ones: credentials from the usual
environment variables or profile, `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) for an
S3-compatible server, `AWS_DEFAULT_REGION`. Credentials are never logged.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Callable, Iterator, Optional

import fsspec
import pyarrow.fs


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _storage_options(path: str) -> dict:
    if str(path).startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # Other processes (Ray tasks) write the prefixes this process lists: never trust a
        # cached listing.
        opts: dict = {"use_listings_cache": False}
        if endpoint:
            opts["endpoint_url"] = endpoint
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            opts["client_kwargs"] = {"region_name": region}
        return opts
    return {}


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `path` and the path as that filesystem names it."""
    fs, fs_path = fsspec.core.url_to_fs(str(path), **_storage_options(str(path)))
    return fs, fs_path


def arrow_filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem (for Ray Data / pyarrow datasets) backed by the same fsspec one."""
    fs, fs_path = filesystem(path)
    if not is_remote(path):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(fs_path)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), fs_path


def _url(fs: fsspec.AbstractFileSystem, fs_path: str, like: str) -> str:
    if is_remote(like):
        protocol = like.split("://", 1)[0]
        return f"{protocol}://{fs_path}"
    return fs_path


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isdir(p)


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    if not is_remote(path):
        os.makedirs(p, exist_ok=True)
    # Object stores have no directories: writing a key creates its "folder".


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    return fs.cat_file(p)  # one GET on S3 (open() + read() would add a HEAD per file)


def write_bytes(path: str, data: bytes) -> None:
    fs, p = filesystem(path)
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    with fs.open(p, "wb") as f:
        f.write(data)


def _temp_name(folder: str, name: str) -> str:
    """A hidden name of its own for each writer (process and thread): readers skip it."""
    return os.path.join(folder, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` so that a reader sees either the old or the new bytes, never a mix."""
    fs, p = filesystem(path)
    if is_remote(path):
        fs.pipe_file(p, data)  # an object is replaced in one PUT
        return
    folder, name = os.path.split(os.path.abspath(p))
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_name(folder, name)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def create_exclusive(path: str, data: bytes, before_publish: Optional[Callable[[], None]] = None) -> bool:
    """Write `path` only if it does not exist yet, atomically; False if it already existed.

    Local: the bytes go to a hidden temporary file first, then a hard link gives them the final
    name (link() fails if the name exists, and a reader never sees a half-written file). S3: one
    conditional PUT (`If-None-Match: *`), which the server refuses with 412 if the key exists.
    `before_publish` runs between writing the bytes and publishing them (a fault-injection hook).
    """
    fs, p = filesystem(path)
    if is_remote(path):
        if before_publish:
            before_publish()
        try:
            fs.pipe_file(p, data, IfNoneMatch="*")
        except FileExistsError:
            return False
        return True
    folder, name = os.path.split(os.path.abspath(p))
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_name(folder, name)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if before_publish:
        before_publish()
    try:
        os.link(tmp, p)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def remove(path: str) -> None:
    """Delete a file; one that is already gone is fine."""
    fs, p = filesystem(path)
    try:
        fs.rm_file(p)
    except FileNotFoundError:
        pass


def list_files(root: str, extensions: Optional[list[str]] = None) -> Iterator[str]:
    """Every file under `root` (recursively) whose suffix is in `extensions`, sorted.

    `root` may also be a glob (`s3://bucket/2026-*/**/*.dcm`).
    """
    fs, p = filesystem(root)
    exts = tuple(e.lower() for e in extensions) if extensions else None
    if any(ch in p for ch in "*?["):
        found = fs.glob(p)
    elif fs.isfile(p):
        found = [p]
    else:
        found = fs.find(p)
    for f in sorted(found):
        name = f.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue  # hidden files and success markers
        if exts is None or name.lower().endswith(exts):
            yield _url(fs, f, root)


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local folder to `dest` (local or remote), replacing files of the same name."""
    fs, p = filesystem(dest)
    if not is_remote(dest):
        import shutil

        shutil.copytree(local_dir, p, dirs_exist_ok=True)
        return
    fs.put(local_dir.rstrip("/") + "/", p.rstrip("/") + "/", recursive=True)


def download_dir(src: str, local_dir: str) -> str:
    """Make the folder `src` available locally; returns a local path (src itself when local)."""
    if not is_remote(src):
        return src
    fs, p = filesystem(src)
    fs.get(p.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
    return local_dir
