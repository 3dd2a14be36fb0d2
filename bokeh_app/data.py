"""What the dashboard reads: candles, indicators, fills and bots (PostgreSQL), and the checks of
everything a page sends on (bot names, params).

Every function here blocks (database round trips): the pages call them on a worker thread and
hand the result to their document with ``add_next_tick_callback``, never in a Bokeh callback.
Queries are parameterised; identifiers never come from the page.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import msgspec
import psycopg

from strategies.indicators import EMA, MACD, RSI, BollingerBands
from tcp.timeframes import parse_timeframe

__all__ = [
    "CANDLE_FIELDS",
    "INDICATORS",
    "Indicators",
    "BotRow",
    "Run",
    "backtest_run",
    "backtest_runs",
    "bot_run",
    "bots",
    "candle_rows",
    "Markers",
    "check_bot_name",
    "indicator_columns",
    "instruments",
    "marker_choices",
    "markers",
]

#: The columns of a chart's candle source (times as datetimes for Bokeh, prices as floats for
#: drawing only; exact values are exported from PostgreSQL, never from these).
CANDLE_FIELDS = ("ts", "open", "high", "low", "close", "volume")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_INSTRUMENT = re.compile(r"^[A-Z0-9]{1,20}(-[A-Z0-9]{1,20}){1,3}$")


def check_bot_name(name: str) -> str:
    """A bot name a page may send: letters, digits, ``_.-``, at most 64 (``ValueError`` otherwise)."""
    if not _NAME.match(name):
        msg = f"a bot name is 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), got {name!r}"
        raise ValueError(msg)
    return name


def check_stream(inst_id: str, timeframe: str) -> tuple[str, str]:
    """An instrument and timeframe a page may query (``ValueError`` otherwise)."""
    if not _INSTRUMENT.match(inst_id):
        msg = f"not an instrument id like BTC-USDT: {inst_id!r}"
        raise ValueError(msg)
    parse_timeframe(timeframe)  # raises ValueError with the reason
    return inst_id, timeframe


def instruments(dsn: str) -> list[str]:
    """Instruments that have candles, alphabetically."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        return [r[0] for r in conn.execute("SELECT DISTINCT inst_id FROM candles ORDER BY 1").fetchall()]


def candle_rows(
    dsn: str,
    inst_id: str,
    timeframe: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int = 2000,
    exact: bool = False,
) -> list[tuple[Any, ...]]:
    """The last ``limit`` final candles of a stream in ``start <= ts_close < end`` (default: all),
    oldest first: (ts_close, open, high, low, close, volume) with floats, or with ``exact`` the
    stored text."""
    check_stream(inst_id, timeframe)
    kind = "text" if exact else "float8"
    query = (
        f"SELECT ts_close, open::{kind}, high::{kind}, low::{kind}, close::{kind}, volume::{kind} FROM candles "  # noqa: S608 - kind is one of two constants
        "WHERE inst_id = %s AND timeframe = %s AND ts_close >= %s AND ts_close < %s ORDER BY ts_close DESC LIMIT %s"
    )
    low, high = start or _EPOCH, end or datetime(9999, 1, 1, tzinfo=UTC)
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        rows = conn.execute(query, (inst_id, timeframe, low, high, limit)).fetchall()
    rows.reverse()
    return rows


#: The indicator columns of a chart, in :class:`Indicators`'s order.
INDICATORS = ("ema12", "ema26", "bb_mid", "bb_upper", "bb_lower", "rsi", "macd", "macd_signal", "macd_hist")


class Indicators:
    """EMA 12/26, Bollinger 20/2, RSI 14 and MACD 12/26/9 of a stream's closes, with the
    strategies' own streaming indicators (so a chart shows the numbers a strategy sees), one
    close at a time: a chart continues them candle by candle when live."""

    def __init__(self) -> None:
        self.ema12, self.ema26, self.rsi = EMA(12), EMA(26), RSI(14)
        self.bands, self.macd = BollingerBands(20, k=2.0), MACD(12, 26, 9)

    def update(self, x: float) -> dict[str, float]:
        """The values after the close ``x``: NaN in warm-up."""
        band = self.bands.value if self.bands.update(x) else None
        m = self.macd.value if self.macd.update(x) else None
        nan = math.nan
        values = {
            "ema12": self.ema12.update(x), "ema26": self.ema26.update(x), "rsi": self.rsi.update(x),
            "bb_mid": band.middle if band else nan, "bb_upper": band.upper if band else nan,
            "bb_lower": band.lower if band else nan, "macd": m.line if m else nan,
            "macd_signal": m.signal if m else nan, "macd_hist": m.hist if m else nan,
        }  # fmt: skip
        return {k: nan if v is None else v for k, v in values.items()}


def indicator_columns(closes: list[float]) -> dict[str, list[float]]:
    """The :class:`Indicators` of every close, as columns."""
    indicators = Indicators()
    values = [indicators.update(x) for x in closes]
    return {name: [v[name] for v in values] for name in INDICATORS}


_HASH = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True, slots=True)
class Markers:
    """Whose buy and sell markers a chart shows: a bot's fills or a strategy's signals (one
    strategy with one set of params, named by its ``params_hash``)."""

    kind: Literal["bot", "strategy"]
    name: str
    params_hash: str = ""

    @property
    def value(self) -> str:
        """The choice as a Select value: ``bot:NAME`` or ``strategy:NAME:HASH``."""
        return f"bot:{self.name}" if self.kind == "bot" else f"strategy:{self.name}:{self.params_hash}"

    @property
    def label(self) -> str:
        return (
            f"fills of bot {self.name}"
            if self.kind == "bot"
            else f"signals of {self.name} ({self.params_hash[:8]})"
        )

    @classmethod
    def parse(cls, value: str) -> Markers | None:
        """A Select value from the page, checked (``ValueError``); ``""`` is none."""
        if not value:
            return None
        kind, _, rest = value.partition(":")
        if kind == "bot":
            return cls("bot", check_bot_name(rest))
        name, _, digest = rest.partition(":")
        if kind == "strategy" and _NAME.match(name) and _HASH.match(digest):
            return cls("strategy", name, digest)
        msg = f"not a marker choice (bot:NAME or strategy:NAME:HASH): {value!r}"
        raise ValueError(msg)


def marker_choices(dsn: str, inst_id: str, timeframe: str, bots: list[BotRow]) -> list[Markers]:
    """What a chart of this stream can mark: the bots trading it, and every strategy (with its
    params) that signalled on it."""
    check_stream(inst_id, timeframe)
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        found = conn.execute(
            "SELECT DISTINCT strategy, params_hash FROM signals WHERE inst_id = %s AND timeframe = %s "
            "ORDER BY 1, 2 LIMIT 100",
            (inst_id, timeframe),
        ).fetchall()
    on_stream = sorted(b.name for b in bots if (b.inst_id, b.timeframe) == (inst_id, timeframe))
    return [Markers("bot", n) for n in on_stream] + [Markers("strategy", s, h) for s, h in found]


def markers(
    dsn: str,
    chosen: Markers,
    inst_id: str,
    timeframe: str,
    *,
    start: datetime,
    end: datetime,
    exact: bool = False,
) -> list[tuple[datetime, str, Any]]:
    """The buys and sells of ``chosen`` on the stream in ``start <= ts < end``: (the candle's
    close time, ``buy`` or ``sell``, the price: a fill's price, a signal's close; a float for
    drawing, or with ``exact`` the stored text)."""
    check_stream(inst_id, timeframe)
    kind = "text" if exact else "float8"
    if chosen.kind == "bot":
        query = (
            f"SELECT ts, side, price::{kind} FROM bot_trades WHERE bot = %s AND inst_id = %s AND timeframe = %s "  # noqa: S608 - kind is one of two constants
            "AND ts >= %s AND ts < %s ORDER BY ts"
        )
        args: tuple[Any, ...] = (chosen.name, inst_id, timeframe, start, end)
    else:
        query = (
            f"SELECT ts_close, action, price::{kind} FROM signals WHERE strategy = %s AND params_hash = %s "  # noqa: S608 - kind is one of two constants
            "AND inst_id = %s AND timeframe = %s AND ts_close >= %s AND ts_close < %s ORDER BY ts_close"
        )
        args = (chosen.name, chosen.params_hash, inst_id, timeframe, start, end)
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        return conn.execute(query, args).fetchall()


@dataclass(frozen=True, slots=True)
class BotRow:
    """One line of the bots table (money as the exact stored text)."""

    name: str
    state: str
    strategy: str
    inst_id: str
    timeframe: str
    position: str
    equity: str
    realized_pnl: str
    num_trades: int
    heartbeat_age_s: float | None
    reason: str


def bots(dsn: str, *, now: datetime | None = None) -> list[BotRow]:
    """Every bot of the ``bots`` table, by name."""
    now = now or datetime.now(tz=UTC)
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT name, state, strategy, inst_id, timeframe, position::text, coalesce(equity::text, ''), "
            "realized_pnl::text, num_trades, last_heartbeat, coalesce(reason, '') FROM bots ORDER BY name"
        ).fetchall()
    return [
        BotRow(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            _plain(r[5]),
            _plain(r[6]),
            _plain(r[7]),
            r[8],
            None if r[9] is None else (now - r[9]) / timedelta(seconds=1),
            r[10],
        )  # fmt: skip
        for r in rows
    ]


def _plain(text: str) -> str:
    if "." not in text:
        return text
    text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def epoch_ms(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(milliseconds=1)


# --------------------------------------------------------------------------------------------
# Performance: a bot's run (PostgreSQL) or a backtest's (its result directory), as one shape


@dataclass(frozen=True)
class Run:
    """An equity curve with its fills and metrics: a live bot, or a backtest result."""

    label: str
    ts: list[datetime]
    equity: list[float]  # for drawing; the exact values stay in PostgreSQL / the Parquet files
    initial: float
    fills: list[dict[str, Any]]  # ts, side, price, size, fee, realized_pnl (exact strings)
    metrics: dict[str, Any]

    @property
    def returns(self) -> list[float]:
        return [e / self.initial - 1.0 for e in self.equity]

    @property
    def drawdown(self) -> list[float]:
        peak, out = -math.inf, []
        for e in self.equity:
            peak = max(peak, e)
            out.append(e / peak - 1.0 if peak > 0 else 0.0)
        return out


def _fill_dicts(rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    keys = ("ts", "side", "price", "size", "fee", "realized_pnl")
    return [dict(zip(keys, (r[0], r[1], *(_plain(x) for x in r[2:6])), strict=True)) for r in rows]


def bot_run(dsn: str, bot: str) -> Run:
    """A live bot's equity (bot_performance), fills (bot_trades) and metrics (the backtests'
    definitions, backtest/metrics.py), from PostgreSQL."""
    from backtest.metrics import compute_metrics
    from bots.config import BotConfig
    from bots.portfolio import Fill

    check_bot_name(bot)
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        found = conn.execute("SELECT config FROM bots WHERE name = %s", (bot,)).fetchone()
        if found is None:
            msg = f"no bot named {bot!r}"
            raise ValueError(msg)
        marks = conn.execute(
            "SELECT ts_close, equity::text, position::text FROM bot_performance WHERE bot = %s ORDER BY ts_close",
            (bot,),
        ).fetchall()
        trades = conn.execute(
            "SELECT ts, side, price::text, size::text, fee::text, realized_pnl::text, seq, notional::text, "
            "cash_after::text, position_after::text FROM bot_trades WHERE bot = %s ORDER BY seq",
            (bot,),
        ).fetchall()
    config = BotConfig.model_validate_json(found[0] if isinstance(found[0], str) else json.dumps(found[0]))
    if not marks:
        msg = f"bot {bot!r} has no equity yet (no final candle since it started)"
        raise ValueError(msg)
    fills = [
        Fill(
            bot=bot,
            seq=r[6],
            ts=epoch_ms(r[0]),
            side=r[1],
            price=_plain(r[2]),
            size=_plain(r[3]),
            notional=_plain(r[7]),
            fee=_plain(r[4]),
            cash_after=_plain(r[8]),
            position_after=_plain(r[9]),
            realized_pnl=_plain(r[5]),
        )  # fmt: skip
        for r in trades
    ]
    metrics = compute_metrics(
        ts_close=[epoch_ms(m[0]) for m in marks],
        equity=[float(m[1]) for m in marks],
        in_position=[Decimal(m[2]) != 0 for m in marks],
        fills=fills,
        initial_cash=config.initial_cash,
        final_equity=Decimal(marks[-1][1]),
        period_ms=parse_timeframe(config.timeframe),
    )
    return Run(f"bot {bot}", [m[0] for m in marks], [float(m[1]) for m in marks], float(config.initial_cash),
               _fill_dicts(trades), msgspec.to_builtins(metrics))  # fmt: skip


def backtest_runs(root: Path) -> list[str]:
    """The backtest result directories under ``root`` (those with a metrics.json), newest first."""
    if not root.is_dir():
        return []
    found = [p.parent for p in root.glob("*/metrics.json")]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def backtest_run(root: Path, name: str) -> Run:
    """A ``tcp backtest run`` result directory (``root/name``) as a Run."""
    import pyarrow.parquet as pq

    if not _NAME.match(name):
        msg = f"not a result name: {name!r}"
        raise ValueError(msg)
    folder = root / name
    summary = json.loads((folder / "metrics.json").read_text())
    equity = pq.read_table(folder / "equity.parquet").to_pydict()
    trades = pq.read_table(folder / "trades.parquet").to_pydict()
    rows = list(zip(trades["ts"], trades["side"], trades["price"], trades["size"], trades["fee"],
                    trades["realized_pnl"], strict=True))  # fmt: skip
    return Run(f"backtest {name}", equity["ts_close"], [float(e) for e in equity["equity"]],
               float(summary["backtest"]["initial_cash"]), _fill_dicts(rows), summary["metrics"])  # fmt: skip
