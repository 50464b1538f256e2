"""Bytes in and out of local disk or object storage (s3://), through fsspec/s3fs.

Everything that touches a path goes through here, so a local folder and an S3 prefix behave
the same everywhere. S3 settings are the standard AWS ones: credentials from the usual
environment variables or profile, `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) for an
S3-compatible server, `AWS_DEFAULT_REGION`. Credentials are never logged.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import uuid
from typing import Callable, ContextManager, Iterator, Optional

import fsspec
import pyarrow.fs

from medclf.errors import UserError

# Where input images may come from. Other fsspec URLs (zip://...::archive.zip, http://, memory://,
# chained "a::b") are refused: a chain can turn a small file into a huge read, and a web URL in a
# manifest would make the job fetch whatever it names.
INPUT_PROTOCOLS = ("s3",)


class InputRefused(UserError):
    """An input the scoring job will not read; `str()` names it and why."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")


def check_input_url(path: str) -> None:
    """Local paths (or file://) and s3:// only."""
    text = str(path)
    protocol = text.split("://", 1)[0].lower() if "://" in text else None
    if "::" in text or (protocol is not None and protocol not in (*INPUT_PROTOCOLS, "file")):
        raise InputRefused(text, "only local paths and s3:// URLs are read (not other fsspec URLs or chains)")


def read_input(path: str, max_bytes: Optional[int] = None) -> bytes:
    """An input file's bytes, refused before reading unless it is a regular file of at most `max_bytes`.

    Local: opened without blocking and checked with fstat on the open descriptor (so a FIFO, a
    device, or a symlink to /dev/zero is refused without a single read, and the file checked is
    the file read). S3: the object's size from a HEAD, then a GET of at most `max_bytes` + 1 bytes.
    """
    check_input_url(path)
    if is_remote(path):
        fs, p = filesystem(path)
        size = int(fs.info(p).get("size") or 0)
        _check_size(path, size, max_bytes)
        data = fs.cat_file(p, start=0, end=max_bytes + 1) if max_bytes is not None else fs.cat_file(p)
        _check_size(path, len(data), max_bytes)  # the object grew since the HEAD
        return data
    local = path.removeprefix("file://")
    fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputRefused(path, f"not a regular file ({_file_kind(st.st_mode)}); not read")
        _check_size(path, st.st_size, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1) if max_bytes is not None else f.read()
        _check_size(path, len(data), max_bytes)  # the file grew since fstat
        return data
    finally:
        os.close(fd)


def _check_size(path: str, size: int, max_bytes: Optional[int]) -> None:
    if max_bytes is not None and size > max_bytes:
        raise InputRefused(path, f"file is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit "
                                 "(score.max_file_mb); not read")


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def read_head(path: str, n: int) -> bytes:
    """The first `n` bytes of a regular file (fewer if shorter); b"" for anything else."""
    check_input_url(path)
    if is_remote(path):
        fs, p = filesystem(path)
        return fs.cat_file(p, start=0, end=n)
    local = path.removeprefix("file://")
    try:
        fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError:
        return b""
    try:
        return os.read(fd, n) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    finally:
        os.close(fd)


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


def _write_temp(local_path: str, data: bytes) -> str:
    """`data` durably written to a hidden temporary file beside `local_path`; returns its name."""
    folder, name = os.path.split(os.path.abspath(local_path))
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_name(folder, name)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` so that a reader sees either the old or the new bytes, never a mix."""
    fs, p = filesystem(path)
    if is_remote(path):
        fs.pipe_file(p, data)  # an object is replaced in one PUT
        return
    tmp = _write_temp(p, data)
    os.replace(tmp, p)


def create_exclusive(path: str, data: bytes, before_publish: Optional[Callable[[], None]] = None,
                     guard: Optional[Callable[[], ContextManager]] = None) -> bool:
    """Write `path` only if it does not exist yet, atomically; False if it already existed.

    Local: the bytes go to a hidden temporary file first, then a hard link gives them the final
    name (link() fails if the name exists, and a reader never sees a half-written file). S3: a
    conditional PUT (`If-None-Match: *`), which the server refuses with 412 if the key exists;
    s3fs's mode="create" sends it on the PUT and, above its multipart threshold (100 MiB), on the
    completing request too (a raw IfNoneMatch kwarg is dropped there and would overwrite).
    `before_publish` runs between writing the bytes and publishing them (a fault-injection hook);
    the publish itself runs inside `guard()` (the lease fence: medclf.score.lease.fenced_publish).
    """
    guarded = guard or contextlib.nullcontext
    fs, p = filesystem(path)
    if is_remote(path):
        if before_publish:
            before_publish()
        try:
            with guarded():
                fs.pipe_file(p, data, mode="create")
        except FileExistsError:
            return False
        return True
    tmp = _write_temp(p, data)
    if before_publish:
        before_publish()
    try:
        with guarded():
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


def file_stats(paths: list[str]) -> list[str]:
    """Per path, "size:modified" (mtime locally, ETag or LastModified on object stores), without
    reading the files: cheap change detection. One listing per folder on object stores."""
    out: list = [None] * len(paths)
    remote: dict = {}
    for i, path in enumerate(paths):
        if is_remote(path):
            remote.setdefault(posixpath.dirname(path), []).append(i)
        else:
            st = os.stat(path)
            out[i] = f"{st.st_size}:{st.st_mtime_ns}"
    for folder, rows in remote.items():
        fs, p = filesystem(folder)
        entries = {e["name"]: e for e in fs.ls(p, detail=True)}
        for i in rows:
            e = entries.get(filesystem(paths[i])[1]) or fs.info(filesystem(paths[i])[1])
            out[i] = f"{e.get('size')}:{e.get('ETag') or e.get('LastModified') or e.get('mtime')}"
    return out
