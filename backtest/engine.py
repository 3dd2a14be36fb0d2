"""The backtest engine: the live strategy and bot classes, candle by candle, over stored candles.

    tcp backtest run --strategy ema_crossover --params '{"fast": 12, "slow": 26}' \\
        --candles candles.parquet --inst-id BTC-USDT --timeframe 1m --out results/

A backtest is never a second implementation: :func:`backtest` creates ONE ``bots.bot.Bot`` (the
class the bots dataflow runs: its strategy from the registry, its ``Portfolio`` and fill rule),
starts it and calls ``Bot.on_candle`` for every candle in ``ts_close`` order. The one shortcut:
the bot is stepped with ``mark=False`` and the equity curve is computed afterwards with the
portfolio's own arithmetic (``equity = cash + position x close`` in ``MONEY``, with the cash and
position the portfolio held right after the last fill at or before that candle); the tests check
it equals ``Bot.on_candle(mark=True)`` string for string.

Input (:func:`load_candles`, through DuckDB): a Parquet file written by ``tcp candles build`` or
``tcp export candles``, or a directory of them read as ``DIR/**/*.parquet`` with hive
partitioning (the lake's ``candles/inst_id=.../date=.../part-*.parquet``; a directory holding a
``candles`` sub-directory is read from there). Rows are filtered by ``inst_id``, ``timeframe``
and ``start <= ts_close < end``; when a close time appears more than once (revisions, or the same
candle in two files) the highest ``revision`` counts. Columns: ``ts_close`` as a timestamp or
epoch ms; prices and volumes as decimals or exact decimal strings (floats are refused: they are
not exact); ``vwap``, ``first_trade_id``, ``last_trade_id`` and ``revision`` may be missing.

Feeding: at load, every price and volume column is converted once, vectorised (Arrow, two
threads), into the canonical decimal strings live candles carry; a run then turns a batch of rows
into Python values and builds its ``Candle`` structs lazily with ``map`` over the columns, so
only one batch of Python objects is alive at a time and nothing but the bot runs per candle.

Output (:func:`write_outputs`): ``signals.parquet``, ``trades.parquet``, ``equity.parquet``,
``metrics.json`` and ``report.html``; see docs/backtests.md for the columns. Money and sizes
are exact canonical decimal strings (``bots.portfolio.fmt``), never floats: a fee is
price x size x rate, with 30 or more decimals, beyond decimal128(38, 18), and a scale chosen per
file would make the schema depend on the data (the same choice as ``tcp export``). The Parquet
files and metrics.json are byte-identical for the same inputs (no time stamps, no varying
metadata, rows in a fixed order).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import repeat
from operator import attrgetter
from pathlib import Path
from typing import cast

import duckdb
import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from backtest.metrics import Metrics, compute_metrics
from bots.bot import Bot
from bots.config import BotConfig, ParamValue, Sizing, describe_validation_error
from bots.lifecycle import Command
from bots.portfolio import MONEY, Fill, fmt
from dataflows.candle_core import Candle
from strategies.base import Signal
from strategies.registry import InvalidStrategyParams, UnknownStrategyError, make_strategy
from tcp.timeframes import parse_timeframe

__all__ = [
    "BATCH_SIZE",
    "BOT_NAME",
    "CANDLE_COLUMNS",
    "BacktestError",
    "BacktestResult",
    "CandleSet",
    "CandleSourceError",
    "EquityCurve",
    "OUTPUT_FILES",
    "NoCandlesError",
    "StrategyFailedError",
    "TimeBound",
    "backtest",
    "backtest_config",
    "count_candles",
    "epoch_ms",
    "load_candles",
    "metrics_json",
    "run_backtest",
    "write_outputs",
]

#: Candles built and fed per batch (bounds the memory of the Python objects alive at once).
BATCH_SIZE = 65_536
#: The name of the bot a backtest runs (its fills carry it).
BOT_NAME = "backtest"

#: A time bound: an aware datetime or epoch milliseconds.
TimeBound = datetime | int

_I64 = npt.NDArray[np.int64]
_TS = pa.timestamp("ms", tz="UTC")

#: The Candle fields after ``inst_id, timeframe, ts_close``, in the struct's order.
_FIELDS = (
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "trade_count",
    "vwap",
    "first_trade_id",
    "last_trade_id",
    "revision",
)
#: The columns of a :class:`CandleSet`'s table: the ``Candle`` fields after ``inst_id, timeframe``.
CANDLE_COLUMNS = ("ts_close", *_FIELDS)
#: Rows sampled to decide whether a column's values repeat enough for a dictionary.
_SAMPLE = 4096
_DECIMALS = ("open", "high", "low", "close", "volume", "quote_volume", "vwap")
_REQUIRED = ("inst_id", "timeframe", "ts_close", "open", "high", "low", "close", "volume", "quote_volume",
             "trade_count")  # fmt: skip
_OPTIONAL = {
    "vwap": "CAST(NULL AS VARCHAR)",
    "first_trade_id": "CAST(NULL AS BIGINT)",
    "last_trade_id": "CAST(NULL AS BIGINT)",
    "revision": "CAST(0 AS BIGINT)",
}
_INTEGER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT")
_PLAIN_DECIMAL = r"^(0|[1-9][0-9]*)(\.[0-9]*[1-9])?$"


class BacktestError(ValueError):
    """A backtest cannot run as asked; the message says what and why."""


class CandleSourceError(BacktestError):
    """The candles file or directory is missing, unreadable or has unusable columns."""


class NoCandlesError(BacktestError):
    """The source holds no candle of the stream in the time range."""


class StrategyFailedError(BacktestError):
    """The strategy raised: the bot failed (the message holds the bot's reason)."""


# --------------------------------------------------------------------------------------------
# Inputs


def epoch_ms(value: TimeBound, *, what: str = "time") -> int:
    """``value`` as epoch milliseconds: an int as is, an aware datetime converted exactly."""
    if isinstance(value, bool) or not isinstance(value, datetime | int):
        msg = f"{what}: expected an aware datetime or epoch milliseconds, got {value!r}"
        raise BacktestError(msg)
    if isinstance(value, int):
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        msg = f"{what}: {value.isoformat()} has no time zone; give an aware datetime (e.g. UTC)"
        raise BacktestError(msg)
    return (value - _EPOCH) // timedelta(milliseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def backtest_config(
    *,
    strategy: str,
    params: Mapping[str, ParamValue] | None = None,
    inst_id: str,
    timeframe: str,
    fee: Decimal = Decimal("0.001"),
    slippage_bps: Decimal = Decimal(5),
    initial_cash: Decimal = Decimal(10000),
    sizing: Sizing = "all-in",
) -> BotConfig:
    """The ``BotConfig`` of a backtest (bot name ``backtest``), validated with the strategy.

    ``BacktestError`` with the reason: a field out of range (``fee: Input should be less than
    0.1``), an unknown strategy (the message lists the available ones) or params the strategy's
    config rejects (its own message).
    """
    try:
        config = BotConfig(
            name=BOT_NAME,
            strategy=strategy,
            params=dict(params or {}),
            inst_id=inst_id,
            timeframe=timeframe,
            fee=fee,
            slippage_bps=slippage_bps,
            initial_cash=initial_cash,
            sizing=sizing,
        )
    except ValidationError as exc:
        raise BacktestError(describe_validation_error(exc)) from None
    try:
        make_strategy(config.strategy, config.params)
    except (UnknownStrategyError, InvalidStrategyParams) as exc:
        raise BacktestError(str(exc.args[0])) from None
    return config


@dataclass(frozen=True, slots=True, eq=False)
class CandleSet:
    """The candles of one stream, ready to feed: one row per close time, ``ts_close`` strictly
    increasing.

    ``table`` holds the ``Candle`` fields after ``inst_id`` and ``timeframe``
    (:data:`CANDLE_COLUMNS`): ``ts_close`` as int64 epoch ms, prices and volumes as canonical
    decimal strings (``fmt``'s form), ``vwap``, ``first_trade_id``, ``last_trade_id`` nullable.
    Rows become ``Candle`` structs batch by batch (:meth:`rows`, :meth:`candles`), so the Python
    objects of a batch are alive only while it runs.
    """

    inst_id: str
    timeframe: str
    table: pa.Table
    source: str = ""
    #: Candles built once and kept (see :meth:`cached`); ``None``: built per batch on demand.
    _cache: list[Candle] | None = field(default=None, repr=False)
    ts_close: _I64 = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.table.column_names != list(CANDLE_COLUMNS):
            msg = f"a CandleSet's table has the columns {', '.join(CANDLE_COLUMNS)}, got {self.table.column_names}"
            raise ValueError(msg)
        ts = self.table.column("ts_close").combine_chunks().to_numpy().astype(np.int64, copy=False)
        if len(ts) > 1 and not bool(np.all(ts[1:] > ts[:-1])):
            msg = "a CandleSet's ts_close must be strictly increasing"
            raise ValueError(msg)
        object.__setattr__(self, "ts_close", ts)

    def __len__(self) -> int:
        return len(self.ts_close)

    @property
    def period_ms(self) -> int:
        return parse_timeframe(self.timeframe)

    def floats(self, name: str) -> npt.NDArray[np.float64]:
        """A price or volume column as floats (charts)."""
        result: npt.NDArray[np.float64] = (
            self.table.column(name).combine_chunks().cast(pa.float64()).to_numpy(zero_copy_only=False)
        )
        return result

    def rows(self, lo: int, hi: int) -> list[list[object]]:
        """Rows ``lo:hi`` as one Python list per column of :data:`CANDLE_COLUMNS` (strings in
        canonical form, ``None`` for nulls): the arguments of ``Candle`` after the stream."""
        part = self.table.slice(lo, max(0, hi - lo))
        return [part.column(name).to_pylist() for name in CANDLE_COLUMNS]

    def candles(self, lo: int = 0, hi: int | None = None) -> Iterator[Candle]:
        """The ``Candle`` structs of rows ``lo:hi``, built lazily."""
        if self._cache is not None:
            return iter(self._cache[lo:hi])
        stop = len(self) if hi is None else min(hi, len(self))
        return map(Candle, repeat(self.inst_id), repeat(self.timeframe), *self.rows(lo, stop))

    def cached(self) -> CandleSet:
        """A copy whose ``Candle`` structs are built once and reused by every run (a sweep
        worker runs many backtests over one set: ~150 bytes per candle plus its strings)."""
        if self._cache is not None:
            return self
        return CandleSet(self.inst_id, self.timeframe, self.table, self.source, list(self.candles()))

    @classmethod
    def from_candles(cls, candles: Iterable[Candle], *, source: str = "<candles>") -> CandleSet:
        """A set from ``Candle`` structs of ONE stream, in strictly increasing ``ts_close``."""
        rows = list(candles)
        if not rows:
            msg = "no candles"
            raise NoCandlesError(msg)
        streams = {(c.inst_id, c.timeframe) for c in rows}
        if len(streams) > 1:
            msg = f"candles of one stream expected, got {sorted(streams)}"
            raise BacktestError(msg)
        kinds = {name: pa.string() if name in _DECIMALS else pa.int64() for name in CANDLE_COLUMNS}
        table = pa.table(
            {name: pa.array([getattr(c, name) for c in rows], kinds[name]) for name in CANDLE_COLUMNS}
        )
        return cls(rows[0].inst_id, rows[0].timeframe, table, source)


def _source(path: Path) -> tuple[str, bool]:
    """(the DuckDB path or glob, hive partitioning?) of a file or a directory."""
    if path.is_dir():
        root = path / "candles" if (path / "candles").is_dir() else path
        if next(root.rglob("*.parquet"), None) is None:
            msg = f"candles: no Parquet files under {root}"
            raise CandleSourceError(msg)
        return str(root / "**" / "*.parquet"), True
    if not path.exists():
        msg = (
            f"candles: {path} does not exist; give a Parquet file (tcp candles build, tcp export "
            f"candles) or a directory of them (the lake)"
        )
        raise CandleSourceError(msg)
    return str(path), False


def _select(types: Mapping[str, str], source: str) -> tuple[str, str]:
    """The select list and the ts_close expression, for the columns found in the source."""
    missing = [name for name in _REQUIRED if name not in types]
    if missing:
        msg = f"candles: {source} has no column {', '.join(missing)} (columns: {', '.join(types)})"
        raise CandleSourceError(msg)
    ts_type = types["ts_close"]
    if ts_type.startswith("TIMESTAMP"):
        ts = "epoch_ms(ts_close)"
    elif ts_type in _INTEGER_TYPES:
        ts = "CAST(ts_close AS BIGINT)"
    else:
        msg = f"candles: ts_close is {ts_type} in {source}: expected a timestamp or epoch ms"
        raise CandleSourceError(msg)
    parts = [f"{ts} AS ts_close"]
    for name in _FIELDS:
        if name not in types:
            parts.append(f"{_OPTIONAL[name]} AS {name}")
        elif name in _DECIMALS:
            kind = types[name]
            if not (kind.startswith("DECIMAL") or kind == "VARCHAR"):
                msg = f"candles: {name} is {kind} in {source}: prices and volumes must be exact (decimal or string)"
                raise CandleSourceError(msg)
            parts.append(name)
        else:
            parts.append(f"CAST({name} AS BIGINT) AS {name}")
    return ", ".join(parts), ts


def _query(
    path: Path, inst_id: str, timeframe: str, start: int | None, end: int | None, *, count: bool = False
) -> pa.Table:
    """The stream's rows in the range, in the source's order (sorted afterwards if needed); with
    ``count``, one row: the number of distinct close times."""
    source, hive = _source(path)
    flag = str(hive).lower()
    read = f"read_parquet($source, hive_partitioning = {flag}, union_by_name = {flag})"
    try:
        with duckdb.connect() as con:
            described = con.execute(f"DESCRIBE SELECT * FROM {read}", {"source": source}).fetchall()
            select, ts = _select({row[0]: row[1] for row in described}, str(path))
            where = ["inst_id = $inst_id", "timeframe = $timeframe"]
            params: dict[str, object] = {"source": source, "inst_id": inst_id, "timeframe": timeframe}
            if start is not None:
                where.append(f"{ts} >= $start")
                params["start"] = start
            if end is not None:
                where.append(f"{ts} < $end")
                params["end"] = end
            if count:
                select = f"count(DISTINCT {ts}) AS candles"
            # No ORDER BY: files are usually sorted already (checked in numpy, sorted there if not).
            relation = con.sql(f"SELECT {select} FROM {read} WHERE {' AND '.join(where)}", params=params)
            assert relation is not None  # a SELECT gives a relation
            return relation.to_arrow_table()
    except duckdb.Error as exc:
        msg = f"candles: cannot read {path}: {exc}"
        raise CandleSourceError(msg) from None


def _range(start: TimeBound | None, end: TimeBound | None) -> tuple[int | None, int | None]:
    lo = None if start is None else epoch_ms(start, what="start")
    hi = None if end is None else epoch_ms(end, what="end")
    if lo is not None and hi is not None and lo >= hi:
        msg = f"start ({lo}) must be before end ({hi}): the range is start <= ts_close < end"
        raise BacktestError(msg)
    return lo, hi


def _none_in_range(
    path: Path, inst_id: str, timeframe: str, lo: int | None, hi: int | None
) -> NoCandlesError:
    where = ""
    if lo is not None or hi is not None:
        where = (
            f" with {'-inf' if lo is None else lo} <= ts_close < {'+inf' if hi is None else hi} (epoch ms)"
        )
    msg = f"no {inst_id} {timeframe} candles in {path}{where}"
    return NoCandlesError(msg)


def count_candles(
    path: Path | str,
    *,
    inst_id: str,
    timeframe: str,
    start: TimeBound | None = None,
    end: TimeBound | None = None,
) -> int:
    """How many candles :func:`load_candles` would give (distinct close times), without reading
    them; raises like it, ``NoCandlesError`` included."""
    path = Path(path)
    lo, hi = _range(start, end)
    n = int(_query(path, inst_id, timeframe, lo, hi, count=True).column(0)[0].as_py())
    if n == 0:
        raise _none_in_range(path, inst_id, timeframe, lo, hi)
    return n


def _one_per_close(table: pa.Table) -> pa.Table:
    """Sort by ts_close (highest revision first) unless already strictly increasing, then keep
    the first row of each close time."""
    ts = table.column("ts_close").combine_chunks().to_numpy().astype(np.int64, copy=False)
    if len(ts) < 2 or bool(np.all(ts[1:] > ts[:-1])):
        return table
    revision = table.column("revision").combine_chunks().to_numpy().astype(np.int64, copy=False)
    order = np.lexsort((-revision, ts))  # stable: ts ascending, then revision descending
    ts = ts[order]
    keep = np.ones(len(ts), dtype=bool)
    keep[1:] = ts[1:] != ts[:-1]
    return table.take(pa.array(order[keep]))


def _plain(values: pa.Array, *, name: str) -> pa.StringArray:
    """Decimals (decimal128/256) or decimal strings as canonical plain strings (``fmt``'s form:
    no exponent, no trailing zeros). Vectorised; the rare values Arrow prints in scientific
    notation (0 as ``0E-18``, values below 1e-6) are fixed one by one."""
    text = values.cast(pa.string()) if not pa.types.is_string(values.type) else values
    trimmed = pc.utf8_rtrim(pc.utf8_rtrim(text, characters="0"), characters=".")
    text = pc.if_else(pc.match_substring(text, "."), trimmed, text)
    odd = pc.indices_nonzero(pc.match_substring(text, "E", ignore_case=True))
    if len(odd) == 0:
        return text
    fixed = text.to_pylist()
    for i in odd.to_pylist():
        try:
            fixed[i] = fmt(Decimal(fixed[i]))
        except (ArithmeticError, ValueError):
            msg = f"candles: {name} holds {fixed[i]!r}, not a decimal number"
            raise CandleSourceError(msg) from None
    return pa.array(fixed, pa.string())


def _repetitive(values: pa.Array) -> bool:
    """Whether fewer than half of a sample of the first rows are distinct (a dictionary pays)."""
    sample = values.slice(0, _SAMPLE)
    if pa.types.is_decimal(sample.type):  # hashed as raw bytes: twice as fast
        sample = sample.view(pa.binary(16 if pa.types.is_decimal128(sample.type) else 32))
    return int(pc.count_distinct(sample).as_py()) < len(sample) // 2


def _text_column(values: pa.Array, name: str) -> pa.StringArray:
    """A price or volume column as checked canonical decimal strings (``CandleSourceError``
    names the first bad value). A column whose values repeat is converted once per distinct
    value."""
    if pa.types.is_decimal(values.type):
        low = pc.min(values).as_py() if len(values) else None
        if low is not None and low < 0:
            msg = f"candles: {name} holds a negative value {fmt(low)}"
            raise CandleSourceError(msg)
    if _repetitive(values):
        kind = values.type
        raw = (
            values.view(pa.binary(16 if pa.types.is_decimal128(kind) else 32))
            if pa.types.is_decimal(kind)
            else values
        )
        encoded = raw.dictionary_encode()
        distinct = encoded.dictionary.view(kind) if pa.types.is_decimal(kind) else encoded.dictionary
        text = _plain(distinct, name=name).take(encoded.indices)
    else:
        text = _plain(values, name=name)
    if not pa.types.is_decimal(values.type):
        bad = pc.indices_nonzero(pc.invert(pc.match_substring_regex(text, _PLAIN_DECIMAL)))
        if len(bad):
            msg = f"candles: {name} holds {text[bad[0].as_py()].as_py()!r}, not a non-negative decimal number"
            raise CandleSourceError(msg)
    return text


def _canonical(table: pa.Table) -> pa.Table:
    """The table with every price and volume as canonical decimal strings, checked (>= 0; a
    close > 0). The columns are converted by two threads (Arrow's casts release the GIL), once
    for all: a run then only turns strings into Python objects, batch by batch."""
    columns = {name: table.column(name).combine_chunks() for name in CANDLE_COLUMNS}
    with ThreadPoolExecutor(2, thread_name_prefix="backtest-load") as pool:
        texts = dict(
            zip(_DECIMALS, pool.map(_text_column, [columns[n] for n in _DECIMALS], _DECIMALS), strict=True)
        )
    columns.update(texts)
    zero = pc.indices_nonzero(pc.equal(columns["close"], "0"))
    if len(zero):
        ts = columns["ts_close"][zero[0].as_py()].as_py()
        msg = f"candles: the close at ts_close {ts} is 0; prices must be positive"
        raise CandleSourceError(msg)
    return pa.table(columns)


def load_candles(
    path: Path | str,
    *,
    inst_id: str,
    timeframe: str,
    start: TimeBound | None = None,
    end: TimeBound | None = None,
) -> CandleSet:
    """The candles of ``inst_id`` ``timeframe`` with ``start <= ts_close < end`` from a Parquet
    file or a directory of them (module docstring), one per close time (the highest revision).

    Raises ``CandleSourceError`` (missing source, unusable columns, a non-decimal price),
    ``NoCandlesError`` (nothing in the range) or ``BacktestError`` (a bad bound).
    """
    path = Path(path)
    lo, hi = _range(start, end)
    table = _query(path, inst_id, timeframe, lo, hi)
    if table.num_rows == 0:
        raise _none_in_range(path, inst_id, timeframe, lo, hi)
    table = _canonical(_one_per_close(table))
    return CandleSet(inst_id, timeframe, table, str(path))


# --------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True, slots=True, eq=False)
class EquityCurve:
    """The portfolio at every close, exactly.

    The portfolio changes only at fills, so it is kept as states: state ``k`` (``cash[k]``,
    ``position[k]``, exact strings) holds from candle ``starts[k]`` (0 for the initial state,
    then the candle of each fill) to the next start. ``equity`` has one exact string per candle,
    ``values`` the same as floats (for the metrics and charts).
    """

    ts_close: _I64
    close: pa.StringArray
    equity: pa.StringArray
    values: npt.NDArray[np.float64]
    starts: _I64
    cash: list[str]
    position: list[str]

    def state_index(self) -> npt.NDArray[np.int64]:
        """The state of each candle (an index into ``cash`` and ``position``)."""
        lengths = np.diff(np.append(self.starts, len(self.ts_close)))
        return np.repeat(np.arange(len(self.starts), dtype=np.int64), lengths)

    def in_position(self) -> npt.NDArray[np.bool_]:
        """Whether each candle closed holding a position."""
        held = np.array([p != "0" for p in self.position], dtype=bool)
        result: npt.NDArray[np.bool_] = held[self.state_index()]
        return result

    def cash_texts(self) -> list[str]:
        """The cash at each close (exact strings)."""
        return np.array(self.cash, dtype=object)[self.state_index()].tolist()

    def position_texts(self) -> list[str]:
        """The position at each close (exact strings)."""
        return np.array(self.position, dtype=object)[self.state_index()].tolist()

    def table(self) -> pa.Table:
        """``equity.parquet``: ts_close, close, equity, cash, position."""
        index = pa.array(self.state_index().astype(np.int32))
        return pa.table(
            {
                "ts_close": pa.array(self.ts_close, pa.int64()).cast(_TS),
                "close": self.close,
                "equity": self.equity,
                "cash": pa.array(self.cash, pa.string()).take(index),
                "position": pa.array(self.position, pa.string()).take(index),
            }
        )


@dataclass(frozen=True, slots=True, eq=False)
class BacktestResult:
    """What a backtest produced: the config it ran, the candles it saw (``series``; ``candles``
    is their number), every signal and fill in order, the equity curve and the metrics."""

    config: BotConfig
    series: CandleSet
    signals: list[Signal]
    fills: list[Fill]
    equity: EquityCurve
    metrics: Metrics

    @property
    def candles(self) -> int:
        return len(self.series)

    def signals_table(self) -> pa.Table:
        """``signals.parquet``: ts_close, action, price, indicators (JSON), reason, filled."""
        s = self.signals
        filled = {fill.ts for fill in self.fills}
        encode = msgspec.json.encode
        return pa.table(
            {
                "ts_close": pa.array([x.ts_close for x in s], pa.int64()).cast(_TS),
                "action": pa.array([x.action for x in s], pa.string()),
                "price": pa.array([x.price for x in s], pa.string()),
                "indicators": pa.array([encode(x.indicators).decode() for x in s], pa.string()),
                "reason": pa.array([x.reason for x in s], pa.string()),
                "filled": pa.array([x.ts_close in filled for x in s], pa.bool_()),
            }
        )

    def trades_table(self) -> pa.Table:
        """``trades.parquet``: one row per fill (seq, ts, side, then exact strings)."""
        f = self.fills
        money = ("price", "size", "fee", "notional", "cash_after", "position_after", "realized_pnl")
        return pa.table(
            {
                "seq": pa.array([x.seq for x in f], pa.int64()),
                "ts": pa.array([x.ts for x in f], pa.int64()).cast(_TS),
                "side": pa.array([x.side for x in f], pa.string()),
                **{name: pa.array([getattr(x, name) for x in f], pa.string()) for name in money},
            }
        )

    def summary(self) -> dict[str, object]:
        """What ran (``metrics.json``'s ``backtest`` part)."""
        c = self.config
        return {
            "strategy": c.strategy,
            "params": dict(c.params),
            "inst_id": c.inst_id,
            "timeframe": c.timeframe,
            "source": self.series.source,
            "first_ts_close": int(self.series.ts_close[0]),
            "last_ts_close": int(self.series.ts_close[-1]),
            "fee": fmt(c.fee),
            "slippage_bps": fmt(c.slippage_bps),
            "initial_cash": fmt(c.initial_cash),
            "sizing": c.sizing if isinstance(c.sizing, str) else c.sizing.model_dump(mode="json"),
            "signals": len(self.signals),
        }


def _start(config: BotConfig, at: int) -> Bot:
    bot = Bot.create(config, at=at)
    event = bot.on_command(Command(id="backtest-start", action="start", bot=config.name, at=at), at=at)
    if not event.ok:  # pragma: no cover - a created bot always starts
        msg = f"the bot did not start: {event.reason}"
        raise BacktestError(msg)
    return bot


def _batches(series: CandleSet, size: int) -> Iterator[tuple[Iterator[Candle], list[str]]]:
    """The candles in batches of ``size`` (built lazily), with their closes."""
    n = len(series)
    if series._cache is not None:
        close = attrgetter("close")
        for lo in range(0, n, size):
            batch = series._cache[lo : lo + size]
            yield iter(batch), list(map(close, batch))
        return
    at = CANDLE_COLUMNS.index("close")
    for lo in range(0, n, size):
        rows = series.rows(lo, lo + size)
        closes = cast("list[str]", rows[at])
        yield map(Candle, repeat(series.inst_id), repeat(series.timeframe), *rows), closes


def _equity_texts(
    closes: Sequence[str], starts: Sequence[int], cash: Sequence[Decimal], position: Sequence[Decimal]
) -> list[str]:
    """``cash + position x close`` per candle, as ``Portfolio.mark`` computes it (``MONEY``),
    formatted like ``fmt``: normalised then printed plainly (no exponent, no trailing zeros)."""
    out: list[str] = []
    ends = [*starts[1:], len(closes)]
    for a, b, held, cash_k in zip(starts, ends, position, cash, strict=True):
        if a == b:
            continue
        if not held:
            out.extend([fmt(cash_k)] * (b - a))
            continue
        values = map(MONEY.multiply, repeat(held), map(Decimal, closes[a:b]))
        totals = map(MONEY.normalize, map(MONEY.add, repeat(cash_k), values))
        out.extend(map(format, totals, repeat("f")))
    return out


def backtest(series: CandleSet, config: BotConfig, *, batch_size: int = BATCH_SIZE) -> BacktestResult:
    """Run ONE live ``Bot`` of ``config`` over ``series`` (its stream) and value it at every close.

    ``StrategyFailedError`` if the strategy raises (the bot fails; the message has its reason).
    The cyclic garbage collector is paused while the candles are fed (refcounting still frees
    every candle at once; without the pause, collections triggered by the allocations cost
    about a fifth of the run); a strategy that makes reference cycles keeps them until the end.
    """
    if (series.inst_id, series.timeframe) != (config.inst_id, config.timeframe):
        msg = (
            f"the candles are {series.inst_id} {series.timeframe}, the bot trades "
            f"{config.inst_id} {config.timeframe}"
        )
        raise BacktestError(msg)
    if len(series) == 0:
        msg = f"no {series.inst_id} {series.timeframe} candles"
        raise NoCandlesError(msg)
    bot = _start(config, int(series.ts_close[0]))
    portfolio = bot.portfolio
    signals: list[Signal] = []
    fills: list[Fill] = []
    cash: list[Decimal] = [portfolio.cash]
    position: list[Decimal] = [portfolio.position]
    closes: list[str] = []
    on_candle = bot.on_candle
    collecting = gc.isenabled()
    gc.disable()  # the loop allocates ~1 object per candle; refcounting frees them (see docstring)
    try:
        for batch, batch_closes in _batches(series, batch_size):
            closes += batch_closes
            for candle in batch:
                step = on_candle(candle, mark=False)
                if step.signal is not None:
                    signals.append(step.signal)
                    if step.fill is not None:
                        fills.append(step.fill)
                        cash.append(portfolio.cash)
                        position.append(portfolio.position)
            if bot.state == "failed":
                msg = f"{config.strategy} failed: {bot.reason}"
                raise StrategyFailedError(msg)
    finally:
        if collecting:
            gc.enable()
    texts = _equity_texts(closes, _starts(series, fills).tolist(), cash, position)
    return assemble(config, series, signals, fills, texts)


def _starts(series: CandleSet, fills: Sequence[Fill]) -> _I64:
    """Where each portfolio state begins: 0, then the index of each fill's candle."""
    starts = np.searchsorted(series.ts_close, np.array([f.ts for f in fills], dtype=np.int64))
    return np.concatenate((np.zeros(1, dtype=np.int64), starts.astype(np.int64)))


def assemble(
    config: BotConfig, series: CandleSet, signals: list[Signal], fills: list[Fill], equity: Sequence[str]
) -> BacktestResult:
    """The result of a bot's run over ``series``: its signals and fills, ``equity`` (one exact
    string per candle: the portfolio valued at each close) and the metrics computed from them.

    :func:`backtest` computes ``equity`` itself; ``tcp replay`` (backtest/replay.py) takes it
    from the marks the bots dataflow emitted. The portfolio states are the initial cash and
    position, then each fill's ``cash_after`` and ``position_after``.
    """
    if len(equity) != len(series):
        msg = f"{len(equity)} equity values for {len(series)} candles"
        raise BacktestError(msg)
    ts = series.ts_close
    starts = _starts(series, fills)
    texts = pa.array(equity, pa.string())
    curve = EquityCurve(
        ts_close=ts,
        close=series.table.column("close").combine_chunks(),
        equity=texts,
        values=texts.cast(pa.float64()).to_numpy(),
        starts=starts,
        cash=[fmt(config.initial_cash), *(f.cash_after for f in fills)],
        position=["0", *(f.position_after for f in fills)],
    )
    metrics = compute_metrics(
        ts_close=ts,
        equity=curve.values,
        in_position=curve.in_position(),
        fills=fills,
        initial_cash=config.initial_cash,
        final_equity=Decimal(texts[-1].as_py()),
        period_ms=series.period_ms,
    )
    return BacktestResult(config, series, signals, fills, curve, metrics)


def run_backtest(
    candles: Path | str,
    *,
    strategy: str,
    params: Mapping[str, ParamValue] | None = None,
    inst_id: str,
    timeframe: str,
    start: TimeBound | None = None,
    end: TimeBound | None = None,
    fee: Decimal = Decimal("0.001"),
    slippage_bps: Decimal = Decimal(5),
    initial_cash: Decimal = Decimal(10000),
    sizing: Sizing = "all-in",
    out: Path | None = None,
) -> BacktestResult:
    """Read the candles (:func:`load_candles`), run :func:`backtest` and, with ``out``, write the
    results there (:func:`write_outputs`). The config is checked before anything is read.

    Raises ``BacktestError`` (a bad option, unknown strategy or invalid params),
    ``CandleSourceError``, ``NoCandlesError`` or ``StrategyFailedError``.
    """
    config = backtest_config(strategy=strategy, params=params, inst_id=inst_id, timeframe=timeframe, fee=fee,
                             slippage_bps=slippage_bps, initial_cash=initial_cash, sizing=sizing)  # fmt: skip
    series = load_candles(candles, inst_id=config.inst_id, timeframe=config.timeframe, start=start, end=end)
    result = backtest(series, config)
    if out is not None:
        write_outputs(result, out)
    return result


# --------------------------------------------------------------------------------------------
# Files

#: The files :func:`write_outputs` writes.
OUTPUT_FILES = ("signals.parquet", "trades.parquet", "equity.parquet", "metrics.json", "report.html")


def _write_parquet(table: pa.Table, path: Path) -> None:
    # zstd, statistics, the Arrow schema; no pandas metadata and no time stamps: same rows, same bytes.
    pq.write_table(table, str(path), compression="zstd", row_group_size=1 << 20)


def metrics_json(result: BacktestResult) -> bytes:
    """``metrics.json``: ``{"backtest": what ran, "metrics": the metrics}`` (keys in a fixed order)."""
    data = {"backtest": result.summary(), "metrics": msgspec.to_builtins(result.metrics)}
    return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()


def write_outputs(result: BacktestResult, out: Path, *, report: bool = True) -> list[Path]:
    """Write the result files to the directory ``out`` (made if needed); returns their paths.

    ``report=False`` leaves out ``report.html`` (the one file that is not byte-identical
    between runs: Bokeh gives its objects fresh ids).
    """
    out.mkdir(parents=True, exist_ok=True)
    written = [out / name for name in OUTPUT_FILES]
    _write_parquet(result.signals_table(), written[0])
    _write_parquet(result.trades_table(), written[1])
    _write_parquet(result.equity.table(), written[2])
    written[3].write_bytes(metrics_json(result))
    if report:
        from backtest.report import write_report

        write_report(result, written[4])
    else:
        written.pop()
    return written
