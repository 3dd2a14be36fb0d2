"""Ingest: any TradeSource -> de-duplicate -> Kafka (trades, dead letters), with counts.

Every item a source yields ends as exactly one of: a trade on ``okx.trades``, a dead letter on
``okx.trades.dlq``, or a counted duplicate. Nothing is dropped without being counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from connectors.base import TradeSource
from connectors.dedupe import RecentTradeIds
from sinks.kafka import KafkaProducer
from tcp import topics
from tcp.config import Settings
from tcp.observe import DEAD_LETTERS, DUPLICATES, TRADES_IN
from tcp.schemas import DeadLetter, Trade, encode

__all__ = ["IngestStats", "run_ingest"]

log = logging.getLogger(__name__)


@dataclass
class IngestStats:
    trades: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    started: float = field(default_factory=time.monotonic)
    per_instrument: dict[str, int] = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def line(self) -> str:
        rate = self.trades / self.elapsed if self.elapsed > 0 else 0.0
        return (
            f"trades {self.trades:,}  ({rate:,.0f}/s)  duplicates {self.duplicates:,}  "
            f"dead letters {self.dead_letters:,}  instruments {len(self.per_instrument)}"
        )


@dataclass
class _Published:
    """What of the stats the Prometheus counters (tcp.observe) hold already; :meth:`publish`
    adds the rest (once a second: the loop above runs per trade)."""

    dlq_topic: str
    per_instrument: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    dead_letters: int = 0

    def publish(self, stats: IngestStats) -> None:
        for inst_id, n in stats.per_instrument.items():
            if n != self.per_instrument.get(inst_id, 0):
                TRADES_IN.labels(inst_id).inc(n - self.per_instrument.get(inst_id, 0))
                self.per_instrument[inst_id] = n
        DUPLICATES.inc(stats.duplicates - self.duplicates)
        DEAD_LETTERS.labels(self.dlq_topic).inc(stats.dead_letters - self.dead_letters)
        self.duplicates, self.dead_letters = stats.duplicates, stats.dead_letters


async def run_ingest(
    source: TradeSource,
    settings: Settings,
    *,
    producer: KafkaProducer | None = None,
    dedupe: RecentTradeIds | None = None,
    progress: Callable[[IngestStats], None] | None = None,
    progress_every_s: float = 1.0,
    stats: IngestStats | None = None,
) -> IngestStats:
    """Run ``source`` to its end (or until cancelled), producing into Kafka; flush before returning.

    Pass ``stats`` to keep the counts when the run is cancelled (Ctrl-C): they are final once
    this returns or raises, because the producer is flushed on the way out.
    """
    own_producer = producer is None
    producer = producer or KafkaProducer(settings.kafka_bootstrap, client_id=f"tcp-ingest-{source.name}")
    dedupe = dedupe or RecentTradeIds()
    trades_topic = settings.topic(topics.TRADES)
    dlq_topic = settings.topic(topics.DLQ)
    stats = stats if stats is not None else IngestStats()
    per_instrument = stats.per_instrument
    published = _Published(dlq_topic)
    next_progress = time.monotonic() + progress_every_s
    produce, is_new = producer.produce, dedupe.add  # bound once: this loop runs per trade
    try:
        async for batch in source.batches():
            for item in batch:
                if type(item) is Trade:
                    inst_id = item.inst_id
                    if is_new(inst_id, item.trade_id):
                        produce(trades_topic, encode(item), inst_id.encode())
                        per_instrument[inst_id] = per_instrument.get(inst_id, 0) + 1
                    else:
                        stats.duplicates += 1
                elif isinstance(item, DeadLetter):
                    produce(dlq_topic, encode(item))
                    stats.dead_letters += 1
                    log.debug("dead letter from %s: %s", item.where, item.reason)
            producer.poll(0)
            stats.trades = sum(per_instrument.values())
            if time.monotonic() >= next_progress:
                published.publish(stats)
                if progress is not None:
                    progress(stats)
                next_progress = time.monotonic() + progress_every_s
    finally:
        stats.trades = sum(per_instrument.values())
        published.publish(stats)
        remaining = producer.flush(60.0)
        if remaining:
            log.error("%d messages still undelivered after 60 s of flushing", remaining)
        if producer.stats.failed:
            log.error("%d messages could not be delivered to Kafka", producer.stats.failed)
        if progress is not None:
            progress(stats)
    if own_producer:
        del producer
    return stats
