"""Reading a topic back in tests (real broker, assign() from offset 0: no group join wait)."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, Message, TopicPartition

from tcp.config import Settings


def assigned_consumer(settings: Settings, name: str) -> Consumer:
    """A consumer of every partition of the (prefixed) topic ``name``, from offset 0; close it."""
    topic = settings.topic(name)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"reader-{time.time_ns()}",
            "enable.auto.commit": False,
            "fetch.queue.backoff.ms": 10,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    return consumer


def read_topic(
    settings: Settings, name: str, *, expect: int | None = None, idle_s: float = 1.5, timeout_s: float = 30.0
) -> list[Message]:
    """All messages of the (prefixed) topic ``name``: with ``expect``, until that many are read (or
    ``timeout_s`` passed); without, until none came for ``idle_s``."""
    consumer = assigned_consumer(settings, name)
    try:
        out: list[Message] = []
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.consume(10_000, 0.2)
            for msg in batch:
                if msg.error() is None:
                    out.append(msg)
            if batch:
                last = time.monotonic()
            if expect is not None:
                # Wait up to timeout_s for the expected count, then keep reading a moment: more
                # than expected is a failure the caller should see.
                if len(out) >= expect and time.monotonic() - last > 0.3:
                    break
            elif time.monotonic() - last > idle_s:
                break
        return out
    finally:
        consumer.close()
