"""Test helpers: an independent reference aggregation, and a seeded trade generator.

The reference is written the slow, obvious way, on purpose unlike the core: de-duplicate by
``(inst_id, trade_id)`` (first arrival wins), sort everything by event order, group by candle,
compute each field with plain ``Decimal`` arithmetic, then fill flat candles between an
instrument's consecutive candles.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from itertools import groupby

from dataflows.candle_core import Candle
from tcp.schemas import Trade
from tcp.timeframes import close_of, parse_timeframe, timeframe_name

__all__ = ["Arrival", "generate_arrivals", "plain", "reference_candles"]

_WIDE = Context(prec=300)
_VWAP_QUANTUM = Decimal("1e-18")


def plain(value: Decimal) -> str:
    """Plain notation without trailing zeros (written differently from the core's)."""
    text = f"{value:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def _candle(inst_id: str, name: str, ts_close: int, group: list[Trade]) -> Candle:
    prices = [Decimal(t.px) for t in group]
    sizes = [Decimal(t.sz) for t in group]
    with localcontext(_WIDE):
        volume = Decimal(0)
        quote = Decimal(0)
        for price, size in zip(prices, sizes, strict=True):
            volume += size
            quote += price * size
        vwap = (quote / volume).quantize(_VWAP_QUANTUM, rounding=ROUND_HALF_EVEN)
    return Candle(
        inst_id=inst_id,
        timeframe=name,
        ts_close=ts_close,
        open=plain(prices[0]),
        high=plain(max(prices)),
        low=plain(min(prices)),
        close=plain(prices[-1]),
        volume=plain(volume),
        quote_volume=plain(quote),
        trade_count=sum(t.count for t in group),
        vwap=plain(vwap),
        first_trade_id=group[0].trade_id,
        last_trade_id=group[-1].trade_id,
    )


def _flat(inst_id: str, name: str, ts_close: int, price: str) -> Candle:
    return Candle(inst_id, name, ts_close, price, price, price, price, "0", "0", 0)


def reference_candles(
    trades: Iterable[Trade], timeframes: Sequence[str], empty: str = "flat"
) -> list[Candle]:
    """All candles, sorted by instrument, timeframe (as given), close time."""
    first_seen: dict[tuple[str, int], Trade] = {}
    for trade in trades:
        first_seen.setdefault((trade.inst_id, trade.trade_id), trade)
    ordered = sorted(first_seen.values(), key=lambda t: (t.inst_id, t.ts, t.trade_id))
    result: list[Candle] = []
    for inst_id, inst_group in groupby(ordered, key=lambda t: t.inst_id):
        inst_trades = list(inst_group)
        for tf in timeframes:
            ms = parse_timeframe(tf)
            name = timeframe_name(tf)
            previous: Candle | None = None
            for ts_close, group in groupby(inst_trades, key=lambda t, ms=ms: close_of(t.ts, ms)):  # type: ignore[misc]
                candle = _candle(inst_id, name, ts_close, list(group))
                if previous is not None and empty == "flat":
                    gap = range(previous.ts_close + ms, ts_close, ms)
                    result.extend(_flat(inst_id, name, t, previous.close) for t in gap)
                result.append(candle)
                previous = candle
    return result


# --------------------------------------------------------------------------------------------
# A seeded trade generator with every awkward case the rules talk about
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """A trade and the wall-clock time (ms) at which it arrives."""

    at: int
    trade: Trade


@dataclass(frozen=True)
class _Spec:
    inst_id: str
    price_ticks: int  # start price in ticks
    price_dp: int
    size_dp: int
    size_max: float
    share: float  # of all trades
    quiet: bool = False  # trades in short bursts with hour-long gaps


_SPECS = (
    _Spec("BTC-USDT", 670_001, 1, 8, 0.8, 0.55),
    _Spec("ETH-USDT", 350_012, 2, 6, 12.0, 0.30),
    _Spec("PEPE-USDT", 123, 8, 0, 5e7, 0.14),
    _Spec("UNI-USDT", 9_876, 3, 4, 300.0, 0.01, quiet=True),
)
#: 2024-03-09 21:30 UTC: the default run crosses UTC midnight.
START_MS = int(datetime(2024, 3, 9, 21, 30, tzinfo=UTC).timestamp() * 1000)


def _decimal_text(units: int, dp: int) -> str:
    if dp == 0:
        return str(units)
    text = str(units).rjust(dp + 1, "0")
    return f"{text[:-dp]}.{text[-dp:]}".rstrip("0").rstrip(".")


def _trades_of(spec: _Spec, n: int, start: int, span: int, rng: random.Random, next_id: int) -> list[Trade]:
    trades: list[Trade] = []
    ts = start
    ticks = spec.price_ticks
    trade_id = next_id
    gap = span / max(n, 1)
    for i in range(n):
        if spec.quiet and i % 40 == 0 and i:
            ts += 3_600_000 + rng.randrange(600_000)  # an hour-long silence
        elif rng.random() < 0.2:
            pass  # same millisecond as the previous trade
        else:
            ts += max(1, int(rng.expovariate(1 / gap)))
        if rng.random() < 0.01:
            ts += -ts % 60_000  # exactly on a minute boundary
        ticks = max(1, ticks + rng.choice((-2, -1, -1, 0, 0, 0, 1, 1, 2)))
        px = _decimal_text(ticks, spec.price_dp)
        if rng.random() < 0.01 and spec.price_dp:
            px = f"{px}0" if "." in px else f"{px}.00"  # non-canonical input, same value
        units = max(1, int(rng.random() ** 3 * spec.size_max * 10**spec.size_dp))
        sz = _decimal_text(units, spec.size_dp)
        trade_id += 1 if rng.random() < 0.97 else rng.randrange(2, 50)  # sometimes a gap in ids
        count = 1 if rng.random() < 0.95 else rng.randrange(2, 6)
        trades.append(
            Trade(spec.inst_id, trade_id, px, sz, rng.choice(("buy", "sell")), ts, "sim", count=count)
        )
    return trades


def generate_arrivals(
    n: int,
    *,
    seed: int = 1,
    start_ms: int = START_MS,
    span_ms: int = 5 * 3_600_000,
    max_delay_ms: int = 1_850,
    duplicates: float = 0.01,
) -> list[Arrival]:
    """About ``n`` trades of four instruments, in arrival order.

    Each trade arrives ``0..max_delay_ms`` after its event time (so out of order, but within a
    lateness of ``max_delay_ms`` plus a little), a share ``duplicates`` arrives twice, prices
    include PEPE's ``0.000001xx``, some trades sit exactly on minute boundaries or share a
    millisecond, a quiet instrument has hour-long gaps and the run crosses UTC midnight.
    """
    rng = random.Random(seed)
    arrivals: list[tuple[int, int, Trade]] = []
    seq = 0
    for k, spec in enumerate(_SPECS):
        count = max(1, int(n * spec.share))
        span = span_ms // 4 if spec.quiet else span_ms
        for trade in _trades_of(spec, count, start_ms, span, rng, 10_000_000 * (k + 1)):
            copies = 2 if rng.random() < duplicates else 1
            for _ in range(copies):
                arrivals.append((trade.ts + rng.randint(0, max_delay_ms), seq, trade))
                seq += 1
    if start_ms <= _midnight_after(start_ms) < start_ms + span_ms:  # a trade exactly at midnight
        midnight = _midnight_after(start_ms)
        trade = Trade("BTC-USDT", 1, "67000.5", "0.5", "buy", midnight, "sim")
        arrivals.append((midnight, seq, trade))
    arrivals.sort()
    return [Arrival(at, trade) for at, _, trade in arrivals]


def _midnight_after(ts: int) -> int:
    return close_of(ts, 86_400_000)
