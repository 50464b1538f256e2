"""Where scoring may read: manifest entries confined to allowed roots (issue 34; docs/security.md).

A manifest is data from elsewhere: an entry may name any path (`/etc/shadow`, `../../x`,
`/proc/self/environ`, a symlink to either). Scoring reads only files under `score.allowed_roots`
(default: the input's own root: the folder scored, the folder of a glob, the folder holding a
manifest); `/proc`, `/sys` and `/dev` are refused whatever the roots say. Local paths are compared
after resolving symlinks and `..` (os.path.realpath), so a link inside a root that points outside
is refused; S3 keys after normalising `..`. A `file://` URL is read as its local path
(`file:///a/b` -> `/a/b`); `file://host/...` is refused. Refusals are permanent error rows
(storage.InputRefused), never retried.
"""

from __future__ import annotations

import os
import posixpath
from typing import Iterable, Optional

from medclf import storage

ALWAYS_REFUSED = ("/proc", "/sys", "/dev")


def normalise(path: str) -> str:
    """`file:///a/b` -> `/a/b`; other `file://` forms refused; anything else unchanged."""
    text = str(path)
    if text.lower().startswith("file://"):
        rest = text[len("file://"):]
        if not rest.startswith("/"):
            raise storage.InputRefused(text, "file:// URL with a host or a relative path; use an absolute local path")
        return rest
    return text


def _under(path: str, root: str, sep: str) -> bool:
    root = root.rstrip(sep) or sep
    return path == root or path.startswith(root if root.endswith(sep) else root + sep)


def _resolved(path: str) -> str:
    if storage.is_remote(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return os.path.realpath(path)


def default_roots(source: str) -> list[str]:
    """The input's own root: a folder itself, a glob's folder, a manifest's folder."""
    source = normalise(source)
    sep_module = posixpath if storage.is_remote(source) else os.path
    if any(ch in source for ch in "*?["):
        head = source[: min(source.index(ch) for ch in "*?[" if ch in source)]
        return [sep_module.dirname(head) or "."]
    if source.lower().endswith((".parquet", ".csv")) and not storage.isdir(source):
        return [sep_module.dirname(source) or "."]
    return [source]


def resolved_roots(roots: Iterable[str]) -> tuple[str, ...]:
    return tuple(_resolved(normalise(r)) for r in roots)


def check(path: str, roots: Optional[tuple[str, ...]]) -> None:
    """Raise InputRefused unless `path` (symlinks resolved) is under one of `roots` and outside /proc, /sys, /dev.
    `roots` None: only the always-refused places are checked."""
    storage.check_input_url(path)  # other fsspec URLs and chains: refused first, with their own message
    local = normalise(path)
    real = _resolved(local)
    if not storage.is_remote(local):
        for banned in ALWAYS_REFUSED:
            if _under(real, banned, os.sep):
                raise storage.InputRefused(path, f"resolves to {banned} (never read)")
    if roots is None:
        return
    sep = "/" if storage.is_remote(local) else os.sep
    if not any(_under(real, root, sep) for root in roots):
        raise storage.InputRefused(path, "outside score.allowed_roots (default: the input's own folder); not read")


OUTPUT_PROTOCOLS = ("s3",)  # outputs: local paths and s3:// (a lease on memory:// would bind one process only)


def check_locations(input_path: Optional[str], output: Optional[str]) -> None:
    """The command line's --input and --output, checked before Ray starts (InputRefused: exit 2)."""
    if input_path:
        storage.check_input_url(input_path)
        normalise(input_path)
    if output:
        text = str(output)
        scheme = text.split("://", 1)[0].lower() if "://" in text else None
        if "::" in text or (scheme is not None and scheme not in (*OUTPUT_PROTOCOLS, "file")):
            raise storage.InputRefused(text, "outputs are local paths or s3:// URLs (not other fsspec URLs or chains)")
        normalise(output)
