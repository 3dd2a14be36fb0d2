"""The candle core: exact OHLCV candles from trades, per instrument, with event-time finality.

Pure Python, no Kafka and no Bytewax. ``InstrumentCandles`` is the state of ONE instrument: it
takes batches of trades (``on_trades``), advances on idle (``on_tick``) and flushes at the end of
a finite input (``close_all``); each call returns the candles that became final and the late
trades. The state is plain data (picklable), so a Bytewax stateful operator can snapshot it.
``CandleBook`` routes a mixed stream to one state per instrument (tests, batch mode).

The rules (docs/candles.md has the long version):

* Labels are close times: candle ``T`` of timeframe ``d`` holds trades with ``T - d <= ts < T``.
* Order inside a candle is event order ``(ts, trade_id)``; duplicates of a trade id count once.
* A candle is final when the watermark reaches its close. The watermark works like Bytewax's
  ``EventClock``: the largest event time seen minus the allowed lateness, plus the wall-clock
  time elapsed since that event arrived. ``now_ms`` is always passed in, never read here.
* Empty intervals: ``flat`` (OHLC = previous close, volume 0) or ``skip``.
* Late trades are returned, never dropped silently; with ``revise`` their candles are
  re-emitted with ``revision + 1`` while still retained.

How it is fast: trades are only appended to the list of their finest interval (the "base", the
gcd of the timeframes); each list is aggregated at once with C-level builtins (``min``/``max``
with a key, ``map(Decimal, ...)``, ``sum``) when it is needed, and every timeframe is built
from the candles of the next finer one (1m -> 5m -> 15m -> 1h ...), so per trade there is one
append and one aggregation step, whatever the number of timeframes. Arithmetic is ``Decimal``
in a context wide enough never to round (and trapping ``Inexact`` to prove it).
"""

from __future__ import annotations

import decimal
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from math import gcd
from operator import attrgetter, itemgetter, mul
from typing import Any, Literal, NamedTuple

import msgspec

from tcp.schemas import Trade
from tcp.timeframes import parse_timeframe, timeframe_name

__all__ = [
    "DEFAULT_LATENESS_MS",
    "DEFAULT_RETENTION_MS",
    "VWAP_DECIMALS",
    "Candle",
    "CandleBook",
    "CoreStats",
    "EmptyPolicy",
    "Emitted",
    "InstrumentCandles",
    "LatePolicy",
    "LateTrade",
    "decode_candle",
    "decode_late_trade",
    "encode_candle",
    "parse_timeframes",
]

EmptyPolicy = Literal["flat", "skip"]
LatePolicy = Literal["revise", "drop-to-late-topic-only"]
LateAction = Literal["revised", "reported", "expired"]

#: Allowed lateness: a candle is final once event time is this far past its close.
DEFAULT_LATENESS_MS = 2_000
#: How long (in event time, behind the watermark) final candles stay revisable.
DEFAULT_RETENTION_MS = 3_600_000
#: vwap = quote_volume / volume, rounded half-even to this many decimal places.
VWAP_DECIMALS = 18

_EMPTY_POLICIES = ("flat", "skip")
_LATE_POLICIES = ("revise", "drop-to-late-topic-only")
_NEVER = 1 << 62  # "later than any event time": the trigger when nothing finalises by time
_NO_WATERMARK = -(1 << 62)  # the watermark before the first trade
_PX_CACHE_MAX = 200_000
#: An open interval with this many pending trades is aggregated at the end of the batch.
_FOLD_AT = 32

# Sums and products of exact decimals are exact in this context; Inexact traps, so a rounding
# could never happen silently (40-character inputs are nowhere near 1000 digits).
_EXACT = decimal.Context(
    prec=1000,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[decimal.Inexact, decimal.Rounded, decimal.InvalidOperation, decimal.DivisionByZero],
)
_ZERO = Decimal(0)
_VWAP_SCALE = 10**VWAP_DECIMALS

_EVENT_ORDER = attrgetter("ts", "trade_id")
_BY_TIME = itemgetter(0, 1)
_TS = attrgetter("ts")
_ID = attrgetter("trade_id")
_PX = attrgetter("px")
_SZ = attrgetter("sz")
_COUNT = attrgetter("count")


# --------------------------------------------------------------------------------------------
# Output types
# --------------------------------------------------------------------------------------------


class Candle(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """One final candle (or, from ``forming()``, one that is still forming).

    Prices and volumes are exact decimal strings in canonical form: plain notation, no
    exponent, no trailing zeros after the point (``"42219.9"``, ``"0.00000123"``, ``"0"``).
    ``ts_close`` is the close time (epoch ms, UTC); the candle holds ``[ts_close - d, ts_close)``.
    A flat candle (no trades) has volume ``"0"``, ``trade_count`` 0 and no vwap or trade ids.
    ``revision`` is 0 when first emitted and grows by one for each late-trade correction.
    """

    inst_id: str
    timeframe: str
    ts_close: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    quote_volume: str
    trade_count: int
    vwap: str | None = None
    first_trade_id: int | None = None
    last_trade_id: int | None = None
    revision: int = 0

    @property
    def key(self) -> bytes:
        """The Kafka message key: ``inst_id|timeframe``."""
        return f"{self.inst_id}|{self.timeframe}".encode()

    @property
    def ts_open(self) -> int:
        return self.ts_close - parse_timeframe(self.timeframe)

    @property
    def is_flat(self) -> bool:
        return self.trade_count == 0


class LateTrade(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """A trade that arrived after its candle was final.

    ``timeframe``/``ts_close`` name the candle it belonged to in the finest output timeframe;
    ``watermark`` is the instrument's watermark when it arrived. ``action``: ``revised`` (its
    candles were re-emitted with a higher revision), ``reported`` (policy
    ``drop-to-late-topic-only``: only this report) or ``expired`` (older than the retention,
    nothing could be revised or de-duplicated).
    """

    trade: Trade
    timeframe: str
    ts_close: int
    watermark: int
    action: LateAction


_encoder = msgspec.json.Encoder()
_candle_decoder = msgspec.json.Decoder(Candle)
_late_decoder = msgspec.json.Decoder(LateTrade)


def encode_candle(candle: Candle | LateTrade) -> bytes:
    """Compact JSON for the ``candles`` (or late-trades) topic; defaults are left out."""
    return _encoder.encode(candle)


def decode_candle(data: bytes | str) -> Candle:
    return _candle_decoder.decode(data)


def decode_late_trade(data: bytes | str) -> LateTrade:
    return _late_decoder.decode(data)


@dataclass(slots=True)
class Emitted:
    """What one call produced: final (or revised) candles and late trades, in order."""

    candles: list[Candle] = field(default_factory=list)
    late: list[LateTrade] = field(default_factory=list)

    def extend(self, other: Emitted) -> None:
        self.candles.extend(other.candles)
        self.late.extend(other.late)

    def __bool__(self) -> bool:
        return bool(self.candles or self.late)


@dataclass(slots=True)
class CoreStats:
    """Counters of one instrument's state (or summed over a book)."""

    trades: int = 0
    duplicates: int = 0
    late: int = 0
    revised: int = 0
    expired: int = 0
    candles: int = 0

    def add(self, other: CoreStats) -> None:
        self.trades += other.trades
        self.duplicates += other.duplicates
        self.late += other.late
        self.revised += other.revised
        self.expired += other.expired
        self.candles += other.candles


# --------------------------------------------------------------------------------------------
# Aggregates
# --------------------------------------------------------------------------------------------


class _Agg(NamedTuple):
    """The aggregate of a non-empty set of trades (exact Decimals)."""

    open_ts: int
    open_id: int
    open: Decimal
    close_ts: int
    close_id: int
    close: Decimal
    high: Decimal
    low: Decimal
    volume: Decimal
    quote: Decimal
    trades: int  # the sum of the trades' ``count``


class _PriceCache(dict[str, Decimal]):
    """px string -> Decimal. Prices repeat (tick sizes), so most lookups hit."""

    def __missing__(self, key: str) -> Decimal:
        value = self[key] = Decimal(key)
        return value


_PRICES = _PriceCache()


def _aggregate(trades: list[Trade]) -> _Agg:
    """Aggregate a non-empty, duplicate-free list of trades; C-level loops only. Needs _EXACT."""
    if len(_PRICES) > _PX_CACHE_MAX:
        _PRICES.clear()
    times = list(map(_TS, trades))
    first = _extreme(trades, times, min(times), min)
    last = _extreme(trades, times, max(times), max)
    prices = list(map(_PRICES.__getitem__, map(_PX, trades)))
    sizes = list(map(Decimal, map(_SZ, trades)))
    return _Agg(
        first.ts,
        first.trade_id,
        _PRICES[first.px],
        last.ts,
        last.trade_id,
        _PRICES[last.px],
        max(prices),
        min(prices),
        sum(sizes, _ZERO),
        sum(map(mul, prices, sizes), _ZERO),
        sum(map(_COUNT, trades)),
    )


def _extreme(trades: list[Trade], times: list[int], ts: int, pick: Callable[..., Trade]) -> Trade:
    """The first (``pick=min``) or last (``max``) trade in event order, given its time ``ts``."""
    if times.count(ts) == 1:
        return trades[times.index(ts)]
    return pick((t for t in trades if t.ts == ts), key=_ID)


def _aggregate_one(trade: Trade) -> _Agg:
    px = Decimal(trade.px)
    sz = Decimal(trade.sz)
    return _Agg(trade.ts, trade.trade_id, px, trade.ts, trade.trade_id, px, px, px, sz, px * sz, trade.count)


def _merge(a: _Agg, b: _Agg) -> _Agg:
    """The aggregate of the union of two disjoint trade sets. Needs _EXACT."""
    first = a if (a.open_ts, a.open_id) <= (b.open_ts, b.open_id) else b
    last = a if (a.close_ts, a.close_id) >= (b.close_ts, b.close_id) else b
    return _Agg(
        first.open_ts,
        first.open_id,
        first.open,
        last.close_ts,
        last.close_id,
        last.close,
        a.high if a.high >= b.high else b.high,
        a.low if a.low <= b.low else b.low,
        a.volume + b.volume,
        a.quote + b.quote,
        a.trades + b.trades,
    )


def _fmt(value: Decimal) -> str:
    """Canonical plain decimal string: no exponent, no trailing zeros."""
    text = str(value)
    if "E" in text:  # exponent notation (tiny or trailing-zero-heavy values): the slow way
        return format(value.normalize(_EXACT), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _vwap(quote: Decimal, volume: Decimal) -> str:
    """quote / volume rounded half-even to VWAP_DECIMALS places, computed on exact integers."""
    qn, qd = quote.as_integer_ratio()
    vn, vd = volume.as_integer_ratio()
    num, den = qn * vd * _VWAP_SCALE, qd * vn
    q, r = divmod(num, den)
    if 2 * r > den or (2 * r == den and q & 1):
        q += 1
    return _fmt(Decimal(q).scaleb(-VWAP_DECIMALS))


IdSet = set[int] | range


def _compact(ids: set[int]) -> IdSet:
    """Consecutive ids (OKX numbers trades per instrument) shrink to a range."""
    if ids and max(ids) - min(ids) + 1 == len(ids):
        return range(min(ids), max(ids) + 1)
    return ids


def _add_ids(old: IdSet, new: set[int]) -> IdSet | None:
    """``old | new`` when they are disjoint, else None; O(len(new)) in the usual cases."""
    if not old:
        return _compact(new)
    if type(old) is range:
        lo, hi = min(new), max(new)
        if lo == old.stop and hi - lo + 1 == len(new):  # the run of ids simply goes on
            return range(old.start, hi + 1)
        if (lo < old.stop and hi >= old.start) and any(map(old.__contains__, new)):
            return None
        merged = set(old)
        merged |= new
        return merged
    if not new.isdisjoint(old):
        return None
    old |= new
    return old


class _Open:
    """An open base interval: trades appended in arrival order, folded into ``agg`` lazily.

    After a fold ``trades`` is emptied; ``ids`` keeps every trade id seen (for de-duplication).
    """

    __slots__ = ("agg", "ids", "trades")

    def __init__(self) -> None:
        self.trades: list[Trade] = []
        self.agg: _Agg | None = None
        self.ids: IdSet = set()

    def fold(self) -> int:
        """Aggregate the pending trades; returns how many duplicates were dropped. Needs _EXACT."""
        new = self.trades
        if not new:
            return 0
        fresh_ids = set(map(_ID, new))
        ids = _add_ids(self.ids, fresh_ids) if len(fresh_ids) == len(new) else None
        dropped = 0
        if ids is None:  # a duplicate somewhere: the slow, exact way (first arrival wins)
            seen = set(self.ids)
            fresh: list[Trade] = []
            for trade in new:
                if trade.trade_id not in seen:
                    seen.add(trade.trade_id)
                    fresh.append(trade)
            dropped = len(new) - len(fresh)
            new = fresh
            ids = _compact(seen)
        if new:
            part = _aggregate(new)
            self.agg = part if self.agg is None else _merge(self.agg, part)
        self.ids = ids
        self.trades = []
        return dropped


class _Kept:
    """A final candle kept for revisions: an aggregate, or a flat candle at ``px``."""

    __slots__ = ("agg", "px", "revision")

    def __init__(self, agg: _Agg | None, px: Decimal | None, revision: int = 0) -> None:
        self.agg = agg
        self.px = px
        self.revision = revision


class _Level:
    """One timeframe: forming aggregates (``acc``), kept final candles, flat-fill position."""

    __slots__ = ("acc", "emit", "kept", "last_close", "last_px", "ms", "name", "src", "upto")

    def __init__(self, name: str, ms: int, src: int, emit: bool) -> None:
        self.name = name
        self.ms = ms
        self.src = src  # index of the finer level this one is built from (0 = base)
        self.emit = emit  # False only for an internal base finer than every asked timeframe
        self.acc: dict[int, _Agg] = {}
        self.kept: dict[int, _Kept] = {}
        self.last_close: int | None = None  # close of the latest final candle (data or flat)
        self.last_px: Decimal | None = None  # its close price, for the next flat candle
        self.upto = _NO_WATERMARK  # the last boundary of this timeframe finalisation passed


def parse_timeframes(timeframes: str | Iterable[str]) -> list[tuple[str, int]]:
    """``"1m,5m"`` or ``["1m", "5m"]`` -> ``[("1m", 60000), ("5m", 300000)]``, sorted, checked."""
    names = timeframes.split(",") if isinstance(timeframes, str) else list(timeframes)
    result: dict[int, str] = {}
    for raw in names:
        name = timeframe_name(raw.strip())
        ms = parse_timeframe(name)
        if ms in result and result[ms] != name:
            msg = f"timeframes {result[ms]!r} and {name!r} are the same length"
            raise ValueError(msg)
        result[ms] = name
    if not result:
        msg = "at least one timeframe is needed"
        raise ValueError(msg)
    return [(name, ms) for ms, name in sorted(result.items())]


def _build_levels(timeframes: str | Iterable[str]) -> list[_Level]:
    tfs = parse_timeframes(timeframes)
    base = 0
    for _, ms in tfs:
        base = gcd(base, ms)
    levels = [] if tfs[0][1] == base else [_Level(f"{base}ms", base, 0, emit=False)]
    for name, ms in tfs:
        src = max((i for i, lvl in enumerate(levels) if ms % lvl.ms == 0), default=0)
        levels.append(_Level(name, ms, src, emit=True))
    return levels


# --------------------------------------------------------------------------------------------
# The state of one instrument
# --------------------------------------------------------------------------------------------


def _check_options(lateness_ms: int | None, empty: str, late: str, retention_ms: int) -> None:
    if empty not in _EMPTY_POLICIES:
        msg = f"empty policy must be one of {_EMPTY_POLICIES}, got {empty!r}"
        raise ValueError(msg)
    if late not in _LATE_POLICIES:
        msg = f"late policy must be one of {_LATE_POLICIES}, got {late!r}"
        raise ValueError(msg)
    if lateness_ms is not None and lateness_ms < 0:
        msg = f"lateness_ms must be >= 0 or None, got {lateness_ms}"
        raise ValueError(msg)
    if retention_ms < 0:
        msg = f"retention_ms must be >= 0, got {retention_ms}"
        raise ValueError(msg)


class InstrumentCandles:
    """The candle state of one instrument. Not thread-safe; picklable at any point.

    ``lateness_ms=None`` turns event-time finality off: nothing is final before ``close_all``
    (batch mode). ``retention_ms`` is how far behind the watermark a final candle can still be
    revised (and a late duplicate still recognised); 0 keeps nothing.
    """

    def __init__(
        self,
        inst_id: str,
        timeframes: str | Iterable[str],
        *,
        lateness_ms: int | None = DEFAULT_LATENESS_MS,
        empty: EmptyPolicy = "flat",
        late: LatePolicy = "revise",
        retention_ms: int = DEFAULT_RETENTION_MS,
    ) -> None:
        _check_options(lateness_ms, empty, late, retention_ms)
        self.inst_id = inst_id
        self.stats = CoreStats()
        self._lateness = lateness_ms
        self._empty = empty
        self._revise = late == "revise"
        self._retention = retention_ms
        self._levels = _build_levels(timeframes)
        self._base = self._levels[0].ms
        self._report = next(i for i, lvl in enumerate(self._levels) if lvl.emit)
        self._open: dict[int, _Open] = {}  # base close -> open interval
        self._ids: dict[int, IdSet] = {}  # base close -> ids of a final, retained interval
        # Watermark, as Bytewax's EventClock keeps it: wm(now) = base + (now - at).
        self._wm = _NO_WATERMARK
        self._wm_base: int | None = None
        self._wm_at = 0
        self._now = 0
        self._next = _NO_WATERMARK  # the first base boundary above the watermark

    # ---- public API ------------------------------------------------------------------------

    @property
    def timeframes(self) -> list[str]:
        return [lvl.name for lvl in self._levels if lvl.emit]

    @property
    def watermark(self) -> int:
        """Event time up to which every candle is final (as of the last call)."""
        return self._wm

    def on_trades(self, trades: Sequence[Trade], now_ms: int) -> Emitted:
        """Take a batch of this instrument's trades that arrived at wall-clock ``now_ms``."""
        out = Emitted()
        with decimal.localcontext(_EXACT):
            self._clock(now_ms, out)
            if trades:
                self._ingest(trades, out)
        return out

    def on_tick(self, now_ms: int) -> Emitted:
        """Advance the watermark by the wall-clock time passed (an idle instrument)."""
        out = Emitted()
        with decimal.localcontext(_EXACT):
            self._clock(now_ms, out)
        return out

    def notify_at(self) -> int | None:
        """The wall-clock time at which ``on_tick`` would finalise something, or None."""
        if self._lateness is None or self._wm_base is None:
            return None
        pending = bool(self._open) or any(lvl.acc for lvl in self._levels)
        if not pending and self._empty == "flat":
            pending = any(lvl.emit and lvl.last_close is not None for lvl in self._levels)
        if not pending:
            return None
        return self._wm_at + (self._next - self._wm_base)

    def close_all(self) -> Emitted:
        """End of a finite input: every open candle is final now (no trailing flat candles).

        The watermark moves to the close of the last candle: what arrives later is late.
        """
        out = Emitted()
        with decimal.localcontext(_EXACT):
            last = self._finalize(_NEVER, out, trailing=False)
            for lvl in self._levels:
                lvl.upto = last - last % lvl.ms
            if last > self._wm:  # the watermark moves past every candle
                self._wm = self._wm_base = last
                self._wm_at = self._now
                self._next = last + self._base
            self._evict()
        return out

    def resume(self, now_ms: int) -> None:
        """After a restart from a snapshot: the time the process was down is not idle time.

        The trades of that time wait in Kafka; counting the downtime as idle would finalise
        their windows before they are read and turn them into late trades.
        """
        if now_ms > self._now:
            self._wm_at += now_ms - self._now
            self._now = now_ms

    def compact(self) -> None:
        """Fold pending trades into aggregates, freeing them (batch mode calls this per chunk)."""
        with decimal.localcontext(_EXACT):
            for bucket in self._open.values():
                self.stats.duplicates += bucket.fold()

    def forming(self) -> list[Candle]:
        """The candles still forming (not final), for live display only: never publish them."""
        with decimal.localcontext(_EXACT):
            self.compact()
            partial: list[dict[int, _Agg]] = []
            result: list[Candle] = []
            for i, lvl in enumerate(self._levels):
                if i == 0:
                    aggs = {c: b.agg for c, b in self._open.items() if b.agg is not None}
                else:
                    aggs = dict(lvl.acc)
                    for c, agg in partial[lvl.src].items():
                        k = -(-c // lvl.ms) * lvl.ms
                        have = aggs.get(k)
                        aggs[k] = agg if have is None else _merge(have, agg)
                partial.append(aggs)
                if lvl.emit:
                    result.extend(self._candle(lvl, c, aggs[c], None, 0) for c in sorted(aggs))
            return result

    def snapshot(self) -> bytes:
        """The state as bytes (pickle); ``restore`` gives an equal state back."""
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def restore(data: bytes) -> InstrumentCandles:
        state = pickle.loads(data)
        if not isinstance(state, InstrumentCandles):
            msg = f"not a candle state snapshot: {type(state).__name__}"
            raise TypeError(msg)
        return state

    # ---- watermark -------------------------------------------------------------------------

    def _clock(self, now_ms: int, out: Emitted) -> None:
        if now_ms > self._now:  # wall clock never goes back (NTP, leap seconds)
            self._now = now_ms
        if self._wm_base is None or self._lateness is None:
            return
        wm = self._wm_base + (self._now - self._wm_at)
        if wm > self._wm:
            self._advance(wm, out)

    def _advance(self, wm: int, out: Emitted) -> None:
        self._wm = wm
        if wm >= self._next:
            self._finalize(wm, out, trailing=True)
            self._next = wm - wm % self._base + self._base
            self._evict()

    # ---- the hot path ----------------------------------------------------------------------

    def _ingest(self, trades: Sequence[Trade], out: Emitted) -> None:
        base = self._base
        lateness = self._lateness
        lag = 0 if lateness is None else lateness
        trigger = _NEVER if lateness is None else self._next + lag
        opened = self._open
        lo = hi = 0  # the current interval [lo, hi), cut at the trigger
        append = None
        touched: list[_Open] = []
        for trade in trades:
            ts = trade.ts
            if lo <= ts < hi:
                append(trade)  # type: ignore[misc]  # hi > 0 only once append is set
                continue
            if ts >= trigger:  # this trade moves the watermark over a boundary
                self._wm_base = ts - lag
                self._wm_at = self._now
                self._advance(ts - lag, out)
                trigger = self._next + lag
            start = ts - ts % base
            close = start + base
            if close <= self._wm:
                self._late(trade, out)
                lo = hi = 0
                continue
            bucket = opened.get(close)
            if bucket is None:
                bucket = opened[close] = _Open()
            touched.append(bucket)
            append = bucket.trades.append
            append(trade)
            lo, hi = start, (close if close < trigger else trigger)
        self.stats.trades += len(trades)
        for bucket in touched:  # aggregate while the trades are still in the CPU cache
            if len(bucket.trades) >= _FOLD_AT:
                self.stats.duplicates += bucket.fold()
        if lateness is not None:
            top = max(map(_TS, trades)) - lag
            if top > self._wm:  # below the trigger: moves the watermark, finalises nothing
                self._wm = self._wm_base = top
                self._wm_at = self._now

    # ---- finalisation ----------------------------------------------------------------------

    def _finalize(self, limit: int, out: Emitted, *, trailing: bool) -> int:
        """Make final every candle closing at or before ``limit``; emit them in time order.

        Returns the latest close of a candle with trades made final (or the watermark).
        """
        last = self._wm
        produced: list[tuple[int, int, Candle]] = []
        fresh: list[list[tuple[int, _Agg]]] = []
        for i, lvl in enumerate(self._levels):
            ms = lvl.ms
            if i == 0:
                data = self._final_base(limit)
            else:
                acc = lvl.acc
                for c, agg in fresh[lvl.src]:  # finer candles just made final
                    k = c - c % ms + ms if c % ms else c
                    have = acc.get(k)
                    acc[k] = agg if have is None else _merge(have, agg)
                if limit - limit % ms <= lvl.upto:  # no boundary of this timeframe passed
                    fresh.append([])
                    continue
                ready = sorted(c for c in acc if c <= limit) if acc else []
                data = [(c, acc.pop(c)) for c in ready]
            lvl.upto = limit - limit % ms
            fresh.append(data)
            if data and data[-1][0] > last:
                last = data[-1][0]
            if lvl.emit:
                self._close_level(i, lvl, data, limit, trailing, produced)
        if produced:
            if len(produced) > 1:
                produced.sort(key=_BY_TIME)
            out.candles.extend([candle for _, _, candle in produced])
            self.stats.candles += len(produced)
        return last

    def _final_base(self, limit: int) -> list[tuple[int, _Agg]]:
        """Pop the open base intervals closing by ``limit``; keep their ids for late dedupe."""
        opened = self._open
        ready = [c for c in opened if c <= limit]
        if len(ready) > 1:
            ready.sort()
        keep = self._retention > 0
        data: list[tuple[int, _Agg]] = []
        for c in ready:
            bucket = opened.pop(c)
            if bucket.trades:
                self.stats.duplicates += bucket.fold()
            if bucket.agg is not None:
                data.append((c, bucket.agg))
            if keep:
                self._ids[c] = bucket.ids
        return data

    def _close_level(
        self,
        index: int,
        lvl: _Level,
        data: list[tuple[int, _Agg]],
        limit: int,
        trailing: bool,
        produced: list[tuple[int, int, Candle]],
    ) -> None:
        ms = lvl.ms
        flat = self._empty == "flat"
        keep = self._retention > 0
        for c, agg in data:
            if flat and lvl.last_close is not None:
                for fc in range(lvl.last_close + ms, c, ms):
                    produced.append((fc, index, self._final_flat(lvl, fc, keep)))
            kept = _Kept(agg, None)
            if keep:
                lvl.kept[c] = kept
            produced.append((c, index, self._candle(lvl, c, agg, None, 0)))
            lvl.last_close = c
            lvl.last_px = agg.close
        if trailing and flat and lvl.last_close is not None:
            end = limit - limit % ms
            for fc in range(lvl.last_close + ms, end + 1, ms):
                produced.append((fc, index, self._final_flat(lvl, fc, keep)))

    def _final_flat(self, lvl: _Level, c: int, keep: bool) -> Candle:
        if keep:
            lvl.kept[c] = _Kept(None, lvl.last_px)
        lvl.last_close = c
        return self._candle(lvl, c, None, lvl.last_px, 0)

    def _evict(self) -> None:
        """Forget final candles (and trade ids) older than the retention."""
        horizon = self._wm - self._retention
        stores: list[dict[int, Any]] = [lvl.kept for lvl in self._levels]
        stores.append(self._ids)
        for store in stores:
            while store:
                oldest = next(iter(store))
                if oldest > horizon:
                    break
                del store[oldest]

    # ---- late trades -----------------------------------------------------------------------

    def _late(self, trade: Trade, out: Emitted) -> None:
        report = self._levels[self._report]
        ts = trade.ts
        base_close = ts - ts % self._base + self._base
        self.stats.late += 1
        if base_close <= self._wm - self._retention:
            self.stats.expired += 1
            action: LateAction = "expired"
        else:
            ids = self._ids.get(base_close)
            if ids is None or type(ids) is not set:
                ids = self._ids[base_close] = set(ids or ())
            if trade.trade_id in ids:
                self.stats.late -= 1
                self.stats.duplicates += 1
                return
            ids.add(trade.trade_id)
            if self._revise:
                self._revise_with(trade, out)
                self.stats.revised += 1
                action = "revised"
            else:
                action = "reported"
        report_close = ts - ts % report.ms + report.ms
        out.late.append(LateTrade(trade, report.name, report_close, self._wm, action))

    def _revise_with(self, trade: Trade, out: Emitted) -> None:
        one = _aggregate_one(trade)
        wm = self._wm
        ts = trade.ts
        closes = [ts - ts % lvl.ms + lvl.ms for lvl in self._levels]
        for i, lvl in enumerate(self._levels):
            c = closes[i]
            if c > wm:
                # Still forming. It gets the trade through its finer level when that candle
                # becomes final, unless that candle is final already (then add it here).
                if closes[lvl.src] <= wm:
                    have = lvl.acc.get(c)
                    lvl.acc[c] = one if have is None else _merge(have, one)
            elif lvl.emit:
                self._revise_final(lvl, c, one, wm, out)

    def _revise_final(self, lvl: _Level, c: int, one: _Agg, wm: int, out: Emitted) -> None:
        """Add a late trade to the final candle ``c`` of ``lvl`` and re-emit what changed."""
        kept = lvl.kept.get(c)
        if kept is None or kept.agg is None:
            revision = 1 if kept is None else kept.revision + 1
            kept = lvl.kept[c] = _Kept(one, None, revision)
            agg = one
            moved = True
        else:
            before = kept.agg.close
            agg = kept.agg = _merge(kept.agg, one)
            kept.revision += 1
            moved = agg.close != before
        self._publish(lvl, c, kept, out)
        reach = c
        if moved and self._empty == "flat":
            reach = self._refill_flats(lvl, c, agg.close, wm, out)
        if lvl.last_close is None or reach >= lvl.last_close:
            lvl.last_close = reach
            lvl.last_px = agg.close

    def _refill_flats(self, lvl: _Level, c: int, px: Decimal, wm: int, out: Emitted) -> int:
        """After candle ``c`` changed its close, re-price the flat candles right after it."""
        ms = lvl.ms
        end = wm - wm % ms
        reach = c
        for fc in range(c + ms, end + 1, ms):
            kept = lvl.kept.get(fc)
            if kept is None:
                kept = lvl.kept[fc] = _Kept(None, px, 1)
            elif kept.agg is not None or kept.px == px:
                return reach
            else:
                kept.px = px
                kept.revision += 1
            self._publish(lvl, fc, kept, out)
            reach = fc
        return reach

    def _publish(self, lvl: _Level, c: int, kept: _Kept, out: Emitted) -> None:
        out.candles.append(self._candle(lvl, c, kept.agg, kept.px, kept.revision))
        self.stats.candles += 1

    # ---- output ----------------------------------------------------------------------------

    def _candle(self, lvl: _Level, c: int, agg: _Agg | None, px: Decimal | None, revision: int) -> Candle:
        if agg is None:
            price = _fmt(px) if px is not None else "0"
            return Candle(
                self.inst_id, lvl.name, c, price, price, price, price, "0", "0", 0, revision=revision
            )
        return Candle(
            self.inst_id,
            lvl.name,
            c,
            _fmt(agg.open),
            _fmt(agg.high),
            _fmt(agg.low),
            _fmt(agg.close),
            _fmt(agg.volume),
            _fmt(agg.quote),
            agg.trades,
            _vwap(agg.quote, agg.volume),
            agg.open_id,
            agg.close_id,
            revision,
        )


# --------------------------------------------------------------------------------------------
# Many instruments
# --------------------------------------------------------------------------------------------


class CandleBook:
    """One ``InstrumentCandles`` per instrument, created on first sight; same options for all."""

    def __init__(
        self,
        timeframes: str | Iterable[str],
        *,
        lateness_ms: int | None = DEFAULT_LATENESS_MS,
        empty: EmptyPolicy = "flat",
        late: LatePolicy = "revise",
        retention_ms: int = DEFAULT_RETENTION_MS,
    ) -> None:
        self._timeframes = [name for name, _ in parse_timeframes(timeframes)]
        self._options = {
            "lateness_ms": lateness_ms,
            "empty": empty,
            "late": late,
            "retention_ms": retention_ms,
        }
        _check_options(lateness_ms, empty, late, retention_ms)
        self.states: dict[str, InstrumentCandles] = {}

    def state(self, inst_id: str) -> InstrumentCandles:
        state = self.states.get(inst_id)
        if state is None:
            state = self.states[inst_id] = InstrumentCandles(
                inst_id,
                self._timeframes,
                **self._options,  # type: ignore[arg-type]
            )
        return state

    def on_trades(self, trades: Iterable[Trade], now_ms: int) -> Emitted:
        """Route a mixed batch (arrival order kept per instrument) to the instruments' states."""
        out = Emitted()
        for inst_id, group in _group_by_instrument(trades).items():
            out.extend(self.state(inst_id).on_trades(group, now_ms))
        return out

    def on_tick(self, now_ms: int) -> Emitted:
        out = Emitted()
        for state in self.states.values():
            out.extend(state.on_tick(now_ms))
        return out

    def close_all(self) -> Emitted:
        out = Emitted()
        for state in self.states.values():
            out.extend(state.close_all())
        return out

    def compact(self) -> None:
        for state in self.states.values():
            state.compact()

    def forming(self) -> list[Candle]:
        return [candle for state in self.states.values() for candle in state.forming()]

    @property
    def stats(self) -> CoreStats:
        total = CoreStats()
        for state in self.states.values():
            total.add(state.stats)
        return total


def _group_by_instrument(trades: Iterable[Trade]) -> dict[str, list[Trade]]:
    groups: dict[str, list[Trade]] = {}
    last = ""
    append = None
    for trade in trades:
        inst_id = trade.inst_id
        if inst_id != last or append is None:
            group = groups.get(inst_id)
            if group is None:
                group = groups[inst_id] = []
            append = group.append
            last = inst_id
        append(trade)
    return groups
