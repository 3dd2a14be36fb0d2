"""Batch mode: candles from a finite set of trades (a replay file), written to Parquet.

``tcp candles build --input FILE --timeframes 1m,5m,1h --output OUT.parquet [--empty flat|skip]``
is ``build_from_batches(ReplaySource(FILE).iter_batches(), ...)`` then ``write_parquet``.

In batch mode there is no lateness: every trade in the input counts wherever it is in the file,
every candle holding a trade is emitted (revision 0), the last ones close at the end of the
input, and with ``empty="flat"`` flat candles fill the gaps between an instrument's first and
last candle (none after the last). It is the same core as the stream
(:mod:`dataflows.candle_core`) with event-time finality turned off, so both give the same
candles for the same trades.

Memory: one small aggregate per finest interval and instrument, plus the trade ids seen (for
de-duplication), which shrink to a ``range`` when an interval's ids are consecutive (OKX numbers
each instrument's trades consecutively).

Parquet columns (one row per candle, sorted by instrument, timeframe, close time):

==================  =====================================  ======================================
column              type                                   note
==================  =====================================  ======================================
inst_id, timeframe  string
ts_close            timestamp[ms, tz=UTC]                  close time; the candle is
                                                           ``[ts_close - timeframe, ts_close)``
open high low       decimal128(38, 18)                     exact; or string (see below)
close volume
quote_volume, vwap
trade_count         int64
first_trade_id,     int64, null on flat candles
last_trade_id
revision            int64                                  always 0 in batch mode
==================  =====================================  ======================================

``decimal128(38, 18)`` holds 20 integer and 18 fractional digits, which fits OKX spot data:
PEPE's ``0.00000123`` has 8 decimals, BTC's quote volume (price 0.1 tick x size 1e-8 lot) has 9;
vwap is rounded to 18 decimals by definition. If any value does not fit exactly (more than 18
decimals or 20 integer digits), ``decimals="auto"`` (the default) writes all decimal columns as
exact canonical strings instead and says so in the result; ``"decimal"`` raises instead;
``"string"`` always writes strings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from dataflows.candle_core import Candle, CandleBook, CoreStats, EmptyPolicy, parse_timeframes
from tcp.schemas import DeadLetter, Trade

__all__ = [
    "DECIMAL_TYPE",
    "BuildResult",
    "DecimalMode",
    "build_candles",
    "build_from_batches",
    "candles_table",
    "iter_chunks",
    "read_parquet",
    "write_parquet",
]

log = logging.getLogger(__name__)

DecimalMode = Literal["auto", "decimal", "string"]
DECIMAL_TYPE = pa.decimal128(38, 18)
#: Trades handed to the core at a time; pending trades are folded away after each chunk.
CHUNK_SIZE = 65_536

_DECIMAL_COLUMNS = ("open", "high", "low", "close", "volume", "quote_volume", "vwap")


@dataclass
class BuildResult:
    """Candles built from an input, with what was read and dropped on the way."""

    candles: list[Candle]
    trades: int = 0
    dead_letters: int = 0
    stats: CoreStats = field(default_factory=CoreStats)


def iter_chunks(items: Iterable[Trade], size: int = CHUNK_SIZE) -> Iterator[list[Trade]]:
    """Cut an iterable into lists of at most ``size`` items."""
    chunk: list[Trade] = []
    append = chunk.append
    for item in items:
        append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
            append = chunk.append
    if chunk:
        yield chunk


def _build(chunks: Iterable[list[Trade]], timeframes: str | Iterable[str], empty: EmptyPolicy) -> BuildResult:
    names = [name for name, _ in parse_timeframes(timeframes)]
    book = CandleBook(names, lateness_ms=None, empty=empty, retention_ms=0)
    order = {name: i for i, name in enumerate(names)}
    for chunk in chunks:
        book.on_trades(chunk, 0)
        book.compact()
    candles = book.close_all().candles
    candles.sort(key=lambda c: (c.inst_id, order[c.timeframe], c.ts_close))
    stats = book.stats
    return BuildResult(candles, trades=stats.trades, stats=stats)


def build_candles(
    trades: Iterable[Trade],
    timeframes: str | Iterable[str],
    empty: EmptyPolicy = "flat",
    *,
    chunk_size: int = CHUNK_SIZE,
) -> list[Candle]:
    """Every candle of every instrument in ``trades``, sorted by instrument, timeframe, close."""
    return _build(iter_chunks(trades, chunk_size), timeframes, empty).candles


def build_from_batches(
    batches: Iterable[list[Trade | DeadLetter]], timeframes: str | Iterable[str], empty: EmptyPolicy = "flat"
) -> BuildResult:
    """Build from a source's batches (e.g. ``ReplaySource.iter_batches()``); dead letters are counted."""
    dead = 0

    def chunks() -> Iterator[list[Trade]]:
        nonlocal dead
        chunk: list[Trade] = []
        for batch in batches:  # joined into chunks of CHUNK_SIZE: each chunk is folded at once
            trades = [item for item in batch if type(item) is Trade]
            dead += len(batch) - len(trades)
            chunk.extend(trades)
            if len(chunk) >= CHUNK_SIZE:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    result = _build(chunks(), timeframes, empty)
    result.dead_letters = dead
    return result


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------


def _schema(decimal_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            ("inst_id", pa.string()),
            ("timeframe", pa.string()),
            ("ts_close", pa.timestamp("ms", tz="UTC")),
            ("open", decimal_type),
            ("high", decimal_type),
            ("low", decimal_type),
            ("close", decimal_type),
            ("volume", decimal_type),
            ("quote_volume", decimal_type),
            ("trade_count", pa.int64()),
            ("vwap", decimal_type),
            ("first_trade_id", pa.int64()),
            ("last_trade_id", pa.int64()),
            ("revision", pa.int64()),
        ]
    )


def candles_table(candles: Iterable[Candle], decimals: DecimalMode = "auto") -> pa.Table:
    """The candles as an Arrow table (see the module docstring for the columns)."""
    rows = list(candles)
    columns: dict[str, pa.Array] = {
        "inst_id": pa.array([c.inst_id for c in rows], pa.string()),
        "timeframe": pa.array([c.timeframe for c in rows], pa.string()),
        "ts_close": pa.array([c.ts_close for c in rows], pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        "trade_count": pa.array([c.trade_count for c in rows], pa.int64()),
        "first_trade_id": pa.array([c.first_trade_id for c in rows], pa.int64()),
        "last_trade_id": pa.array([c.last_trade_id for c in rows], pa.int64()),
        "revision": pa.array([c.revision for c in rows], pa.int64()),
    }
    text = {name: pa.array([getattr(c, name) for c in rows], pa.string()) for name in _DECIMAL_COLUMNS}
    decimal_type: pa.DataType = pa.string()
    if decimals != "string":
        try:
            exact = {name: array.cast(DECIMAL_TYPE) for name, array in text.items()}
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            if decimals == "decimal":
                msg = f"a price or volume does not fit decimal128(38, 18) exactly: {exc}"
                raise ValueError(msg) from exc
            log.warning("a value does not fit decimal128(38, 18) exactly (%s): writing strings", exc)
        else:
            text = exact
            decimal_type = DECIMAL_TYPE
    columns.update(text)
    schema = _schema(decimal_type)
    return pa.table([columns[f.name] for f in schema], schema=schema)


def write_parquet(candles: Iterable[Candle], path: str | Path, decimals: DecimalMode = "auto") -> pa.Table:
    """Write the candles to a Parquet file (zstd); returns the table written."""
    table = candles_table(candles, decimals)
    pq.write_table(table, str(path), compression="zstd")
    return table


def _canonical(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        text = format(value, "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value)


def read_parquet(path: str | Path) -> list[Candle]:
    """Read candles written by ``write_parquet`` back (decimal or string columns)."""
    table = pq.read_table(str(path))
    ms = table.column("ts_close").cast(pa.int64()).to_pylist()
    data = {name: table.column(name).to_pylist() for name in table.column_names if name != "ts_close"}
    result = []
    for i, ts_close in enumerate(ms):
        prices = {name: _canonical(data[name][i]) for name in _DECIMAL_COLUMNS}
        result.append(
            Candle(
                inst_id=data["inst_id"][i],
                timeframe=data["timeframe"][i],
                ts_close=ts_close,
                open=prices["open"] or "0",
                high=prices["high"] or "0",
                low=prices["low"] or "0",
                close=prices["close"] or "0",
                volume=prices["volume"] or "0",
                quote_volume=prices["quote_volume"] or "0",
                trade_count=data["trade_count"][i],
                vwap=prices["vwap"],
                first_trade_id=data["first_trade_id"][i],
                last_trade_id=data["last_trade_id"][i],
                revision=data["revision"][i],
            )
        )
    return result
