"""The candle dataflow: ``okx.trades`` -> right-aligned candles for every timeframe.

    python -m bytewax.run dataflows.candles:flow        (settings from TCP_* variables)
    tcp candles run [-w N] [-i I -a HOST:PORT,...]       (the same flow, recovery on)

Steps (each a small function below):

1. ``trades_in``: Kafka, one item per consumed batch (dataflows.kafka_io.KafkaBatchSource).
2. ``decode``: typed decoding and validation; what fails becomes a dead letter; the rest is
   grouped per instrument -> ``(inst_id, [Trade, ...])``.
3. ``candles``: ONE stateful step per instrument (CandleLogic around
   dataflows.candle_core.InstrumentCandles) for all timeframes. It emits final candles only
   when their window has closed (event time past the end plus the allowed lateness, with the
   watermark also advancing on wall-clock time when the instrument is idle), the forming
   candles at most once per second per instrument and timeframe, and late trades.
4. Outputs: final candles to Kafka ``candles`` and PostgreSQL ``candles`` (idempotent upserts),
   forming ones to ``candles.live``, late trades to ``okx.trades.late``, dead letters to
   ``okx.trades.dlq``; final and forming candles to the Redis channels ``market:{inst_id}``
   (live charts). (The raw trades go to PostgreSQL ``trades`` through a dataflow of their
   own, dataflows.archive, run beside this one.)

State: each instrument's InstrumentCandles is snapshotted (a deep copy) at every epoch, with
the Kafka offsets, when recovery is on; outputs are at-least-once, so every sink is idempotent.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.operators import StatefulLogic
from bytewax.outputs import DynamicSink

from dataflows.candle_core import Candle, Emitted, InstrumentCandles, LateTrade, encode_candle
from dataflows.kafka_io import KafkaBatchSource, KafkaProduceSink, MessageBatch
from sinks.bytewax_pg import PostgresSink, Row
from sinks.postgres import Upsert
from sinks.redis import Publish, RedisOp, RedisSink, market_channel
from tcp import topics
from tcp.config import Settings
from tcp.observe import CANDLES_OUT, DEAD_LETTERS, LATE_TRADES, TRADES_IN
from tcp.schemas import DeadLetter, Trade, decode_trades, encode

__all__ = [
    "CandleLogic",
    "CandleOptions",
    "Decoded",
    "build_flow",
    "candle_row",
    "decode",
    "within",
]  # and `flow`, lazily

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: What the stateful step emits: a final (or revised) candle, a forming one, or a late trade.
Output = tuple[Literal["final", "live"], Candle] | tuple[Literal["late"], LateTrade]
#: A Kafka message to produce: (topic, key, value).
KafkaItem = tuple[str, bytes | None, bytes]

CANDLE_COLUMNS = (
    "inst_id", "timeframe", "ts_close", "open", "high", "low", "close", "volume",
    "quote_volume", "trade_count", "vwap", "first_trade_id", "last_trade_id", "revision",
)  # fmt: skip
CANDLES_UPSERT = Upsert("candles", CANDLE_COLUMNS, ("inst_id", "timeframe", "ts_close"), newer="revision")


@dataclass(frozen=True)
class CandleOptions:
    """The candle rules' knobs (docs/candles.md), taken from the settings."""

    timeframes: tuple[str, ...]
    lateness_ms: int
    empty: Literal["flat", "skip"]
    late: Literal["revise", "drop-to-late-topic-only"]
    live_every_ms: int

    @classmethod
    def from_settings(cls, settings: Settings) -> CandleOptions:
        return cls(
            timeframes=settings.timeframes,
            lateness_ms=settings.candle_lateness_ms,
            empty=settings.candle_empty,
            late=settings.candle_late_policy,
            live_every_ms=settings.candle_live_every_ms,
        )


# --------------------------------------------------------------------------------------------
# Step 2: decode


@dataclass(frozen=True)
class Decoded:
    """One consumed batch: the valid trades grouped per instrument, and the dead letters."""

    by_instrument: dict[str, list[Trade]]
    dead: list[DeadLetter]


def decode(topic: str, batch: MessageBatch) -> Decoded:
    """Typed decoding and checking of a batch of ``okx.trades`` values; failures become dead letters."""
    trades, bad = decode_trades(batch.values)
    by_instrument: dict[str, list[Trade]] = {}
    for trade in trades:
        group = by_instrument.get(trade.inst_id)
        if group is None:
            by_instrument[trade.inst_id] = [trade]
        else:
            group.append(trade)
    for inst_id, group in by_instrument.items():
        TRADES_IN.labels(inst_id).inc(len(group))
    dead: list[DeadLetter] = []
    if bad:
        DEAD_LETTERS.labels(topic).inc(len(bad))
        at = _now_ms()
        for i, reason in bad:
            where = f"{topic}[{batch.partition}]@{batch.offsets[i]}"
            dead.append(DeadLetter.of(batch.values[i], reason=reason, where=where, at=at))
        log.warning("%d message(s) from %s could not be decoded: dead-lettered", len(dead), topic)
    return Decoded(by_instrument, dead)


def within(decoded: Decoded, since_ms: int | None, until_ms: int | None) -> Decoded:
    """``decoded`` with only the trades of ``since_ms <= ts < until_ms`` (a bound may be ``None``)."""
    lo = -(2**63) if since_ms is None else since_ms
    hi = 2**63 if until_ms is None else until_ms
    kept: dict[str, list[Trade]] = {}
    for inst_id, trades in decoded.by_instrument.items():
        inside = [trade for trade in trades if lo <= trade.ts < hi]
        if inside:
            kept[inst_id] = inside
    return Decoded(kept, decoded.dead)


# --------------------------------------------------------------------------------------------
# Step 3: the stateful candle step


@dataclass
class _Saved:
    """What CandleLogic snapshots: the core state and when live candles were last sent."""

    core: InstrumentCandles
    live_sent_ms: int


class CandleLogic(StatefulLogic[list[Trade], Output, "bytes | None"]):
    """One instrument's candles as a Bytewax stateful logic.

    ``on_item`` feeds a batch of trades; ``on_notify`` fires when the wall-clock watermark
    would finalise a candle (the core says when) or a throttled live update is due;
    ``on_eof`` closes every open window (finite input).

    Snapshot: the state pickled to bytes. Bytewax asks for a snapshot of every key touched at
    every epoch, recovery on or not; pickling (C) is several times cheaper than a deep copy and
    the bytes are a fraction of the objects' size (measured: peak RSS, BENCHMARKS.md).
    """

    def __init__(self, options: CandleOptions, resume: bytes | _Saved | None) -> None:
        self._options = options
        # Bytewax's builder gets no key: a new instrument's state is made from its first batch.
        if isinstance(resume, bytes):
            resume = pickle.loads(resume)  # noqa: S301  # our own snapshot, from our recovery store
        if resume is not None:  # (a _Saved object: a snapshot written before they were bytes)
            assert isinstance(resume, _Saved)
            resume.core.resume(_now_ms())
        self._saved = resume
        self._live_due = False

    def on_item(self, value: list[Trade]) -> tuple[list[Output], bool]:
        now = _now_ms()
        if self._saved is None:
            options = self._options
            core = InstrumentCandles(
                value[0].inst_id,
                options.timeframes,
                lateness_ms=options.lateness_ms,
                empty=options.empty,
                late=options.late,
            )
            self._saved = _Saved(core, 0)
        out = self._emit(self._saved.core.on_trades(value, now))
        self._live_due = True
        self._maybe_live(now, out)
        return out, StatefulLogic.RETAIN

    def on_notify(self) -> tuple[list[Output], bool]:
        if self._saved is None:
            return [], StatefulLogic.RETAIN
        now = _now_ms()
        out = self._emit(self._saved.core.on_tick(now))
        self._maybe_live(now, out)
        return out, StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list[Output], bool]:
        self._live_due = False
        if self._saved is None:
            return [], StatefulLogic.RETAIN
        return self._emit(self._saved.core.close_all()), StatefulLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if self._saved is None:
            return None
        times = []
        core_at = self._saved.core.notify_at()
        if core_at is not None:
            times.append(core_at)
        if self._live_due:
            times.append(self._saved.live_sent_ms + self._options.live_every_ms)
        return _EPOCH + timedelta(milliseconds=min(times)) if times else None

    def snapshot(self) -> bytes | None:
        return None if self._saved is None else pickle.dumps(self._saved, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def _emit(emitted: Emitted) -> list[Output]:
        out: list[Output] = [("final", candle) for candle in emitted.candles]
        out.extend(("late", late) for late in emitted.late)
        for candle in emitted.candles:
            CANDLES_OUT.labels(candle.inst_id, candle.timeframe).inc()
        if emitted.late:
            LATE_TRADES.labels(emitted.late[0].trade.inst_id).inc(len(emitted.late))
        return out

    def _maybe_live(self, now: int, out: list[Output]) -> None:
        """At most one forming candle per timeframe per ``live_every_ms``; never a final one."""
        saved = self._saved
        if saved is None or not self._live_due or now - saved.live_sent_ms < self._options.live_every_ms:
            return
        out.extend(("live", candle) for candle in saved.core.forming())
        saved.live_sent_ms = now
        self._live_due = False


# --------------------------------------------------------------------------------------------
# Step 4: outputs


def candle_row(candle: Candle) -> tuple[Any, ...]:
    """The ``candles`` table row of a candle (numerics as exact strings, ts_close as timestamptz)."""
    return (
        candle.inst_id,
        candle.timeframe,
        _EPOCH + timedelta(milliseconds=candle.ts_close),
        candle.open,
        candle.high,
        candle.low,
        candle.close,
        candle.volume,
        candle.quote_volume,
        candle.trade_count,
        candle.vwap,
        candle.first_trade_id,
        candle.last_trade_id,
        candle.revision,
    )


def _kafka_item(settings: Settings, output: Output) -> KafkaItem:
    kind, item = output
    if kind == "late":
        assert isinstance(item, LateTrade)
        return settings.topic(topics.LATE), item.trade.inst_id.encode(), encode_candle(item)
    assert isinstance(item, Candle)
    topic = topics.CANDLES if kind == "final" else topics.CANDLES_LIVE
    return settings.topic(topic), item.key, encode_candle(item)


def build_flow(
    settings: Settings,
    *,
    tail: bool = True,
    write_postgres: bool = True,
    write_redis: bool | None = None,
    trades_topic: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    outputs_to: DynamicSink[Output] | None = None,
) -> Dataflow:
    """The candle dataflow over the services in ``settings`` (already ensured).

    ``write_redis`` (default: when ``settings.redis_url`` is set) publishes final and forming
    candles on the Redis channels ``market:{inst_id}`` for live charts. For replays
    (backtest/replay.py): ``trades_topic`` reads another topic than ``settings``' own trades
    topic; ``since_ms``/``until_ms`` keep only the trades with ``since_ms <= ts < until_ms``
    (the rest is dropped, not dead-lettered); ``outputs_to`` also hands every output to that sink.
    """
    options = CandleOptions.from_settings(settings)
    trades_topic = trades_topic or settings.topic(topics.TRADES)
    dlq_topic = settings.topic(topics.DLQ)
    flow = Dataflow("candles")

    source = KafkaBatchSource(settings.kafka_bootstrap, trades_topic, tail=tail)
    batches = op.input("trades_in", flow, source)
    decoded = op.map("decode", batches, lambda batch: decode(trades_topic, batch))
    if since_ms is not None or until_ms is not None:
        decoded = op.map("in_range", decoded, lambda d: within(d, since_ms, until_ms))
    keyed = op.flat_map("by_instrument", decoded, lambda d: list(d.by_instrument.items()))
    dead: Stream[KafkaItem] = op.flat_map(
        "dead_letters", decoded, lambda d: [(dlq_topic, None, encode(letter)) for letter in d.dead]
    )

    outputs = op.stateful("candles", keyed, lambda resume: CandleLogic(options, resume))
    outputs_only: Stream[Output] = op.map("drop_key", outputs, lambda kv: kv[1])
    if outputs_to is not None:
        op.output("outputs_out", outputs_only, outputs_to)

    to_kafka = op.map("to_kafka", outputs_only, lambda o: _kafka_item(settings, o))
    kafka_sink = KafkaProduceSink(
        settings.kafka_bootstrap, client_id="tcp-candles", while_waiting=source.check_topics
    )
    op.output("kafka_out", op.merge("kafka_items", to_kafka, dead), kafka_sink)
    if write_postgres:
        dsn = settings.postgres_dsn.get_secret_value()
        finals: Stream[list[Row]] = op.filter_map(
            "final_rows", outputs_only, lambda o: [candle_row(o[1])] if o[0] == "final" else None
        )
        op.output("candles_pg", finals, PostgresSink(dsn, CANDLES_UPSERT))
    redis_url = settings.redis_url.get_secret_value()
    if write_redis or (write_redis is None and redis_url):
        market = op.filter_map("market", outputs_only, market_message)
        op.output("market_redis", market, RedisSink(redis_url))
    return flow


def market_message(output: Output) -> list[RedisOp] | None:
    """A candle for live charts on ``market:{inst_id}``: ``{"kind": "final"|"live", "candle": {...}}``."""
    kind, item = output
    if kind == "late":
        return None
    assert isinstance(item, Candle)
    message = b'{"kind":"' + kind.encode() + b'","candle":' + encode_candle(item) + b"}"
    return [Publish(market_channel(item.inst_id), message)]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def __getattr__(name: str) -> Dataflow:
    """``dataflows.candles:flow`` for ``python -m bytewax.run``: built on first access, from TCP_*."""
    if name != "flow":
        raise AttributeError(name)
    from dataflows.entry import flow_from_env

    return flow_from_env(build_flow, ("kafka", "postgres", "redis"))
