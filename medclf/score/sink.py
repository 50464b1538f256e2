"""A Ray Data sink that commits each predictions file atomically, exactly once.

Why not `Dataset.write_parquet`: it writes straight to the final file name, so a job killed
mid-write leaves a half-written file that readers would take as data, and a write task that Ray
retries after it committed writes its rows a second time under another random name.

Here each write task buffers its rows (`rows_per_file`) into one Parquet file whose name comes
from the run, the run's lease and the task: `part-<run id>-<lease token 8>-<task index>.parquet`.
Ray retries a task with the same inputs and the same task index, so a retry targets the same
name, and the file is created exclusively (local disk: written under a hidden temporary name,
then hard-linked into place, which fails if the name exists; S3: a conditional PUT,
`If-None-Match: *`). A retry of a task that had committed finds its file there and adds nothing.
The lease token keeps the names of a later run that re-uses the run id apart from this one's.
Before publishing, the task checks that its run still holds the output's lease (medclf.score.lease),
and the publish is fenced by the lease's generation (`lease.fenced_publish`, medclf.data.fence), so a
run that lost it cannot commit, even with a stall between the check and the publish. Readers (pyarrow datasets) ignore names starting with '.'
or '_': a file is either fully there or not there at all. Rows of images an earlier run scored
(status `already_scored`) are counted per status with the rest, never written.

Alternative considered, not taken: a commit log written by the driver (tasks write files, the
driver lists the committed ones). It needs a second write per file and readers that consult the
log, and a file written by a task whose result the driver never saw would still be visible to
plain Parquet readers. Exclusive names cost one conditional PUT / one link() per file, nothing more.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from functools import partial
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource.datasink import Datasink

from medclf import storage
from medclf.ops import faults
from medclf.score import lease
from medclf.score.costs import first_answer, sum_times


def part_name(run_id: str, token: str, task_idx: int) -> str:
    return f"part-{run_id}-{token[:8]}-{task_idx:05d}.parquet"


class CommitPerFileDatasink(Datasink[list]):
    def __init__(self, folder: str, run_id: str, schema: pa.Schema, rows_per_file: int, output: str,
                 lease_token: str, fault: Optional[faults.Fault] = None):
        self.folder = folder  # the run-date partition folder, e.g. <output>/run_date=2026-11-22
        self.run_id = run_id
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.output = output  # the predictions root, where the lease lives
        self.lease_token = lease_token
        self.fault = fault
        self.committed: list = []  # (file, rows), filled on the driver when the write completes
        # Counted from every row, written or not: rows per `status`, and files (rows with `first_row`).
        self.statuses: Counter = Counter()
        self.first_rows = 0
        self.stage_seconds: dict = {}  # read/decode/forward/write busy seconds (medclf.score.costs)
        self.first_answer: Optional[float] = None  # time.time() of the run's first answer (medclf.score.costs)

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        started = time.perf_counter()
        counts = _tally(tables)
        counts["seconds"] = sum_times(tables)
        counts["first_answer"] = first_answer(tables)
        # Rows of images scored in an earlier run are counted, not written again.
        tables = [t.filter(pc.field("status") != UNWRITTEN_STATUS) for t in tables]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"files": [], **counts}
        table = pa.concat_tables([t.select(self.schema.names).cast(self.schema) for t in tables])
        final = storage.join(self.folder, part_name(self.run_id, self.lease_token, ctx.task_idx))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        lease.verify(self.output, self.lease_token)  # a run that lost the output commits nothing
        created = storage.create_exclusive(final, buf.getvalue(),
                                           before_publish=partial(faults.check, self.fault, "before_commit"),
                                           guard=partial(lease.fenced_publish, self.output, self.lease_token))
        if created:
            faults.check(self.fault, "after_commit")
        # not created: an earlier try of this very task committed it; its rows (and counts) are the same
        counts["seconds"]["write"] = time.perf_counter() - started
        return {"files": [(final, table.num_rows)], **counts}

    def on_write_complete(self, write_result) -> None:
        returns = write_result.write_returns
        self.committed = [item for task in returns for item in task["files"]]
        self.statuses = sum((Counter(task["statuses"]) for task in returns), Counter())
        self.first_rows = sum(task["first_rows"] for task in returns)
        self.stage_seconds = dict(sum((Counter(task.get("seconds", {})) for task in returns), Counter()))
        answers = [task["first_answer"] for task in returns if task.get("first_answer") is not None]
        self.first_answer = min(answers) if answers else None


UNWRITTEN_STATUS = "already_scored"  # medclf.imaging.stage.ALREADY_SCORED


def _tally(tables: list) -> dict:
    statuses: Counter = Counter()
    first_rows = 0
    for t in tables:
        statuses.update(t.column("status").to_pylist())
        if "first_row" in t.column_names:
            first_rows += int(pc.sum(t.column("first_row")).as_py() or 0)
    return {"statuses": dict(statuses), "first_rows": first_rows}
