"""The Parquet lake: PostgreSQL tables (and Kafka topic ranges) as partitioned Parquet files.

    tcp export lake [--lake DIR] [--tables trades,candles,signals,bot_trades,bot_performance]
    tcp export topic okx.trades --from T --to T [--out DIR]

Layout (``DIR`` is ``TCP_LAKE_DIR``, default ``<home>/lake``)::

    DIR/<table>/inst_id=<id>/date=<YYYY-MM-DD>/part-<run>.parquet      (zstd)
    DIR/_lake.json                                                     (what was exported)

``inst_id`` and ``date`` (UTC day of the table's time column) are in the path only (hive
partitioning); bot_performance rows get their bot's instrument from the ``bots`` table.

**What is new.** Every exported table has ``written_at``, the start time of the transaction that
wrote or last changed the row (migration 0003 adds it to ``trades`` and refreshes it when a
candle is revised). A run exports the rows with ``previous bound <= written_at < bound`` and
records ``bound`` in ``_lake.json``. ``bound`` is the start of the oldest transaction still open
in the database just before the run's snapshot is taken (or that moment): a row with an
earlier ``written_at`` was written by a transaction that had finished by then, so the run's
snapshot sees it. So rows that arrive late with OLD timestamps (a backfill, a bot
started later) are exported by the next run, and a run with nothing new writes nothing. If the
database does not let the exporting role see other sessions (pg_stat_activity), the bound is
60 s before the run instead, and a transaction open longer than that could be missed: the run
says so in a warning.

**Files.** A run writes one file per partition it has rows for, named after the run, first into
``DIR/.staging/`` and then moved into place; ``_lake.json`` is updated last. A crash in between
leaves files that the next run (same run number, same rows and more) overwrites.

**Values.** Columns as in PostgreSQL, ``written_at`` included: ``timestamptz`` ->
``timestamp[us, UTC]``; trade prices and sizes, candle prices and volumes, signal prices ->
``decimal128(38, 18)`` when every value of the run fits, else exact canonical strings for that
run; the bots' money -> exact strings (no fixed scale: see backtest/export.py). Nothing is a float.

**Reading** (:func:`open_lake`, ``tcp sql``): DuckDB views named after the tables, one row per
natural key (the newest ``written_at``: a revised candle appears once, in its latest revision).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import duckdb
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql

__all__ = [
    "LAKE_TABLES",
    "LakeRun",
    "LakeTable",
    "export_lake",
    "lake_dir",
    "open_lake",
    "write_partitioned",
]

log = logging.getLogger(__name__)

LakeTable = Literal["trades", "candles", "signals", "bot_trades", "bot_performance"]
LAKE_TABLES: tuple[LakeTable, ...] = ("trades", "candles", "signals", "bot_trades", "bot_performance")

#: How a column is stored: exact decimal (decimal128(38, 18), strings if a value does not fit),
#: exact strings, text, int64, timestamp[us, UTC], JSON text.
Kind = Literal["decimal", "money", "text", "int", "time", "json"]

_DECIMAL = pa.decimal128(38, 18)
_TIME = pa.timestamp("us", tz="UTC")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STATE = "_lake.json"
#: Rows fetched per round trip, and the most rows of one partition held before writing them.
_CHUNK = 20_000
#: The bound used when the oldest open transaction cannot be seen.
_BLIND_MARGIN = timedelta(seconds=60)


@dataclass(frozen=True)
class _Table:
    """One lake table: its columns (without ``inst_id``), natural key, time column, source."""

    name: LakeTable
    columns: tuple[tuple[str, Kind], ...]
    key: tuple[str, ...]  # the natural key, inst_id included
    time_column: str
    #: FROM clause (``inst_id`` must be a column of it); a join for bot_performance.
    source: str = ""

    @property
    def sources(self) -> sql.Composable:
        return sql.SQL(self.source) if self.source else sql.Identifier(self.name)


_TABLES: dict[LakeTable, _Table] = {
    "trades": _Table(
        "trades",
        (
            ("trade_id", "int"),
            ("ts", "time"),
            ("px", "decimal"),
            ("sz", "decimal"),
            ("side", "text"),
            ("count", "int"),
            ("source", "int"),
            ("seq_id", "int"),
            ("origin", "text"),
            ("received_at", "time"),
            ("written_at", "time"),
        ),  # fmt: skip
        ("inst_id", "trade_id"),
        "ts",
    ),
    "candles": _Table(
        "candles",
        (
            ("timeframe", "text"),
            ("ts_close", "time"),
            ("open", "decimal"),
            ("high", "decimal"),
            ("low", "decimal"),
            ("close", "decimal"),
            ("volume", "decimal"),
            ("quote_volume", "decimal"),
            ("trade_count", "int"),
            ("vwap", "decimal"),
            ("first_trade_id", "int"),
            ("last_trade_id", "int"),
            ("revision", "int"),
            ("written_at", "time"),
        ),  # fmt: skip
        ("inst_id", "timeframe", "ts_close"),
        "ts_close",
    ),
    "signals": _Table(
        "signals",
        (
            ("strategy", "text"),
            ("params_hash", "text"),
            ("timeframe", "text"),
            ("ts_close", "time"),
            ("action", "text"),
            ("price", "decimal"),
            ("indicators", "json"),
            ("reason", "text"),
            ("written_at", "time"),
        ),  # fmt: skip
        ("strategy", "params_hash", "inst_id", "timeframe", "ts_close"),
        "ts_close",
    ),
    "bot_trades": _Table(
        "bot_trades",
        (
            ("bot", "text"),
            ("ts", "time"),
            ("side", "text"),
            ("seq", "int"),
            ("timeframe", "text"),
            ("price", "money"),
            ("size", "money"),
            ("notional", "money"),
            ("fee", "money"),
            ("cash_after", "money"),
            ("position_after", "money"),
            ("realized_pnl", "money"),
            ("written_at", "time"),
        ),  # fmt: skip
        ("bot", "ts", "side"),
        "ts",
    ),
    "bot_performance": _Table(
        "bot_performance",
        (
            ("bot", "text"),
            ("ts_close", "time"),
            ("close", "money"),
            ("cash", "money"),
            ("position", "money"),
            ("equity", "money"),
            ("unrealized_pnl", "money"),
            ("realized_pnl", "money"),
            ("fees_paid", "money"),
            ("written_at", "time"),
        ),  # fmt: skip
        ("bot", "ts_close"),
        "ts_close",
        "(SELECT p.*, coalesce(b.inst_id, '_unknown') AS inst_id FROM bot_performance p "
        "LEFT JOIN bots b ON b.name = p.bot) AS bot_performance",
    ),
}


def lake_dir(home: Path, configured: Path | None) -> Path:
    """The lake directory: ``TCP_LAKE_DIR``, else ``<home>/lake``."""
    return configured if configured is not None else home.resolve() / "lake"


# --------------------------------------------------------------------------------------------
# Rows -> Arrow


class _DoesNotFit(Exception):
    """A value does not fit decimal128(38, 18): the run starts again with strings."""


def _canonical(text: str | None) -> str | None:
    """PostgreSQL's numeric text in canonical form (``"1.2300"`` -> ``"1.23"``, ``"-0.0"`` -> ``"0"``)."""
    if text is None or "." not in text:
        return text
    text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _arrow_type(kind: Kind, decimals: bool) -> pa.DataType:
    if kind == "decimal":
        return _DECIMAL if decimals else pa.string()
    if kind == "int":
        return pa.int64()
    if kind == "time":
        return _TIME
    return pa.string()


def _schema(table: _Table, decimals: bool) -> pa.Schema:
    return pa.schema([(name, _arrow_type(kind, decimals)) for name, kind in table.columns])


def _array(kind: Kind, values: list[Any], decimals: bool) -> pa.Array:
    """A column as selected: times as epoch microseconds, numerics as PostgreSQL's text."""
    if kind == "time":
        return pa.array(values, pa.int64()).cast(_TIME)
    if kind == "decimal" and decimals:
        try:  # Arrow's cast is exact: it refuses a value it would have to round
            return pa.array(values, pa.string()).cast(_DECIMAL)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise _DoesNotFit(str(exc)) from exc
    if kind in ("decimal", "money"):
        return pa.array([_canonical(v) for v in values], pa.string())
    return pa.array(values, _arrow_type(kind, decimals))


def _batch(table: _Table, schema: pa.Schema, rows: Sequence[tuple[Any, ...]], decimals: bool) -> pa.Table:
    """Rows as selected by :func:`_select` (inst_id, date, then the columns) -> Arrow."""
    arrays = [_array(kind, [r[i + 2] for r in rows], decimals) for i, (_, kind) in enumerate(table.columns)]
    return pa.table(arrays, schema=schema)


# --------------------------------------------------------------------------------------------
# Writing partitions


def _partition_dir(root: Path, table: str, inst_id: str, day: str) -> Path:
    if not inst_id or "/" in inst_id or inst_id.startswith("."):
        msg = f"{table}: cannot make a partition for the instrument {inst_id!r}"
        raise ValueError(msg)
    return root / table / f"inst_id={inst_id}" / f"date={day}"


def write_partitioned(
    root: Path,
    table: str,
    schema: pa.Schema,
    groups: Iterable[tuple[tuple[str, str], pa.Table]],
    *,
    name: str,
) -> dict[Path, int]:
    """Write consecutive groups of rows, each ``((inst_id, day), arrow table)``, to
    ``root/<table>/inst_id=.../date=.../<name>.parquet``; the groups of one partition must come
    together (the caller orders by partition). Returns rows per file written."""
    written: dict[Path, int] = {}
    writer: pq.ParquetWriter | None = None
    current: tuple[str, str] | None = None
    path = Path()
    try:
        for part, batch in groups:
            if part != current:
                if writer is not None:
                    writer.close()
                current = part
                folder = _partition_dir(root, table, *part)
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{name}.parquet"
                writer = pq.ParquetWriter(str(path), schema, compression="zstd")
                written[path] = 0
            assert writer is not None
            writer.write_table(batch)
            written[path] += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    return written


def _column(name: str, kind: Kind) -> sql.Composable:
    """How a column is selected: numerics and JSON as text (exact), times as epoch microseconds
    (cheaper than datetimes in Python; ``extract`` is exact numeric)."""
    if kind in ("decimal", "money", "json"):
        return sql.SQL("{}::text").format(sql.Identifier(name))
    if kind == "time":
        return sql.SQL("(extract(epoch FROM {}) * 1000000)::bigint").format(sql.Identifier(name))
    return sql.Identifier(name)


def _select(table: _Table) -> sql.Composed:
    columns = [_column(name, kind) for name, kind in table.columns]
    time_column = sql.Identifier(table.time_column)
    return sql.SQL(
        "SELECT inst_id, to_char({time} AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, {columns} FROM {source} "
        "WHERE written_at >= %s AND written_at < %s ORDER BY inst_id, day, {key}"
    ).format(
        time=time_column,
        columns=sql.SQL(", ").join(columns),
        source=table.sources,
        key=sql.SQL(", ").join(sql.Identifier(k) for k in table.key if k != "inst_id"),
    )


def _groups(
    cur: psycopg.Cursor[Any], table: _Table, schema: pa.Schema, decimals: bool
) -> Iterator[tuple[tuple[str, str], pa.Table]]:
    """The cursor's rows as Arrow tables of one partition each (at most ``_CHUNK`` rows)."""
    pending: list[tuple[Any, ...]] = []
    part: tuple[str, str] | None = None
    while rows := cur.fetchmany(_CHUNK):
        for row in rows:
            key = (row[0], row[1])
            if key != part and pending:
                assert part is not None
                yield part, _batch(table, schema, pending, decimals)
                pending = []
            part = key
            pending.append(row)
        if len(pending) >= _CHUNK and part is not None:
            yield part, _batch(table, schema, pending, decimals)
            pending = []
    if pending and part is not None:
        yield part, _batch(table, schema, pending, decimals)


# --------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True, slots=True)
class LakeRun:
    """What one run exported for one table: rows, files, and the ``written_at`` range."""

    table: LakeTable
    rows: int
    files: int
    since: datetime | None
    bound: datetime
    run: int


def _load_state(root: Path) -> dict[str, dict[str, Any]]:
    path = root / _STATE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"{path}: the lake's state file cannot be read ({exc}); move it away to export everything again"
        raise ValueError(msg) from exc
    tables = data.get("tables")
    if not isinstance(tables, dict):
        msg = f"{path}: not a lake state file (no 'tables')"
        raise ValueError(msg)
    return tables


def _save_state(root: Path, tables: dict[str, dict[str, Any]]) -> None:
    path = root / _STATE
    partial = root / f".{_STATE}.partial"
    partial.write_text(json.dumps({"version": 1, "tables": tables}, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def _bound(conn: psycopg.Connection[Any]) -> datetime:
    """The run's upper bound (module docstring). Read BEFORE the run's snapshot is taken: a row
    with an earlier ``written_at`` was written by a transaction that had started before this
    moment and was no longer open at it, so it committed before the snapshot."""
    row = conn.execute(
        "SELECT clock_timestamp(), (SELECT min(xact_start) FROM pg_stat_activity"
        "  WHERE backend_type = 'client backend' AND xact_start IS NOT NULL AND pid <> pg_backend_pid()),"
        " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
        " OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER')"
    ).fetchone()
    assert row is not None
    now, oldest, sees_all = row
    if not sees_all:
        log.warning(
            "the lake export cannot see other sessions (needs pg_read_all_stats): exporting rows written "
            "more than %d s ago; a transaction open longer than that could be missed",
            _BLIND_MARGIN.seconds,
        )
        return now - _BLIND_MARGIN
    return now if oldest is None else min(now, oldest)


def _export_table(
    conn: psycopg.Connection[Any],
    root: Path,
    table: _Table,
    since: datetime | None,
    bound: datetime,
    run: int,
) -> tuple[int, int]:
    """This table's rows of ``since <= written_at < bound`` into ``root/.staging``, then into
    place. Returns (rows, files)."""
    staging = root / ".staging"
    lower = since if since is not None else datetime(1, 1, 1, tzinfo=UTC)
    for decimals in (True, False):
        shutil.rmtree(staging, ignore_errors=True)
        schema = _schema(table, decimals)
        try:
            with conn.cursor(name=f"tcp_lake_{table.name}") as cur:
                cur.itersize = _CHUNK
                cur.execute(_select(table), (lower, bound))
                written = write_partitioned(staging, table.name, schema, _groups(cur, table, schema, decimals),
                                            name=f"part-{run:06d}")  # fmt: skip
            break
        except _DoesNotFit as exc:
            if not decimals:  # pragma: no cover - strings always fit
                raise
            log.warning(
                "%s: a value does not fit decimal128(38, 18) (%s): this run writes strings", table.name, exc
            )
    for path in written:
        target = root / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)
    return sum(written.values()), len(written)


def export_lake(
    dsn: str,
    root: Path,
    *,
    tables: Sequence[LakeTable] = LAKE_TABLES,
    progress: Callable[[LakeRun], None] | None = None,
) -> list[LakeRun]:
    """Export what is new in ``tables`` to the lake at ``root`` (made if needed); see the module
    docstring. Each table is one read-only REPEATABLE READ snapshot. Returns one LakeRun per table."""
    unknown = [t for t in tables if t not in _TABLES]
    if unknown:
        msg = f"unknown lake table(s) {', '.join(map(repr, unknown))}: expected some of {', '.join(LAKE_TABLES)}"
        raise ValueError(msg)
    root.mkdir(parents=True, exist_ok=True)
    state = _load_state(root)
    runs: list[LakeRun] = []
    for name in tables:
        table = _TABLES[name]
        done = state.get(name, {})
        since = datetime.fromisoformat(done["through"]) if "through" in done else None
        run = int(done.get("runs", 0)) + 1
        with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
            bound = _bound(conn)  # before the snapshot (see _bound)
            if since is not None and bound <= since:
                bound = since
            conn.autocommit = False
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            with conn.transaction():
                rows, files = (
                    _export_table(conn, root, table, since, bound, run) if bound != since else (0, 0)
                )
        result = LakeRun(name, rows, files, since, bound, run if files else run - 1)
        state[name] = {"through": bound.isoformat(), "runs": result.run,
                       "rows": int(done.get("rows", 0)) + rows}  # fmt: skip
        _save_state(root, state)
        runs.append(result)
        if progress is not None:
            progress(result)
    return runs


# --------------------------------------------------------------------------------------------
# Reading


def _view(name: LakeTable, folder: Path) -> str:
    table = _TABLES[name]
    key = ", ".join(table.key)
    files = str(folder / "**" / "*.parquet").replace("'", "''")
    return (
        f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{files}', hive_partitioning = true, "
        f"union_by_name = true) QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY written_at DESC) = 1"
    )


def open_lake(
    root: Path, *, connection: duckdb.DuckDBPyConnection | None = None
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view per lake table that has files (``trades``, ``candles``,
    ...): one row per natural key, the newest ``written_at``; ``inst_id`` and ``date`` come from
    the partition path. Raises ``FileNotFoundError`` when ``root`` holds no lake table."""
    con = connection or duckdb.connect()
    found = []
    for name in LAKE_TABLES:
        folder = root / name
        if folder.is_dir() and next(folder.rglob("*.parquet"), None) is not None:
            con.execute(_view(name, folder))  # names are our constants; the path is quoted
            found.append(name)
    if not found:
        msg = f"no lake table under {root} (run `tcp export lake` first)"
        raise FileNotFoundError(msg)
    return con


# --------------------------------------------------------------------------------------------
# Kafka topic ranges


@dataclass(frozen=True, slots=True)
class TopicExport:
    """What ``tcp export topic`` did: trades written, messages outside the range, messages that
    are not valid trades (counted, not written), files."""

    rows: int
    outside: int
    invalid: int
    files: int


def _trade_rows(trades: list[Any], stamps: list[int]) -> list[tuple[Any, ...]]:
    """Trades (tcp.schemas.Trade) as lake rows: inst_id, day, then the trades columns; the
    message time stamp as ``written_at`` (when the trade reached Kafka)."""

    def day(ms: int) -> str:
        return (_EPOCH + timedelta(milliseconds=ms)).date().isoformat()

    return [
        (t.inst_id, day(t.ts), t.trade_id, t.ts * 1000, t.px, t.sz, t.side, t.count, t.source, t.seq_id, t.origin,
         t.received_at * 1000 if t.received_at else None, stamp * 1000)
        for t, stamp in zip(trades, stamps, strict=True)
    ]  # fmt: skip


#: The most trades ``export_topic`` holds before writing them (about 300 bytes each).
_TOPIC_HOLD = 500_000


def _flush(root: Path, pending: dict[tuple[str, str], list[tuple[Any, ...]]], name: str) -> dict[Path, int]:
    """One file per partition held, rows in trade id order (strings where decimals do not fit)."""
    table = _TABLES["trades"]
    written: dict[Path, int] = {}
    for part in sorted(pending):
        rows = sorted(pending[part], key=lambda r: r[2])
        try:
            batch = _batch(table, _schema(table, True), rows, True)
        except _DoesNotFit:
            batch = _batch(table, _schema(table, False), rows, False)
        written.update(write_partitioned(root, "trades", batch.schema, [(part, batch)], name=name))
    return written


def export_topic(
    bootstrap: str,
    topic: str,
    root: Path,
    *,
    since_ms: int,
    until_ms: int,
    idle_timeout_s: float = 10.0,
) -> TopicExport:
    """Copy the trades of ``topic`` whose MESSAGE time stamp is in ``since_ms <= t < until_ms``
    into the lake's ``trades`` table at ``root``.

    Every partition is read from its start to its end (``enable.partition.eof``; offsets are
    never looked up by time: the local broker does not implement it), so the result does not
    depend on producers' time stamps being in order. Files are named after the topic and the
    range (and a sequence number: at most ``_TOPIC_HOLD`` trades are held in memory, then
    written), so exporting the same range again replaces them. Messages that are not valid
    trades are counted, not written. Raises ``ValueError`` for an empty range or a missing topic.
    """
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    from tcp.schemas import decode_trades

    if until_ms <= since_ms:
        msg = "the range is empty: --to must be after --from"
        raise ValueError(msg)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "tcp-export-topic", "enable.auto.commit": False,
                         "enable.partition.eof": True, "fetch.queue.backoff.ms": 10})  # fmt: skip
    pending: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    outside = invalid = held = 0
    flushes: list[int] = []
    written: dict[Path, int] = {}
    base = f"part-topic-{topic}-{since_ms}-{until_ms}".replace("/", "_")
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            msg = f"topic {topic!r} does not exist on {bootstrap}"
            raise ValueError(msg)
        consumer.assign([TopicPartition(topic, p, 0) for p in metadata.partitions])
        open_parts = set(metadata.partitions)
        while open_parts:
            msgs = consumer.consume(5000, idle_timeout_s)
            if not msgs:
                msg = f"{topic}: no message nor end of partition for {idle_timeout_s:.0f} s (partitions {sorted(open_parts)})"
                raise TimeoutError(msg)
            values, stamps = [], []
            for m in msgs:
                error = m.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        open_parts.discard(m.partition())
                        continue
                    raise RuntimeError(f"error reading {topic}[{m.partition()}]: {error.str()}")  # noqa: EM102
                stamp = m.timestamp()[1]
                if since_ms <= stamp < until_ms:
                    values.append(m.value() or b"")
                    stamps.append(stamp)
                else:
                    outside += 1
            trades, bad = decode_trades(values)
            invalid += len(bad)
            if bad:
                bad_at = {i for i, _ in bad}
                stamps = [s for i, s in enumerate(stamps) if i not in bad_at]
            for row in _trade_rows(trades, stamps):
                pending.setdefault((row[0], row[1]), []).append(row)
            held += len(trades)
            if held >= _TOPIC_HOLD:  # bounded memory: write what is held, as the next files
                written.update(_flush(root, pending, f"{base}-{len(flushes):04d}"))
                flushes.append(held)
                pending, held = {}, 0
    finally:
        consumer.close()
    if pending:
        written.update(_flush(root, pending, f"{base}-{len(flushes):04d}"))
    return TopicExport(sum(written.values()), outside, invalid, len(written))
