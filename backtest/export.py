"""``tcp export``: what is in PostgreSQL (candles, signals, bot fills, bot equity) to Parquet.

:func:`export_table` streams one table's rows, filtered, through a server-side cursor in chunks
of ``chunk_rows`` (memory stays bounded whatever the size of the table) into a Parquet file
(zstd), one row group per chunk, in primary-key order (text columns in the database's
collation), and returns the number of rows written. Memory: about 125 MB above the process's
baseline for the default 20,000-row chunks of candles (measured), whatever the number of rows. It reads in one read-only REPEATABLE READ transaction: the file is one snapshot.
The file appears only when complete (written beside it, then renamed); an empty result still
writes a valid file with the schema.

Filters (keyword-only; ``None`` = no filter). A filter a table has no column for is an error:

==================  =====================================  ===============
table               filters                                time column
==================  =====================================  ===============
candles             inst_id, timeframe, start, end         ts_close
signals             strategy, inst_id, timeframe, start,   ts_close
                    end
bot-trades          bot, inst_id, timeframe, start, end    ts
bot-performance     bot, start, end                        ts_close
==================  =====================================  ===============

Time range: ``start <= time < end`` (start inclusive, end exclusive), so consecutive ranges
never share a row. Bounds are timezone-aware datetimes or epoch milliseconds (UTC);
:func:`parse_time` reads the command line's ISO-8601 times (no offset means UTC) and epoch ms.

Columns. ``candles``: exactly the columns, types and order of ``tcp candles build`` — the rows
go through :func:`dataflows.build.candles_table`, so the two cannot drift: ``ts_close`` is
``timestamp[ms, tz=UTC]``, prices and volumes ``decimal128(38, 18)`` and, as in build, when a
value does not fit that exactly (more than 18 decimals or 20 integer digits), ``decimals="auto"``
(the default) writes every decimal column as exact canonical strings instead (``"decimal"``
raises, ``"string"`` always writes strings). ``auto`` finds out while writing: at the first value
that does not fit it starts the file again with strings (a second read, same snapshot). The other tables: their columns in table order,
without ``written_at`` (when the row reached the database, not data); ``text`` -> string,
integers -> int64, ``timestamptz`` -> ``timestamp[us, tz=UTC]`` (PostgreSQL's resolution, exact),
``jsonb`` -> string (the JSON text), and ``numeric`` -> **exact canonical decimal strings**
(plain notation, no exponent, no trailing zeros: ``"0.000001234"``, ``"1250"``). Strings,
because the bots' money has no fixed scale: a fee is price x size x rate, up to 12 + 12 + 3 or
more decimals, beyond what decimal128(38, 18) holds, and a scale chosen per file would make the
schema depend on the data. Cast in the reader (``CAST(fee AS DECIMAL(38, 30))`` in DuckDB,
``Decimal(x)`` in Python). Nothing is ever a float.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast, get_args

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql

from dataflows.build import DecimalMode, candles_table
from dataflows.candle_core import Candle

__all__ = [
    "EXPORT_TABLES",
    "ExportTable",
    "TimeBound",
    "check_filters",
    "export_schema",
    "export_table",
    "parse_time",
]

log = logging.getLogger(__name__)

ExportTable = Literal["candles", "signals", "bot-trades", "bot-performance"]
EXPORT_TABLES: tuple[ExportTable, ...] = get_args(ExportTable)

#: A time bound: a timezone-aware datetime, or epoch milliseconds (UTC).
TimeBound = datetime | int

#: Rows fetched from the server-side cursor and written as one Parquet row group at a time.
CHUNK_ROWS = 20_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_US = timedelta(microseconds=1)

Kind = Literal["text", "int", "numeric", "time", "json"]
Filter = Literal["inst_id", "timeframe", "bot", "strategy"]

_ARROW: dict[Kind, pa.DataType] = {
    "text": pa.string(),
    "int": pa.int64(),
    "numeric": pa.string(),
    "time": pa.timestamp("us", tz="UTC"),
    "json": pa.string(),
}


@dataclass(frozen=True)
class _Spec:
    """One exportable table: its columns (name, kind) in order, key, time column, filters."""

    name: str
    columns: tuple[tuple[str, Kind], ...]
    key: tuple[str, ...]
    time_column: str
    filters: tuple[Filter, ...]


_CANDLES = _Spec(
    "candles",
    (
        ("inst_id", "text"),
        ("timeframe", "text"),
        ("ts_close", "time"),
        ("open", "numeric"),
        ("high", "numeric"),
        ("low", "numeric"),
        ("close", "numeric"),
        ("volume", "numeric"),
        ("quote_volume", "numeric"),
        ("trade_count", "int"),
        ("vwap", "numeric"),
        ("first_trade_id", "int"),
        ("last_trade_id", "int"),
        ("revision", "int"),
    ),
    ("inst_id", "timeframe", "ts_close"),
    "ts_close",
    ("inst_id", "timeframe"),
)

_SPECS: dict[ExportTable, _Spec] = {
    "candles": _CANDLES,
    "signals": _Spec(
        "signals",
        (
            ("strategy", "text"),
            ("params_hash", "text"),
            ("inst_id", "text"),
            ("timeframe", "text"),
            ("ts_close", "time"),
            ("action", "text"),
            ("price", "numeric"),
            ("indicators", "json"),
            ("reason", "text"),
        ),
        ("strategy", "params_hash", "inst_id", "timeframe", "ts_close"),
        "ts_close",
        ("strategy", "inst_id", "timeframe"),
    ),
    "bot-trades": _Spec(
        "bot_trades",
        (
            ("bot", "text"),
            ("ts", "time"),
            ("side", "text"),
            ("seq", "int"),
            ("inst_id", "text"),
            ("timeframe", "text"),
            ("price", "numeric"),
            ("size", "numeric"),
            ("notional", "numeric"),
            ("fee", "numeric"),
            ("cash_after", "numeric"),
            ("position_after", "numeric"),
            ("realized_pnl", "numeric"),
        ),
        ("bot", "ts", "side"),
        "ts",
        ("bot", "inst_id", "timeframe"),
    ),
    "bot-performance": _Spec(
        "bot_performance",
        (
            ("bot", "text"),
            ("ts_close", "time"),
            ("close", "numeric"),
            ("cash", "numeric"),
            ("position", "numeric"),
            ("equity", "numeric"),
            ("unrealized_pnl", "numeric"),
            ("realized_pnl", "numeric"),
            ("fees_paid", "numeric"),
        ),
        ("bot", "ts_close"),
        "ts_close",
        ("bot",),
    ),
}


# --------------------------------------------------------------------------------------------
# Filters and times


def parse_time(text: str) -> datetime:
    """An ISO-8601 time (``2024-01-01``, ``2024-01-01T00:00:00Z``, ``...+02:00``; no offset
    means UTC) or epoch milliseconds (``1704067200000``), as an aware UTC datetime."""
    value = text.strip()
    if value.lstrip("-").isdigit():
        return _from_ms(int(value))
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        msg = f"expected an ISO-8601 time (e.g. 2024-01-01T00:00:00Z) or epoch milliseconds, got {text!r}"
        raise ValueError(msg) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _from_ms(ms: int) -> datetime:
    try:
        return _EPOCH + ms * _MS
    except OverflowError:
        msg = f"epoch milliseconds {ms} are out of range"
        raise ValueError(msg) from None


def _bound(name: str, value: TimeBound) -> datetime:
    if isinstance(value, bool) or not isinstance(value, datetime | int):
        msg = f"{name} must be a timezone-aware datetime or epoch milliseconds, got {value!r}"
        raise TypeError(msg)
    if isinstance(value, int):
        return _from_ms(value)
    if value.tzinfo is None or value.utcoffset() is None:
        msg = f"{name} is a naive datetime ({value.isoformat()}): give it a timezone (e.g. tzinfo=UTC)"
        raise ValueError(msg)
    return value


def _spec(table: str) -> _Spec:
    spec = _SPECS.get(cast(ExportTable, table))
    if spec is None:
        msg = f"unknown table {table!r}: expected one of {', '.join(EXPORT_TABLES)}"
        raise ValueError(msg)
    return spec


@dataclass(frozen=True)
class _Query:
    spec: _Spec
    where: tuple[tuple[str, str], ...]  # (column, "=" | ">=" | "<")
    params: tuple[object, ...]


def _query(
    table: ExportTable,
    *,
    inst_id: str | None,
    timeframe: str | None,
    start: TimeBound | None,
    end: TimeBound | None,
    bot: str | None,
    strategy: str | None,
) -> _Query:
    spec = _spec(table)
    where: list[tuple[str, str]] = []
    params: list[object] = []
    given: dict[Filter, str | None] = {
        "inst_id": inst_id,
        "timeframe": timeframe,
        "bot": bot,
        "strategy": strategy,
    }
    for name, value in given.items():
        if value is None:
            continue
        if name not in spec.filters:
            allowed = ", ".join((*spec.filters, "start", "end"))
            msg = f"{table} cannot be filtered by {name} (its filters: {allowed})"
            raise ValueError(msg)
        if not value:
            msg = f"the {name} filter is empty"
            raise ValueError(msg)
        where.append((name, "="))
        params.append(value)
    low = _bound("start", start) if start is not None else None
    high = _bound("end", end) if end is not None else None
    if low is not None and high is not None and high <= low:
        msg = (
            f"end ({high.isoformat()}) must be after start ({low.isoformat()}): the range is start <= t < end"
        )
        raise ValueError(msg)
    if low is not None:
        where.append((spec.time_column, ">="))
        params.append(low)
    if high is not None:
        where.append((spec.time_column, "<"))
        params.append(high)
    return _Query(spec, tuple(where), tuple(params))


def check_filters(
    table: ExportTable,
    *,
    inst_id: str | None = None,
    timeframe: str | None = None,
    start: TimeBound | None = None,
    end: TimeBound | None = None,
    bot: str | None = None,
    strategy: str | None = None,
) -> None:
    """Raise ``ValueError`` (``TypeError`` for a wrong bound type) as :func:`export_table` would,
    without touching the database: a filter the table has no column for, an empty filter, a
    naive datetime, an ``end`` not after ``start``, an unknown table."""
    _query(table, inst_id=inst_id, timeframe=timeframe, start=start, end=end, bot=bot, strategy=strategy)


def _select(query: _Query) -> sql.Composed:
    spec = query.spec
    columns = [
        sql.SQL("{}::text").format(sql.Identifier(name))  # numeric: exact text; jsonb: the JSON text
        if kind in ("numeric", "json")
        else sql.Identifier(name)
        for name, kind in spec.columns
    ]
    conditions = [
        sql.SQL("{} {} %s").format(sql.Identifier(column), sql.SQL(op)) for column, op in query.where
    ]
    where = sql.SQL(" WHERE {}").format(sql.SQL(" AND ").join(conditions)) if conditions else sql.SQL("")
    return sql.SQL("SELECT {columns} FROM {table}{where} ORDER BY {key}").format(
        columns=sql.SQL(", ").join(columns),
        table=sql.Identifier(spec.name),
        where=where,
        key=sql.SQL(", ").join(map(sql.Identifier, spec.key)),
    )


# --------------------------------------------------------------------------------------------
# Rows -> Arrow


def _canonical(text: str | None) -> str | None:
    """PostgreSQL's numeric text (``"1.2300"``, ``"-0.0"``) in canonical form (``"1.23"``, ``"0"``)."""
    if text is None or "." not in text:
        return text
    text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _epoch(value: datetime, unit: timedelta) -> int:
    return (value - _EPOCH) // unit


def _candles(rows: Sequence[tuple[Any, ...]]) -> list[Candle]:
    return [
        Candle(
            inst_id=r[0],
            timeframe=r[1],
            ts_close=_epoch(r[2], _MS),
            open=_canonical(r[3]) or "0",
            high=_canonical(r[4]) or "0",
            low=_canonical(r[5]) or "0",
            close=_canonical(r[6]) or "0",
            volume=_canonical(r[7]) or "0",
            quote_volume=_canonical(r[8]) or "0",
            trade_count=r[9],
            vwap=_canonical(r[10]),
            first_trade_id=r[11],
            last_trade_id=r[12],
            revision=r[13],
        )
        for r in rows
    ]


class _DoesNotFit(Exception):
    """A candle value does not fit decimal128(38, 18): ``auto`` starts again with strings."""


def _candle_batch(rows: Sequence[tuple[Any, ...]], mode: DecimalMode) -> pa.Table:
    try:
        return candles_table(_candles(rows), mode)
    except ValueError as exc:  # raised only by "decimal" mode, when a value does not fit
        raise _DoesNotFit(str(exc)) from exc


def _generic_schema(spec: _Spec) -> pa.Schema:
    return pa.schema([(name, _ARROW[kind]) for name, kind in spec.columns])


def _generic_batch(spec: _Spec, schema: pa.Schema, rows: Sequence[tuple[Any, ...]]) -> pa.Table:
    arrays = []
    for i, (_, kind) in enumerate(spec.columns):
        values = [r[i] for r in rows]
        if kind == "numeric":
            values = [_canonical(v) for v in values]
        elif kind == "time":
            values = [None if v is None else _epoch(v, _US) for v in values]
            arrays.append(pa.array(values, pa.int64()).cast(_ARROW["time"]))
            continue
        arrays.append(pa.array(values, _ARROW[kind]))
    return pa.table(arrays, schema=schema)


def export_schema(table: ExportTable, decimals: DecimalMode = "auto") -> pa.Schema:
    """The schema of an export of ``table``. For candles it is that of ``tcp candles build``
    (decimal128 columns, or strings with ``decimals="string"``; ``"auto"`` may switch to strings
    when the data needs it)."""
    spec = _spec(table)
    if spec is _CANDLES:
        return candles_table([], "string" if decimals == "string" else "decimal").schema
    return _generic_schema(spec)


# --------------------------------------------------------------------------------------------
# Export


def _write(
    conn: psycopg.Connection[Any], query: _Query, path: Path, mode: DecimalMode, chunk_rows: int
) -> int:
    """One pass: the query's rows, chunk by chunk, into ``path``. Raises ``_DoesNotFit`` (candles,
    ``mode="decimal"``) at the first value decimal128(38, 18) cannot hold."""
    spec = query.spec
    is_candles = spec is _CANDLES
    schema = export_schema("candles", mode) if is_candles else _generic_schema(spec)
    written = 0
    with (
        conn.cursor(name="tcp_export") as cur,
        pq.ParquetWriter(str(path), schema, compression="zstd") as writer,
    ):
        cur.itersize = chunk_rows
        cur.execute(_select(query), query.params)
        while rows := cur.fetchmany(chunk_rows):
            batch = _candle_batch(rows, mode) if is_candles else _generic_batch(spec, schema, rows)
            writer.write_table(batch)
            written += len(rows)
    return written


def export_table(
    dsn: str,
    table: ExportTable,
    out: Path,
    *,
    inst_id: str | None = None,
    timeframe: str | None = None,
    start: TimeBound | None = None,
    end: TimeBound | None = None,
    bot: str | None = None,
    strategy: str | None = None,
    decimals: DecimalMode = "auto",
    chunk_rows: int = CHUNK_ROWS,
) -> int:
    """Write the rows of ``table`` matching the filters to the Parquet file ``out``; returns their number.

    See the module docstring for the filters (``start <= time < end``), the columns and the
    decimal representation. ``decimals`` applies to candles only. Raises ``ValueError`` for a
    filter the table does not have, an empty range or (``decimals="decimal"``) a candle value
    that does not fit decimal128(38, 18); ``psycopg.Error`` when the database fails. ``out`` is
    replaced only once the new file is complete.
    """
    if decimals not in get_args(DecimalMode):
        msg = f"decimals must be one of {', '.join(get_args(DecimalMode))}, got {decimals!r}"
        raise ValueError(msg)
    if chunk_rows < 1:
        msg = f"chunk_rows must be at least 1, got {chunk_rows}"
        raise ValueError(msg)
    query = _query(
        table, inst_id=inst_id, timeframe=timeframe, start=start, end=end, bot=bot, strategy=strategy
    )
    out = Path(out)
    if not out.parent.is_dir():
        msg = f"cannot write {out}: {out.parent} is not a directory"
        raise FileNotFoundError(msg)
    partial = out.with_name(f".{out.name}.partial")
    mode: DecimalMode = "decimal" if decimals == "auto" else decimals
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # one snapshot, even for a retry
            conn.read_only = True
            while True:
                try:
                    written = _write(conn, query, partial, mode, chunk_rows)
                    break
                except _DoesNotFit as exc:
                    if decimals != "auto":
                        raise ValueError(str(exc)) from exc
                    log.warning(
                        "%s: a value does not fit decimal128(38, 18) exactly (%s): writing strings", out, exc
                    )
                    mode = "string"
        os.replace(partial, out)
        return written
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
