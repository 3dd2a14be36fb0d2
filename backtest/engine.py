"""The backtest engine: the live strategy and bot classes, candle by candle, over stored candles.

    tcp backtest run --strategy ema_crossover --params '{"fast": 12, "slow": 26}' \\
        --candles candles.parquet --inst-id BTC-USDT --timeframe 1m --out results/

A backtest is not a second implementation: it creates one ``bots.bot.Bot`` (the class the bots
dataflow runs), starts it and feeds it the candles in ``ts_close`` order. The one shortcut is the
equity curve: the bot is stepped with ``mark=False`` and the curve is computed afterwards with
the same arithmetic (equity = cash + position x close, the cash and position of the last fill
at or before each candle); a test checks it equals the bot's own marks, string for string.

Candles are read through DuckDB from a Parquet file (``tcp candles build``, ``tcp export
candles``) or a directory of them (hive-partitioned ``inst_id=.../date=...`` included); when a
candle appears more than once (revisions) the highest revision counts.

Writes to ``out``: ``signals.parquet``, ``trades.parquet`` (fills), ``equity.parquet`` and
``metrics.json`` (backtest.metrics). Money is written as exact decimal strings. The same inputs
give byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from backtest.metrics import Metrics, compute_metrics
from bots.bot import Bot
from bots.config import BotConfig, ParamValue
from bots.portfolio import MONEY, Fill, fmt
from dataflows.candle_core import Candle
from strategies.base import Signal
from tcp.timeframes import parse_timeframe

__all__ = ["BacktestResult", "load_candles", "run_backtest"]


@dataclass(frozen=True)
class BacktestResult:
    """What a backtest produced (also written to ``out``)."""

    candles: int
    signals: list[Signal]
    fills: list[Fill]
    ts_close: list[int]
    equity: list[str]
    cash: list[str]
    position: list[str]
    metrics: Metrics


def _source(path: Path) -> str:
    if path.is_dir():
        return str(path / "**" / "*.parquet")
    if not path.exists():
        msg = f"no candles at {path}: give a Parquet file (tcp candles build / tcp export) or a directory of them"
        raise FileNotFoundError(msg)
    return str(path)


def _plain(text: str | None) -> str | None:
    """A decimal as the candle dataflow writes it (no trailing zeros); strings pass unchanged."""
    if text is None or "." not in text:
        return text
    text = text.rstrip("0").rstrip(".")
    return text or "0"


def load_candles(
    path: Path, *, inst_id: str, timeframe: str, start: int | None = None, end: int | None = None
) -> list[Candle]:
    """The candles of one stream with ``start <= ts_close < end`` (epoch ms), in time order."""
    query = """
        SELECT inst_id, timeframe, epoch_ms(ts_close::TIMESTAMPTZ) AS ts, open::VARCHAR, high::VARCHAR,
               low::VARCHAR, close::VARCHAR, volume::VARCHAR, quote_volume::VARCHAR, trade_count,
               vwap::VARCHAR, first_trade_id, last_trade_id, revision
        FROM read_parquet($source, hive_partitioning = true, union_by_name = true)
        WHERE inst_id = $inst_id AND timeframe = $timeframe
          AND ($start IS NULL OR epoch_ms(ts_close::TIMESTAMPTZ) >= $start)
          AND ($end IS NULL OR epoch_ms(ts_close::TIMESTAMPTZ) < $end)
        QUALIFY row_number() OVER (PARTITION BY ts_close ORDER BY revision DESC) = 1
        ORDER BY ts_close
    """
    params = {"source": _source(path), "inst_id": inst_id, "timeframe": timeframe, "start": start, "end": end}
    with duckdb.connect() as con:
        rows = con.execute(query, params).fetchall()
    return [
        Candle(inst, tf, ts, _plain(o), _plain(h), _plain(low), _plain(c), _plain(v), _plain(q), n,  # type: ignore[arg-type]
               _plain(vwap), first, last, revision)
        for inst, tf, ts, o, h, low, c, v, q, n, vwap, first, last, revision in rows
    ]  # fmt: skip


def run_backtest(
    candles: Path | Sequence[Candle],
    *,
    strategy: str,
    params: Mapping[str, ParamValue],
    inst_id: str,
    timeframe: str,
    start: int | None = None,
    end: int | None = None,
    fee: Decimal = Decimal("0.001"),
    slippage_bps: Decimal = Decimal(5),
    initial_cash: Decimal = Decimal(10000),
    out: Path | None = None,
) -> BacktestResult:
    """Run one strategy + bot over the candles of one stream; write the results to ``out``."""
    config = BotConfig(name="backtest", strategy=strategy, params=dict(params), inst_id=inst_id, timeframe=timeframe,
                       fee=fee, slippage_bps=slippage_bps, initial_cash=initial_cash)  # fmt: skip
    series = (
        load_candles(candles, inst_id=inst_id, timeframe=config.timeframe, start=start, end=end)
        if isinstance(candles, Path)
        else list(candles)
    )
    if not series:
        msg = f"no {inst_id} {config.timeframe} candles in the range"
        raise ValueError(msg)
    bot = Bot.create(config)
    bot.state = "running"
    signals: list[Signal] = []
    fills: list[Fill] = []
    fill_at: list[int] = []  # candle index of each fill
    on_candle = bot.on_candle
    for i, candle in enumerate(series):
        step = on_candle(candle, mark=False)
        if step.signal is not None:
            signals.append(step.signal)
            if step.fill is not None:
                fills.append(step.fill)
                fill_at.append(i)
    ts, equity, cash, position = _equity(series, fills, fill_at, initial_cash)
    realized = [Decimal(f.realized_pnl) for f in fills if f.side == "sell"]
    metrics = compute_metrics(
        ts_close=ts,
        equity=[float(e) for e in equity],
        positions=[float(p) for p in position],
        realized=realized,
        fees=[Decimal(f.fee) for f in fills],
        period_ms=parse_timeframe(config.timeframe),
    )
    result = BacktestResult(len(series), signals, fills, ts, equity, cash, position, metrics)
    if out is not None:
        write_results(result, out)
    return result


def _equity(
    series: Sequence[Candle], fills: Sequence[Fill], fill_at: Sequence[int], initial_cash: Decimal
) -> tuple[list[int], list[str], list[str], list[str]]:
    """Equity at every close: the cash and position after the last fill at or before it."""
    ts: list[int] = []
    equity: list[str] = []
    cash_out: list[str] = []
    position_out: list[str] = []
    cash, position = initial_cash, Decimal(0)
    cash_text, position_text = fmt(cash), "0"
    next_fill = 0
    for i, candle in enumerate(series):
        while next_fill < len(fills) and fill_at[next_fill] == i:
            fill = fills[next_fill]
            cash, position = Decimal(fill.cash_after), Decimal(fill.position_after)
            cash_text, position_text = fill.cash_after, fill.position_after
            next_fill += 1
        ts.append(candle.ts_close)
        if position == 0:
            equity.append(cash_text)
        else:
            equity.append(fmt(MONEY.add(cash, MONEY.multiply(position, Decimal(candle.close)))))
        cash_out.append(cash_text)
        position_out.append(position_text)
    return ts, equity, cash_out, position_out


_TS = pa.timestamp("ms", tz="UTC")


def write_results(result: BacktestResult, out: Path) -> None:
    """signals.parquet, trades.parquet, equity.parquet and metrics.json, deterministically."""
    out.mkdir(parents=True, exist_ok=True)
    s = result.signals
    _write(out / "signals.parquet", {
        "ts_close": pa.array([x.ts_close for x in s], _TS),
        "action": pa.array([x.action for x in s], pa.string()),
        "price": pa.array([x.price for x in s], pa.string()),
        "indicators": pa.array([json.dumps(x.indicators, sort_keys=True) for x in s], pa.string()),
        "reason": pa.array([x.reason for x in s], pa.string()),
    })  # fmt: skip
    f = result.fills
    _write(out / "trades.parquet", {
        "ts": pa.array([x.ts for x in f], _TS),
        "seq": pa.array([x.seq for x in f], pa.int32()),
        **{name: pa.array([getattr(x, name) for x in f], pa.string())
           for name in ("side", "price", "size", "notional", "fee", "cash_after", "position_after", "realized_pnl")},
    })  # fmt: skip
    _write(out / "equity.parquet", {
        "ts_close": pa.array(result.ts_close, _TS),
        "equity": pa.array(result.equity, pa.string()),
        "cash": pa.array(result.cash, pa.string()),
        "position": pa.array(result.position, pa.string()),
    })  # fmt: skip
    import msgspec

    (out / "metrics.json").write_bytes(msgspec.json.format(msgspec.json.encode(result.metrics)) + b"\n")


def _write(path: Path, columns: dict[str, pa.Array]) -> None:
    # No pandas metadata, no timestamps, one row group: the same rows give the same bytes.
    table = pa.table(columns)
    pq.write_table(table, str(path), compression="zstd", store_schema=False, write_statistics=True)
