"""Simulated OKX trades: a seeded, realistic-looking market for demos, tests and load runs.

What makes the stream look like OKX's (and exercise the same code paths):

* prices are a random walk in whole ticks of each instrument's tick size, sizes are whole lots;
  both are written as exact decimal strings from integers (never through a float's repr);
* arrivals are Poisson with bursts: a calm state and a busy state that switch at random, and
  in a burst one "hot" instrument takes half the orders;
* a taker order can sweep several price levels: several pushes in the same millisecond at
  successive prices, and a push aggregates ``count`` fills, so ``trade_id`` (the LAST id of
  the aggregation, as on OKX) jumps by ``count``; ids ascend per instrument;
* ``source`` is 1 (Enhanced Liquidity Program) for a few pushes, ``seq_id`` counts per instrument.

The same seed gives the same trades (``received_at`` aside, which is the wall clock). With a
``rate``, event time follows the wall clock (``start_ms`` defaults to now) and the source paces
itself like a live feed; without one it runs as fast as it can.

:func:`write_frames` / :func:`write_simulated` write a run as OKX WebSocket frames, one JSON
object per line (subscribe acks, then ``trades`` pushes), which :class:`connectors.replay.ReplaySource`
reads back. The bundled demo sample ``tcp/data/sample-trades.jsonl.gz`` was made with::

    .venv/bin/python -m connectors.simulate tcp/data/sample-trades.jsonl.gz \\
        --seed 20250101 --start-ms 1735689600000 --hours 2 --event-rate 10
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gzip
import io
import itertools
import math
import random
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import msgspec

from connectors.base import Batch
from connectors.replay import EventClock
from tcp.config import DEFAULT_INSTRUMENTS
from tcp.schemas import Side, Trade
from tcp.timeframes import now_ms

__all__ = [
    "DEFAULT_EVENT_RATE",
    "INSTRUMENT_SPECS",
    "InstrumentSpec",
    "SimulatedSource",
    "format_units",
    "main",
    "spec_for",
    "write_frames",
    "write_simulated",
]

#: Mean pushes per second (all instruments together, in event time) when no ``rate`` is given.
DEFAULT_EVENT_RATE = 20.0
#: Items per batch when running as fast as possible.
BATCH_SIZE = 1000

# Burst model: mean calm and busy spells (ms of event time) and how much busier a burst is.
_CALM_MS = 60_000.0
_BURST_MS = 5_000.0
_BURST_FACTOR = 8.0
# Levels one taker order sweeps (1 = one price) and their probabilities.
_LEVELS = (1, 2, 3, 4, 5)
_LEVEL_WEIGHTS = (0.70, 0.15, 0.08, 0.04, 0.03)
_LEVEL_CUM = tuple(itertools.accumulate(_LEVEL_WEIGHTS))[:-1]  # bisect: index = levels - 1
# Chance that a push aggregates one more fill (count is 1 + geometric).
_MORE_FILLS = 0.35
_MAX_COUNT = 40
# Share of pushes from the Enhanced Liquidity Program (source=1).
_ELP_SHARE = 0.03
_SECONDS_PER_YEAR = 365.0 * 86_400.0


@dataclass(frozen=True, slots=True)
class InstrumentSpec:
    """How one instrument trades: tick and lot size (decimal strings as OKX lists them), a start
    price, a minimum size, annualised volatility, the median order value in quote currency and
    a weight (its share of all orders)."""

    tick_sz: str
    lot_sz: str
    min_sz: str
    start_px: str
    volatility: float
    median_notional: float
    weight: float


#: Plausible values for the nine default pairs (tick/lot sizes as on OKX spot, prices of early 2025).
INSTRUMENT_SPECS: dict[str, InstrumentSpec] = {
    "BTC-USDT": InstrumentSpec("0.1", "0.00000001", "0.00001", "94000", 0.50, 400.0, 30.0),
    "ETH-USDT": InstrumentSpec("0.01", "0.000001", "0.0001", "3350", 0.65, 300.0, 20.0),
    "SOL-USDT": InstrumentSpec("0.01", "0.000001", "0.001", "190", 0.80, 200.0, 12.0),
    "DOGE-USDT": InstrumentSpec("0.00001", "0.000001", "10", "0.32", 0.90, 120.0, 8.0),
    "TON-USDT": InstrumentSpec("0.001", "0.0001", "1", "5.5", 0.75, 100.0, 4.0),
    "ETH-USDC": InstrumentSpec("0.01", "0.000001", "0.0001", "3350", 0.65, 250.0, 4.0),
    "BTC-USDC": InstrumentSpec("0.1", "0.00000001", "0.00001", "94000", 0.50, 350.0, 5.0),
    "UNI-USDT": InstrumentSpec("0.001", "0.000001", "0.1", "13", 0.85, 80.0, 3.0),
    "PEPE-USDT": InstrumentSpec("0.00000001", "1", "100000", "0.00001", 1.10, 100.0, 8.0),
}
_FALLBACK = InstrumentSpec("0.01", "0.0001", "0.0001", "100", 0.80, 100.0, 3.0)


def spec_for(inst_id: str) -> InstrumentSpec:
    """The spec of a known pair; for any other id a generic one whose start price depends on the
    id (via CRC-32, which unlike ``hash()`` is the same in every process)."""
    known = INSTRUMENT_SPECS.get(inst_id)
    if known is not None:
        return known
    start = 10 + zlib.crc32(inst_id.encode()) % 990  # 10 .. 999
    return InstrumentSpec(
        _FALLBACK.tick_sz,
        _FALLBACK.lot_sz,
        _FALLBACK.min_sz,
        str(start),
        _FALLBACK.volatility,
        _FALLBACK.median_notional,
        _FALLBACK.weight,
    )


def _scaled(text: str) -> tuple[int, int]:
    """``"0.001"`` -> ``(1, 3)``: a positive decimal string as an integer and a decimal scale."""
    value = Decimal(text)
    if value <= 0:
        msg = f"expected a positive decimal, got {text!r}"
        raise ValueError(msg)
    exponent = value.as_tuple().exponent
    scale = max(0, -int(exponent))
    return int(value.scaleb(scale)), scale


def format_units(units: int, scale: int) -> str:
    """``units * 10**-scale`` as OKX writes numbers: plain notation, no trailing zeros.

    ``format_units(602199, 1) == "60219.9"``, ``format_units(602190, 1) == "60219"``,
    ``format_units(12, 8) == "0.00000012"``. Pure integer/string arithmetic: exact.
    """
    if units < 0:
        msg = f"units must not be negative, got {units}"
        raise ValueError(msg)
    digits = str(units)
    if scale == 0:
        return digits
    if len(digits) <= scale:
        digits = "0" * (scale - len(digits) + 1) + digits
    whole, frac = digits[:-scale], digits[-scale:].rstrip("0")
    return f"{whole}.{frac}" if frac else whole


class _Book:
    """The state of one simulated instrument: best bid in ticks, last trade id, sequence number."""

    __slots__ = (
        "inst_id",
        "last_ms",
        "lot_scale",
        "lot_units",
        "lot_value",
        "min_lots",
        "notional_mu",
        "px_scale",
        "seq_id",
        "tick_units",
        "tick_value",
        "ticks",
        "trade_id",
        "vol_per_sqrt_ms",
    )

    def __init__(self, inst_id: str, spec: InstrumentSpec, rng: random.Random) -> None:
        self.inst_id = inst_id
        self.tick_units, self.px_scale = _scaled(spec.tick_sz)
        self.lot_units, self.lot_scale = _scaled(spec.lot_sz)
        self.tick_value = float(Decimal(spec.tick_sz))
        self.lot_value = float(Decimal(spec.lot_sz))
        self.ticks = max(1, int(Decimal(spec.start_px) / Decimal(spec.tick_sz)))
        self.min_lots = max(1, math.ceil(Decimal(spec.min_sz) / Decimal(spec.lot_sz)))
        self.vol_per_sqrt_ms = spec.volatility / math.sqrt(_SECONDS_PER_YEAR * 1000.0)
        self.notional_mu = math.log(spec.median_notional)
        # Plausible, different id ranges per instrument; the seed decides where they start.
        self.trade_id = rng.randrange(10_000_000, 900_000_000)
        self.seq_id = rng.randrange(1_000_000, 90_000_000)
        self.last_ms = -1.0

    def walk(self, rng: random.Random, now_ms: float) -> None:
        """Move the bid by a Gaussian step scaled by the time since this book last traded.

        The step is rounded to whole ticks stochastically (up with the probability of its
        fraction), so a coarse tick, as PEPE's, keeps the volatility instead of rounding it away.
        """
        if self.last_ms >= 0.0:
            elapsed = max(now_ms - self.last_ms, 1.0)
            step = rng.gauss(0.0, self.vol_per_sqrt_ms * math.sqrt(elapsed) * self.ticks)
            self.ticks = max(1, self.ticks + math.floor(step + rng.random()))
        self.last_ms = now_ms

    def lots_for(self, rng: random.Random) -> int:
        """A lognormal order value in quote currency, as whole lots (at least the minimum size)."""
        notional = rng.lognormvariate(self.notional_mu, 1.4)
        lots = round(notional / (self.ticks * self.tick_value) / self.lot_value)
        return max(self.min_lots, lots)


class _Market:
    """The seeded generator behind :class:`SimulatedSource`: one push per :meth:`next_trade`."""

    def __init__(self, instruments: Sequence[str], seed: int, start_ms: int, event_rate: float) -> None:
        if not instruments:
            msg = "at least one instrument is needed"
            raise ValueError(msg)
        if event_rate <= 0:
            msg = f"event_rate must be positive, got {event_rate}"
            raise ValueError(msg)
        self._rng = random.Random(seed)
        self._books = [_Book(inst_id, spec_for(inst_id), self._rng) for inst_id in instruments]
        weights = [spec_for(inst_id).weight for inst_id in instruments]
        self._cum_weights = list(itertools.accumulate(weights))
        self._total_weight = self._cum_weights[-1]
        self._start_ms = start_ms
        # Mean pushes per taker order and time share of bursts give the calm order rate.
        pushes_per_order = sum(n * w for n, w in zip(_LEVELS, _LEVEL_WEIGHTS, strict=True))
        burst_share = _BURST_MS / (_CALM_MS + _BURST_MS)
        busy = (1.0 - burst_share) + burst_share * _BURST_FACTOR
        self._calm_rate_per_ms = event_rate / 1000.0 / pushes_per_order / busy
        self._clock_ms = 0.0
        self._in_burst = False
        self._switch_at_ms = self._rng.expovariate(1.0 / _CALM_MS)
        self._hot = self._books[0]
        self._pending: list[Trade] = []

    def _next_order_ms(self) -> float:
        """Advance the clock to the next taker order (exact for a two-state modulated Poisson)."""
        rng = self._rng
        while True:
            rate = self._calm_rate_per_ms * (_BURST_FACTOR if self._in_burst else 1.0)
            arrival = self._clock_ms + rng.expovariate(rate)
            if arrival < self._switch_at_ms:
                self._clock_ms = arrival
                return arrival
            # The state switches first; exponential gaps are memoryless, so just draw again.
            self._clock_ms = self._switch_at_ms
            self._in_burst = not self._in_burst
            if self._in_burst:
                self._hot = self._books[rng.randrange(len(self._books))]
            self._switch_at_ms += rng.expovariate(1.0 / (_BURST_MS if self._in_burst else _CALM_MS))

    def _order(self, received_at: int) -> list[Trade]:
        """One taker order: one push per price level it sweeps, all in the same millisecond."""
        rng = self._rng
        clock = self._next_order_ms()
        if self._in_burst and rng.random() < 0.5:
            book = self._hot
        else:
            pick = bisect.bisect(self._cum_weights, rng.random() * self._total_weight)
            book = self._books[min(pick, len(self._books) - 1)]
        book.walk(rng, clock)
        ts = self._start_ms + int(clock)
        # The book's price is the best bid; the ask is one tick above. A buy lifts the ask and
        # sweeps up, a sell hits the bid and sweeps down: bid-ask bounce, and same-ms prices.
        side: Side = "buy" if rng.random() < 0.5 else "sell"
        first, step = (book.ticks + 1, 1) if side == "buy" else (book.ticks, -1)
        levels = _LEVELS[bisect.bisect(_LEVEL_CUM, rng.random())]
        pushes: list[Trade] = []
        for level in range(levels):
            ticks = first + step * level
            if ticks < 1:
                break
            count = 1
            while count < _MAX_COUNT and rng.random() < _MORE_FILLS:
                count += 1
            lots = book.lots_for(rng) * count
            book.trade_id += count
            book.seq_id += 1
            pushes.append(
                Trade(
                    inst_id=book.inst_id,
                    trade_id=book.trade_id,
                    px=format_units(ticks * book.tick_units, book.px_scale),
                    sz=format_units(lots * book.lot_units, book.lot_scale),
                    side=side,
                    ts=ts,
                    origin="sim",
                    received_at=received_at,
                    count=count,
                    source=1 if rng.random() < _ELP_SHARE else 0,
                    seq_id=book.seq_id,
                )
            )
        # The book refills after a sweep: no lasting impact, the walk alone moves the price.
        return pushes

    def next_trade(self, received_at: int = 0) -> Trade:
        """The next push (in event order: ``ts`` never decreases)."""
        while not self._pending:
            self._pending = self._order(received_at)
            self._pending.reverse()
        return self._pending.pop()


class SimulatedSource:
    """A :class:`connectors.base.TradeSource` of simulated trades (``origin="sim"``).

    ``trades``: stop after this many pushes (None = never). ``end_ms``: stop before the first
    trade at or after this event time. ``rate``: pushes per second, on average, with event time
    following the wall clock (bursts stay bursty); None = as fast as possible. ``event_rate``:
    the simulated market's mean pushes per second of event time (default: ``rate``, else
    :data:`DEFAULT_EVENT_RATE`; with both, event time runs ``event_rate / rate`` times the wall
    clock). ``start_ms``: event time of the start (default: now, which makes
    the run not reproducible; pass it for determinism).
    """

    name = "sim"

    def __init__(
        self,
        *,
        instruments: Sequence[str] = DEFAULT_INSTRUMENTS,
        seed: int = 0,
        trades: int | None = None,
        rate: float | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
        event_rate: float | None = None,
    ) -> None:
        if trades is not None and trades < 0:
            msg = f"trades must not be negative, got {trades}"
            raise ValueError(msg)
        if rate is not None and rate <= 0:
            msg = f"rate must be positive (or None for as fast as possible), got {rate}"
            raise ValueError(msg)
        self.instruments = tuple(instruments)
        self.seed = seed
        self.trades = trades
        self.rate = rate
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.event_rate = event_rate if event_rate is not None else (rate or DEFAULT_EVENT_RATE)
        if self.event_rate <= 0:
            msg = f"event_rate must be positive, got {self.event_rate}"
            raise ValueError(msg)

    def _market(self) -> _Market:
        start = self.start_ms if self.start_ms is not None else now_ms()
        return _Market(self.instruments, self.seed, start, self.event_rate)

    def iter_trades(self, received_at: int = 0) -> Iterator[Trade]:
        """The whole run synchronously, unpaced: for writers, benchmarks and tests."""
        market = self._market()
        produced = 0
        while self.trades is None or produced < self.trades:
            trade = market.next_trade(received_at)
            if self.end_ms is not None and trade.ts >= self.end_ms:
                return
            produced += 1
            yield trade

    async def batches(self) -> AsyncIterator[Batch]:
        """Batches of up to :data:`BATCH_SIZE` trades; paced by event time when ``rate`` is set.

        ``rate`` scales the market so that event time runs at wall-clock speed: a batch is
        yielded whenever the next trade is not due yet, then the source sleeps until it is.
        """
        market = self._market()
        clock = EventClock(self.event_rate / self.rate) if self.rate is not None else None
        produced = 0
        batch: Batch = []
        received_at = now_ms()
        while self.trades is None or produced < self.trades:
            trade = market.next_trade(received_at)
            if self.end_ms is not None and trade.ts >= self.end_ms:
                break
            if clock is not None:
                wait = clock.wait_s(trade.ts)
                if wait > 0.0:
                    if batch:
                        yield batch
                        batch = []
                    await asyncio.sleep(wait)
                    received_at = now_ms()
                    trade = msgspec.structs.replace(trade, received_at=received_at)
            batch.append(trade)
            produced += 1
            if len(batch) >= BATCH_SIZE:
                yield batch
                batch = []
                await asyncio.sleep(0)
                received_at = now_ms()
        if batch:
            yield batch


# --- writing runs as OKX WebSocket frames ---------------------------------------------------------


class _WireArg(msgspec.Struct, rename="camel"):
    channel: str
    inst_id: str


class _WireTrade(msgspec.Struct, rename="camel", omit_defaults=True):
    inst_id: str
    trade_id: str
    px: str
    sz: str
    side: str
    ts: str
    count: str
    source: str
    seq_id: int | None = None


class _WirePush(msgspec.Struct):
    arg: _WireArg
    data: list[_WireTrade]


class _WireAck(msgspec.Struct):
    event: str
    arg: _WireArg


_encoder = msgspec.json.Encoder()


def _push_line(trade: Trade) -> bytes:
    """One ``trades`` push for one trade, as OKX sends it (2025 shape, every number a string)."""
    wire = _WireTrade(
        inst_id=trade.inst_id,
        trade_id=str(trade.trade_id),
        px=trade.px,
        sz=trade.sz,
        side=trade.side,
        ts=str(trade.ts),
        count=str(trade.count),
        source=str(trade.source),
        seq_id=trade.seq_id,
    )
    return _encoder.encode(_WirePush(_WireArg("trades", trade.inst_id), [wire])) + b"\n"


def _ack_lines(instruments: Iterable[str]) -> bytes:
    return b"".join(
        _encoder.encode(_WireAck("subscribe", _WireArg("trades", inst_id))) + b"\n" for inst_id in instruments
    )


@contextmanager
def _open_for_writing(path: Path) -> Iterator[io.BufferedIOBase]:
    """A binary file; gzip-compressed (reproducibly: no name, mtime 0) when the name ends in .gz."""
    with path.open("wb") as raw:
        if path.suffix == ".gz":
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as packed:
                yield packed
        else:
            yield raw


def write_frames(
    path: str | Path,
    trades: Iterable[Trade],
    *,
    instruments: Sequence[str],
    resubscribe_every: int | None = None,
) -> int:
    """Write trades as OKX WebSocket frames, one per line: subscribe acks for ``instruments``
    first, then one ``trades`` push per trade; with ``resubscribe_every``, the acks again after
    every that many trades (as after a reconnect). Returns the number of trades written."""
    target = Path(path)
    written = 0
    with _open_for_writing(target) as out:
        out.write(_ack_lines(instruments))
        chunk: list[bytes] = []
        for trade in trades:
            chunk.append(_push_line(trade))
            written += 1
            if resubscribe_every and written % resubscribe_every == 0:
                chunk.append(_ack_lines(instruments))
            if len(chunk) >= 4096:
                out.write(b"".join(chunk))
                chunk = []
        out.write(b"".join(chunk))
    return written


def write_simulated(
    path: str | Path,
    *,
    instruments: Sequence[str] = DEFAULT_INSTRUMENTS,
    seed: int = 0,
    start_ms: int,
    trades: int | None = None,
    end_ms: int | None = None,
    event_rate: float = DEFAULT_EVENT_RATE,
    resubscribe_every: int | None = 50_000,
) -> int:
    """Simulate a run (needs ``trades`` or ``end_ms`` to end) and write it with :func:`write_frames`."""
    if trades is None and end_ms is None:
        msg = "give trades or end_ms: a simulated run to a file must end"
        raise ValueError(msg)
    source = SimulatedSource(
        instruments=instruments,
        seed=seed,
        trades=trades,
        start_ms=start_ms,
        end_ms=end_ms,
        event_rate=event_rate,
    )
    return write_frames(
        path, source.iter_trades(), instruments=source.instruments, resubscribe_every=resubscribe_every
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m connectors.simulate OUT [--seed N] [--start-ms MS] [--hours H | --trades N]``."""
    parser = argparse.ArgumentParser(prog="python -m connectors.simulate", description=main.__doc__)
    parser.add_argument("out", type=Path, help="output file (.jsonl, or .jsonl.gz for gzip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--start-ms", type=int, required=True, help="event time of the first trade (epoch ms)"
    )
    parser.add_argument("--hours", type=float, help="event-time length of the run")
    parser.add_argument("--trades", type=int, help="number of pushes")
    parser.add_argument("--event-rate", type=float, default=DEFAULT_EVENT_RATE, help="mean pushes per second")
    parser.add_argument(
        "--instruments", default=",".join(DEFAULT_INSTRUMENTS), help="comma-separated instrument ids"
    )
    args = parser.parse_args(argv)
    if args.hours is None and args.trades is None:
        parser.error("give --hours or --trades")
    end_ms = args.start_ms + round(args.hours * 3_600_000) if args.hours is not None else None
    instruments = [part.strip() for part in args.instruments.split(",") if part.strip()]
    written = write_simulated(
        args.out,
        instruments=instruments,
        seed=args.seed,
        start_ms=args.start_ms,
        trades=args.trades,
        end_ms=end_ms,
        event_rate=args.event_rate,
    )
    print(f"wrote {written:,} trades to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
