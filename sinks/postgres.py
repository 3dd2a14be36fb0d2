"""Idempotent batch writes to PostgreSQL: upsert on natural keys, retry while the database is down.

A batch is copied into a temporary staging table (COPY: the fast path into PostgreSQL) and merged
with one ``INSERT ... SELECT DISTINCT ON (key) ... ON CONFLICT (key) DO UPDATE/NOTHING``. Writing
the same rows twice leaves the table as writing them once: a restart that replays rows (Bytewax
recovery is at-least-once) neither loses nor duplicates anything.

``write`` blocks until the batch is in the database. While PostgreSQL is unreachable it retries
with capped exponential backoff, so the caller (a dataflow step) waits instead of buffering
without bound: that is the backpressure.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

__all__ = ["PostgresWriter", "Upsert"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upsert:
    """How rows of one table are merged.

    ``newer`` names a column (e.g. ``revision``): a conflicting row replaces the stored one only
    when its value is greater. ``newer=None`` with ``update=True``: the last row written wins
    (within one batch too: the writer keeps the last row of each key). ``update=False`` keeps
    the first row written (``DO NOTHING``), right for immutable facts such as trades.
    """

    table: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    update: bool = True
    newer: str | None = None

    def __post_init__(self) -> None:
        missing = [k for k in (*self.key, *([self.newer] if self.newer else [])) if k not in self.columns]
        if missing:
            msg = f"Upsert for {self.table!r}: key/newer columns {missing} are not among the columns"
            raise ValueError(msg)

    def last_per_key(self, rows: Sequence[Sequence[Any]]) -> Sequence[Sequence[Any]]:
        """``rows`` with only the last row of each key (in their order) when the last one wins."""
        if not self.update or self.newer is not None:
            return rows
        at = [self.columns.index(k) for k in self.key]
        last = {tuple(row[i] for i in at): row for row in rows}
        return rows if len(last) == len(rows) else list(last.values())

    def _stage(self) -> sql.Identifier:
        return sql.Identifier(f"_stage_{self.table}")

    def create_stage(self) -> sql.Composed:
        return sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        ).format(stage=self._stage(), table=sql.Identifier(self.table))

    def copy(self) -> sql.Composed:
        return sql.SQL("COPY {stage} ({cols}) FROM STDIN").format(
            stage=self._stage(), cols=sql.SQL(", ").join(map(sql.Identifier, self.columns))
        )

    def merge(self) -> sql.Composed:
        table, stage = sql.Identifier(self.table), self._stage()
        cols = sql.SQL(", ").join(map(sql.Identifier, self.columns))
        key = sql.SQL(", ").join(map(sql.Identifier, self.key))
        if not self.update:
            # DO NOTHING tolerates a key twice in one statement: no need to sort the batch.
            return sql.SQL(
                "INSERT INTO {table} ({cols}) SELECT {cols} FROM {stage} ON CONFLICT ({key}) DO NOTHING"
            ).format(table=table, cols=cols, stage=stage, key=key)
        sets = sql.SQL(", ").join(
            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c))
            for c in self.columns
            if c not in self.key
        )
        order: sql.Composable = key
        action: sql.Composable = sql.SQL("DO UPDATE SET {sets}").format(sets=sets)
        if self.newer:
            newer = sql.Identifier(self.newer)
            order = sql.SQL("{key}, {newer} DESC").format(key=key, newer=newer)
            action = sql.SQL("{action} WHERE {table}.{newer} < EXCLUDED.{newer}").format(
                action=action, table=table, newer=newer
            )
        # DISTINCT ON: one row per key (the newest), since DO UPDATE may not touch a row twice.
        return sql.SQL(
            "INSERT INTO {table} ({cols}) SELECT DISTINCT ON ({key}) {cols} FROM {stage} ORDER BY {order} "
            "ON CONFLICT ({key}) {action}"
        ).format(table=table, cols=cols, key=key, stage=stage, order=order, action=action)


class PostgresWriter:
    """Writes batches of rows (tuples in ``upsert.columns`` order) to one table, idempotently."""

    def __init__(
        self,
        dsn: str,
        upsert: Upsert,
        *,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
        give_up_after_s: float | None = None,
    ) -> None:
        self._dsn = dsn
        self._upsert = upsert
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._give_up_after_s = give_up_after_s
        self._conn: psycopg.Connection[Any] | None = None
        self._copy_sql = upsert.copy()
        self._merge_sql = upsert.merge()
        self.rows_written = 0
        self.retries = 0

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        """Upsert ``rows``; returns once they are committed. Retries while the database is down."""
        if not rows:
            return
        rows = self._upsert.last_per_key(rows)
        delay = self._retry_initial_s
        started = time.monotonic()
        while True:
            try:
                self._write_once(rows)
                self.rows_written += len(rows)
                return
            except psycopg.OperationalError as exc:
                self._drop_connection()
                waited = time.monotonic() - started
                if self._give_up_after_s is not None and waited > self._give_up_after_s:
                    raise
                self.retries += 1
                log.warning(
                    "PostgreSQL write to %s failed (%s); retrying in %.1f s (%d rows held)",
                    self._upsert.table,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                    delay,
                    len(rows),
                )
                time.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, self._retry_max_s)

    def _write_once(self, rows: Sequence[Sequence[Any]]) -> None:
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(self._copy_sql) as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(self._merge_sql)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=5)
            self._conn.execute(self._upsert.create_stage())
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._drop_connection()
