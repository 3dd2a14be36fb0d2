"""The platform's Kafka topics, created idempotently at start-up."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from tcp.config import Settings

__all__ = [
    "ALL_TOPICS",
    "BOTS_COMMANDS",
    "BOTS_EVENTS",
    "CANDLES",
    "CANDLES_LIVE",
    "DLQ",
    "LATE",
    "TRADES",
    "ensure_topics",
]

log = logging.getLogger(__name__)

TRADES = "okx.trades"  # key = inst_id, value = Trade JSON
DLQ = "okx.trades.dlq"  # value = DeadLetter JSON
LATE = "okx.trades.late"  # value = LateTrade JSON (the trade and the candle it belonged to)
CANDLES = "candles"  # key = inst_id|timeframe, value = Candle JSON (final candles only)
CANDLES_LIVE = "candles.live"  # key = inst_id|timeframe, value = Candle JSON (forming, throttled)
BOTS_COMMANDS = "bots.commands"  # key = bot name, value = Command JSON (bots/lifecycle.py)
BOTS_EVENTS = "bots.events"  # key = bot name, value = BotEvent JSON: what became of each command

ALL_TOPICS = (TRADES, DLQ, LATE, CANDLES, CANDLES_LIVE, BOTS_COMMANDS, BOTS_EVENTS)


def ensure_topics(settings: Settings, names: tuple[str, ...] = ALL_TOPICS, *, timeout: float = 15.0) -> None:
    """Create the named topics (with ``settings.topic_partitions``) unless they exist.

    Existing topics are left as they are; a topic with fewer partitions than configured is
    reported, not changed (adding partitions moves keys to other partitions).
    """
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    wanted = [settings.topic(name) for name in names]
    metadata = admin.list_topics(timeout=timeout)
    missing = [name for name in wanted if name not in metadata.topics]
    for name in wanted:
        existing = metadata.topics.get(name)
        if existing is not None and len(existing.partitions) < settings.topic_partitions:
            log.warning(
                "topic %s has %d partitions, fewer than the configured %d; left as it is",
                name,
                len(existing.partitions),
                settings.topic_partitions,
            )
    if not missing:
        return
    futures = admin.create_topics(
        [
            NewTopic(
                name, num_partitions=settings.topic_partitions, replication_factor=settings.topic_replication
            )
            for name in missing
        ],
        operation_timeout=timeout,
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            log.info("created topic %s (%d partitions)", name, settings.topic_partitions)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
