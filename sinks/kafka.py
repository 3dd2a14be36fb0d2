"""Producing to Kafka with delivery reports: no message is lost without a word.

Bytewax's own KafkaSink sets no delivery callback and can crash when the producer queue fills
(bytewax #522); everything in this project produces through :class:`KafkaProducer` instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

__all__ = ["DeliveryStats", "KafkaProducer", "ProducerFatalError"]

log = logging.getLogger(__name__)


class ProducerFatalError(RuntimeError):
    """The producer hit a fatal error (e.g. the idempotence guarantees broke) and must stop."""


@dataclass
class DeliveryStats:
    produced: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0  # gave up after every retry: also logged at ERROR level


class KafkaProducer:
    """An idempotent producer (``acks=all``) whose failed deliveries are logged and retried.

    ``produce`` never drops a message: when librdkafka's local queue is full it serves delivery
    reports until there is room again (backpressure), instead of raising or buffering without
    bound. A delivery that fails even after librdkafka's own retries is produced again, up to
    ``max_attempts`` times, then counted in ``stats.failed`` and logged.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str = "tcp",
        max_attempts: int = 5,
        config: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "none",
            "queue.buffering.max.messages": 200_000,
            "message.timeout.ms": 120_000,
            "error_cb": self._on_error,
            "on_delivery": self._on_delivery,
        }
        conf.update(config or {})
        self._producer = Producer(conf)
        self._max_attempts = max_attempts
        self._fatal: KafkaError | None = None
        self.stats = DeliveryStats()

    def produce(self, topic: str, value: bytes | None, key: bytes | None = None) -> None:
        """Produce ``value`` (None: a tombstone) under ``key``; waits for room when the queue is full."""
        self.stats.produced += 1
        try:
            self._producer.produce(topic, value, key)  # fast path: room in the local queue
        except BufferError:
            self._produce(topic, value, key, None)

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports and raise a fatal error; call it now and then (e.g. per batch)."""
        self._producer.poll(timeout)
        self._check_fatal()

    def flush(self, timeout: float = 30.0) -> int:
        """Wait until every message is delivered or failed; returns how many are still in flight."""
        remaining = self._producer.flush(timeout)
        self._check_fatal()
        return remaining

    def __len__(self) -> int:
        return len(self._producer)

    def _produce(self, topic: str, value: bytes | None, key: bytes | None, attempt: int | None) -> None:
        while True:
            try:
                if attempt is None:  # the default delivery callback from the config
                    self._producer.produce(topic, value, key)
                else:
                    callback = functools.partial(self._on_retry_delivery, attempt)
                    self._producer.produce(topic, value, key, on_delivery=callback)
                return
            except BufferError:
                # Local queue full: wait for deliveries to make room (backpressure).
                self._producer.poll(0.05)
                self._check_fatal()

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:  # the common case first: this runs once per message
            self.stats.delivered += 1
        else:
            self._settle(err, msg, 1)

    def _on_retry_delivery(self, attempt: int, err: KafkaError | None, msg: Message) -> None:
        self._settle(err, msg, attempt)

    def _settle(self, err: KafkaError | None, msg: Message, attempt: int) -> None:
        if err is None:
            self.stats.delivered += 1
            return
        if err.fatal():
            self._fatal = err
            return
        if attempt < self._max_attempts:
            self.stats.retried += 1
            log.warning(
                "delivery to %s failed (%s), attempt %d of %d: producing it again",
                msg.topic(),
                err.str(),
                attempt,
                self._max_attempts,
            )
            self._produce(msg.topic() or "", msg.value(), msg.key(), attempt + 1)
            return
        self.stats.failed += 1
        log.error(
            "delivery to %s failed %d times (%s): message key=%r lost to this producer",
            msg.topic(),
            attempt,
            err.str(),
            msg.key(),
        )

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
        else:
            log.warning("kafka producer: %s", err.str())

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            msg = f"Kafka producer fatal error: {self._fatal.str()}"
            raise ProducerFatalError(msg) from KafkaException(self._fatal)
