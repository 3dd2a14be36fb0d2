"""A Bytewax sink that upserts rows into PostgreSQL through :class:`sinks.postgres.PostgresWriter`.

Bytewax hands each worker's partition a batch of rows per activation; the partition writes it at
once, in chunks of at most ``max_rows`` (flush by size), so nothing waits in memory past the
batch (flush by age: immediately) and nothing is buffered across a snapshot: a crash cannot lose
a row the recovery store believes written. While PostgreSQL is down ``write_batch`` blocks and
retries, which stalls the dataflow instead of growing memory (backpressure).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from sinks.postgres import PostgresWriter, Upsert
from tcp.observe import SINK_ROWS, SINK_SECONDS

__all__ = ["PostgresSink", "Row"]


Row = Sequence[Any]


class _Partition(StatelessSinkPartition[list[Row]]):
    def __init__(self, writer: PostgresWriter, max_rows: int, table: str) -> None:
        self._writer = writer
        self._max_rows = max_rows
        self._rows_metric = SINK_ROWS.labels(f"postgres:{table}")
        self._seconds_metric = SINK_SECONDS.labels(f"postgres:{table}")

    def write_batch(self, items: list[list[Row]]) -> None:
        rows = [row for chunk in items for row in chunk]
        for start in range(0, len(rows), self._max_rows):
            chunk = rows[start : start + self._max_rows]
            began = time.perf_counter()
            self._writer.write(chunk)
            self._seconds_metric.observe(time.perf_counter() - began)
            self._rows_metric.observe(len(chunk))

    def close(self) -> None:
        self._writer.close()


class PostgresSink(DynamicSink[list[Row]]):
    """Lists of rows (tuples in ``upsert.columns`` order) into one table, idempotently.

    Items are lists so that a step can hand over a whole batch as one dataflow item (Bytewax's
    cost is per item). One connection per worker.
    """

    def __init__(self, dsn: str, upsert: Upsert, *, max_rows: int = 5_000) -> None:
        self._dsn = dsn
        self._upsert = upsert
        self._max_rows = max_rows

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Partition:
        return _Partition(PostgresWriter(self._dsn, self._upsert), self._max_rows, self._upsert.table)
