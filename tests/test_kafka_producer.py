"""sinks.kafka.KafkaProducer against a real broker: deliveries are counted, failures retried and reported."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sinks.kafka import KafkaProducer
from tcp import services
from tcp.config import Settings
from tcp.topics import TRADES
from tests.kafka_util import read_topic


def test_every_message_is_delivered_in_order_per_key(settings: Settings) -> None:
    producer = KafkaProducer(settings.kafka_bootstrap, config={"queue.buffering.max.messages": 1000})
    topic = settings.topic(TRADES)
    for i in range(5000):  # 5x the local queue: produce() must wait for room, not raise or drop
        producer.produce(topic, str(i).encode(), b"BTC-USDT")
    assert producer.flush(30) == 0
    assert producer.stats.produced == producer.stats.delivered == 5000
    assert producer.stats.failed == 0
    values = [int(m.value()) for m in read_topic(settings, TRADES, expect=5000)]
    assert values == list(range(5000))  # one key -> one partition -> order kept


def test_failed_deliveries_are_retried_then_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    own = services.ensure(Settings.load(home=tmp_path, kafka_bootstrap=""), ("kafka",))
    producer = KafkaProducer(
        own.kafka_bootstrap,
        max_attempts=2,
        config={"message.timeout.ms": 300, "enable.idempotence": False, "acks": "1"},
    )
    services.stop(own)  # the broker is gone: every delivery fails
    with caplog.at_level(logging.WARNING, logger="sinks.kafka"):
        for i in range(10):
            producer.produce("lost-topic", str(i).encode())
        remaining = producer.flush(20)
    assert remaining == 0
    assert producer.stats.delivered == 0
    assert producer.stats.retried == 10
    assert producer.stats.failed == 10
    assert sum("failed 2 times" in r.getMessage() for r in caplog.records) == 10
