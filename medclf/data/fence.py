"""Which committed prediction files count: fencing out the parts of a run that lost its lease.

A scoring run's lease has a generation (medclf.score.lease). When a run takes the lease (fresh or
over an expired one) it writes, before any of its tasks can publish, a fence record
`_fence-<generation>-<token 8>.json` listing the part files that count at that moment (those the
newest earlier fence counted, plus every part of the generation it replaces). Part names carry
their writer's token (`part-<run>-<token 8>-<task>.parquet`, medclf.score.sink).

The rule readers apply (`valid_files`): under the newest fence, a part counts if the fence lists it
or it belongs to the fence's own generation. A part a superseded run publishes after the takeover
(a write task that passed its lease check, then stalled) is in neither: ignored, and deleted by the
holder (`remove_zombies`). On S3 this is what makes exactly-once hold, since no S3 write can be
conditional on another object; on local disk the publish is also atomic under a lock.
An output without any fence (written before this scheme) is read as it always was.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Optional

from medclf import storage

FENCE_PREFIX = "_fence-"
_FENCE = re.compile(r"_fence-(\d{8})-([0-9a-f]{8})\.json$")


def part_token(name: str) -> Optional[str]:
    """The writer's token prefix from `part-<run>-<token 8>-<task>.parquet`, or None for other names."""
    base = posixpath.basename(name.replace("\\", "/"))
    if not (base.startswith("part-") and base.endswith(".parquet")):
        return None
    bits = base[: -len(".parquet")].rsplit("-", 2)
    return bits[1] if len(bits) == 3 and re.fullmatch(r"[0-9a-f]{8}", bits[1]) else None


def _rel(root: str, path: str) -> str:
    return posixpath.relpath(path.replace("\\", "/"), root.replace("\\", "/"))


def _list(root: str) -> tuple[list[str], list[str]]:
    """(part files, fence files) under `root`, as paths relative to it."""
    fs, p = storage.filesystem(root)
    if not fs.exists(p):
        return [], []
    p = p.rstrip("/")
    names = [_rel(p, f) for f in fs.find(p)]
    parts = [n for n in names if n.endswith(".parquet") and not posixpath.basename(n).startswith((".", "_"))]
    fences = [n for n in names if _FENCE.fullmatch(n)]
    return parts, fences


def newest_fence(root: str, fences: list[str]) -> Optional[dict]:
    if not fences:
        return None
    name = max(fences, key=lambda n: int(_FENCE.fullmatch(n).group(1)))
    return json.loads(storage.read_bytes(storage.join(root, name)))


def valid_files(root: str) -> tuple[list[str], list[str]]:
    """(parts that count, zombie parts) under `root`, relative paths."""
    parts, fences = _list(root)
    fence = newest_fence(root, fences)
    if fence is None:
        return parts, []
    listed, own = set(fence["parts"]), fence["token"][:8]
    good = [n for n in parts if n in listed or part_token(n) == own]
    return good, [n for n in parts if n not in set(good)]


def write_fence(root: str, generation: int, token: str) -> list[str]:
    """Record what counts as of now, for the lease of `generation` (called right after taking it).
    Returns the zombies it found (parts a superseded run published after the previous fence)."""
    good, zombies = valid_files(root)
    name = f"{FENCE_PREFIX}{generation:08d}-{token[:8]}.json"
    body = json.dumps({"generation": generation, "token": token, "parts": sorted(good)}).encode()
    storage.write_atomic(storage.join(root, name), body)
    return zombies


def remove_zombies(root: str) -> list[str]:
    """Delete the parts the newest fence does not count (the holder's cleanup; readers ignore them anyway)."""
    _, zombies = valid_files(root)
    for name in zombies:
        storage.remove(storage.join(root, *name.split("/")))
    return zombies
