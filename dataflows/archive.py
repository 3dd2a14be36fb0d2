"""The trade archive: ``okx.trades`` -> PostgreSQL ``trades``, every trade once.

    python -m bytewax.run dataflows.archive:flow        (settings from TCP_* variables)
    tcp archive run [-w N] [-i I -a HOST:PORT,...]       (the same flow, recovery on)

A dataflow of its own, beside the candle dataflow rather than inside it: the archive is bound
by PostgreSQL's write rate (one row per trade), the candles by Python's CPU, so in one worker
each would slow the other; as two processes they use two cores and scale apart (BENCHMARKS.md).
The steps: Kafka in a batch at a time (dataflows.kafka_io), typed decoding and checking, rows
out through the idempotent PostgreSQL sink (a replayed trade does nothing: first write wins).
Values that are not trades are skipped and counted here; the candle dataflow dead-letters them,
so the DLQ holds each bad message once. State: only the Kafka offsets (recovery on in the CLI).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream

from dataflows.kafka_io import KafkaBatchSource, MessageBatch
from sinks.bytewax_pg import PostgresSink, Row
from sinks.postgres import Upsert
from tcp import topics
from tcp.config import Settings
from tcp.schemas import Trade, decode_trades

__all__ = ["TRADES_UPSERT", "TRADE_COLUMNS", "build_flow", "trade_rows"]  # and `flow`, lazily

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

TRADE_COLUMNS = (
    "inst_id", "trade_id", "ts", "px", "sz", "side", "count", "source", "seq_id", "origin", "received_at",
)  # fmt: skip
# A trade never changes: the first write wins, a replayed one does nothing.
TRADES_UPSERT = Upsert("trades", TRADE_COLUMNS, ("inst_id", "trade_id", "ts"), update=False)


def trade_rows(trades: list[Trade]) -> list[Row]:
    """The ``trades`` table rows of some trades (numerics as exact strings, times as timestamptz)."""
    epoch, ms = _EPOCH, _MS
    return [
        (t.inst_id, t.trade_id, epoch + t.ts * ms, t.px, t.sz, t.side, t.count, t.source, t.seq_id, t.origin,
         epoch + t.received_at * ms)
        for t in trades
    ]  # fmt: skip


def _rows(topic: str, batch: MessageBatch) -> list[Row] | None:
    trades, bad = decode_trades(batch.values)
    if bad:
        log.warning(
            "%s[%d]: skipped %d value(s) that are not trades (see the DLQ)", topic, batch.partition, len(bad)
        )
    return trade_rows(trades) or None


def build_flow(settings: Settings, *, tail: bool = True) -> Dataflow:
    """The archive dataflow over the services in ``settings`` (already ensured and migrated)."""
    trades_topic = settings.topic(topics.TRADES)
    flow = Dataflow("archive")
    batches = op.input("trades_in", flow, KafkaBatchSource(settings.kafka_bootstrap, trades_topic, tail=tail))
    rows: Stream[list[Row]] = op.filter_map("rows", batches, lambda batch: _rows(trades_topic, batch))
    op.output("trades_pg", rows, PostgresSink(settings.postgres_dsn.get_secret_value(), TRADES_UPSERT))
    return flow


def __getattr__(name: str) -> Dataflow:
    """``dataflows.archive:flow`` for ``python -m bytewax.run``: built on first access, from TCP_*."""
    if name != "flow":
        raise AttributeError(name)
    from dataflows.entry import flow_from_env

    return flow_from_env(build_flow)
