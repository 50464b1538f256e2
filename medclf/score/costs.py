"""Where scoring time goes (issue 35): seconds per stage, summed over the rows, shown per 1,000 images.

Stages: list (driver: listing the input), read (bytes in + checksum), decode (decode, drift statistics
and preprocessing, up to the model's input tensor), forward (the model, per batch, shared over its rows)
and write (Parquet encoding and the exactly-once commit, per file). Read, decode and forward are timed
where they run and ride along each row in `TIME_COLUMNS` (never written to the predictions); the sink
adds them up with its own write time. They are busy seconds summed over every task and actor, so with
several running at once a stage's sum can exceed the wall clock: a stage's images/s is what one worker
of it does, and the largest seconds-per-1,000 is the stage to scale or speed up.

Start-up is the wall time from the run's start to its first answer (the inference actor's first batch
done, `ANSWERED_COLUMN`): Ray Data starting its workers, the actor importing torch and opening the model.
It is paid once per run, whatever the archive's size, so on a small run it can be a large share of the
wall clock while the stages above say nothing of it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

STAGES = ("list", "read", "decode", "forward", "write")
TIME_COLUMNS = ("t_read", "t_decode", "t_forward")  # per-row seconds of the stages timed in the workers
ANSWERED_COLUMN = "t_answered"  # when the actor finished the row's batch (time.time()); never written either


def sum_times(tables: list) -> dict:
    """Seconds per stage in these Arrow tables' time columns (those present)."""
    import pyarrow.compute as pc

    out = {}
    for column in TIME_COLUMNS:
        total = sum(float(pc.sum(t.column(column)).as_py() or 0.0) for t in tables if column in t.column_names)
        out[column[2:]] = total
    return out


def first_answer(tables: list) -> Optional[float]:
    """The earliest `ANSWERED_COLUMN` time in these Arrow tables; None when none has the column."""
    import pyarrow.compute as pc

    times = [pc.min(t.column(ANSWERED_COLUMN)).as_py() for t in tables if ANSWERED_COLUMN in t.column_names]
    times = [t for t in times if t is not None]
    return min(times) if times else None


def per_row(seconds: float, n: int) -> np.ndarray:
    """One batch's seconds shared evenly over its `n` rows."""
    return np.full(n, seconds / n if n else 0.0, np.float64)


def cost_line(stage_seconds: dict, images: int, startup_s: Optional[float] = None) -> str:
    """'list 0.1 s/1k img (9000 img/s), read ...': per stage, seconds per 1,000 images and images/s; then
    the start-up's wall seconds, when known."""
    if not stage_seconds or images <= 0:
        return "stage costs: no images"
    parts = []
    for stage in STAGES:
        s = float(stage_seconds.get(stage, 0.0))
        rate = f"{images / s:.1f} img/s" if s > 0 else "-"
        parts.append(f"{stage} {1000 * s / images:.2f} s/1k ({rate})")
    line = "stage costs (busy seconds per 1,000 images, summed over workers): " + ", ".join(parts)
    if startup_s is not None:
        line += f"; start-up {startup_s:.1f} s (wall, once per run: from the run's start to its first answer)"
    return line
