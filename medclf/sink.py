"""A Ray Data sink that commits each predictions file atomically.

Why not `Dataset.write_parquet`: it writes straight to the final file name, so a job killed
mid-write leaves a half-written file that readers would take as data. Here every write task
buffers its rows (`rows_per_file`), writes the Parquet file under a hidden temporary name and
renames it into place (local disk), or uploads it in one PUT / completed multipart upload (S3,
where an object only becomes visible once complete). Readers (pyarrow datasets) ignore names
starting with '.' or '_', so a file is either fully there or not there at all.

With that, "what is in the output" is exactly "what was scored and committed": a restarted
nightly run skips those rows and scores the rest, so nothing is lost or duplicated.
"""

from __future__ import annotations

import io
import os
import uuid
from collections import Counter
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource.datasink import Datasink

from medclf import storage


class CommitPerFileDatasink(Datasink[list]):
    def __init__(self, folder: str, run_id: str, schema: pa.Schema, rows_per_file: int):
        self.folder = folder  # the run-date partition folder, e.g. <output>/run_date=2026-11-22
        self.run_id = run_id
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.committed: list = []  # (file, rows), filled on the driver when the write completes
        # Counted from every row, written or not: rows per `status`, and files (rows with `first_row`).
        self.statuses: Counter = Counter()
        self.first_rows = 0

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        counts = _tally(tables)
        # Rows of images scored in an earlier run are counted, not written again.
        tables = [t.filter(pc.field("status") != UNWRITTEN_STATUS) for t in tables]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"files": [], **counts}
        table = pa.concat_tables([t.select(self.schema.names).cast(self.schema) for t in tables])
        name = f"part-{self.run_id}-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        final = storage.join(self.folder, name)
        if storage.is_remote(final):
            storage.write_bytes(final, buf.getvalue())  # object appears only when the upload completes
        else:
            os.makedirs(self.folder, exist_ok=True)
            tmp = os.path.join(self.folder, f".{name}.tmp")
            with open(tmp, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # atomic on POSIX
        return {"files": [(final, table.num_rows)], **counts}

    def on_write_complete(self, write_result) -> None:
        returns = write_result.write_returns
        self.committed = [item for task in returns for item in task["files"]]
        self.statuses = sum((Counter(task["statuses"]) for task in returns), Counter())
        self.first_rows = sum(task["first_rows"] for task in returns)


UNWRITTEN_STATUS = "already_scored"  # medclf.score.ALREADY_SCORED


def _tally(tables: list) -> dict:
    statuses: Counter = Counter()
    first_rows = 0
    for t in tables:
        statuses.update(t.column("status").to_pylist())
        if "first_row" in t.column_names:
            first_rows += int(pc.sum(t.column("first_row")).as_py() or 0)
    return {"statuses": dict(statuses), "first_rows": first_rows}
