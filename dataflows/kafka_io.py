"""Kafka in and out of Bytewax dataflows, a batch at a time, with nothing lost silently.

Input: :class:`KafkaBatchSource` works like Bytewax's ``KafkaSource`` (one input partition per
Kafka partition, the next offset as recovery state, the same ``tail`` semantics) but emits each
consumed batch as ONE item: a list of ``(value, partition, offset)``. Bytewax's per-item cost is paid once per
batch instead of once per message, and no ``KafkaSourceMessage`` is built per message: measured
in BENCHMARKS.md. It also refuses to skip data: when the saved offsets point past the end of a
partition (the topic was deleted and re-created, e.g. by a restart of the in-memory local
broker), it stops the dataflow with a clear error instead of jumping to the end.

Output: :class:`KafkaProduceSink` produces ``(topic, key, value)`` items through
:class:`sinks.kafka.KafkaProducer` (delivery reports, retries) and flushes at the end of every
batch Bytewax hands it, so a snapshot never covers a message that was not delivered.
"""

from __future__ import annotations

import logging
from typing import Any

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka import KafkaError as ConfluentKafkaError
from confluent_kafka.admin import AdminClient

from sinks.kafka import KafkaProducer

__all__ = ["KafkaBatchSource", "KafkaProduceSink", "RawMessage", "TopicResetError"]

log = logging.getLogger(__name__)

#: One consumed message: its value, partition and offset.
RawMessage = tuple[bytes, int, int]

_EOF = ConfluentKafkaError._PARTITION_EOF
_OFFSET_RESET = ConfluentKafkaError._AUTO_OFFSET_RESET


class TopicResetError(RuntimeError):
    """The saved offsets are past the end of the topic: data would be skipped, so we stop."""


class _BatchPartition(StatefulSourcePartition[list[RawMessage], int]):
    def __init__(self, config: dict[str, Any], topic: str, part: int, offset: int, batch_size: int) -> None:
        self._topic, self._part, self._offset, self._batch_size = topic, part, offset, batch_size
        # Never jump to the end silently when the saved offset is out of range: report it.
        config = {**config, "auto.offset.reset": "error"}
        self._consumer = Consumer(config)
        self._consumer.assign([TopicPartition(topic, part, offset)])
        self._eof = False

    def next_batch(self) -> list[list[RawMessage]]:
        if self._eof:
            raise StopIteration
        msgs = self._consumer.consume(self._batch_size, 0.01)
        batch: list[RawMessage] = []
        for msg in msgs:
            error = msg.error()
            if error is not None:
                if error.code() == _EOF:
                    self._eof = True
                    break
                if error.code() == _OFFSET_RESET or error.code() == ConfluentKafkaError.OFFSET_OUT_OF_RANGE:
                    text = (
                        f"{self._topic}[{self._part}]: the saved offset {self._offset} is out of range "
                        f"({error.str()}). The topic was reset under the dataflow (the local broker keeps "
                        "data in memory and loses it on restart). Nothing was skipped: start over with a "
                        "fresh recovery directory, or restore the topic."
                    )
                    raise TopicResetError(text)
                text = f"error consuming {self._topic}[{self._part}]: {error.str()}"
                raise RuntimeError(text)
            batch.append((msg.value() or b"", self._part, msg.offset() or 0))
        if not batch:
            return []
        self._offset = batch[-1][2] + 1
        return [batch]

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._consumer.close()


class KafkaBatchSource(FixedPartitionedSource[list[RawMessage], int]):
    """One topic as a Bytewax input: one list of ``(value, partition, offset)`` per consumed batch.

    ``tail=False`` ends the input at the end of every partition (replays, backfills, tests).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        tail: bool = True,
        batch_size: int = 10_000,
        add_config: dict[str, Any] | None = None,
    ) -> None:
        self._bootstrap, self._topic, self._tail, self._batch_size = bootstrap, topic, tail, batch_size
        self._config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": "BYTEWAX_IGNORED",  # offsets live in Bytewax's recovery state, not a group
            "enable.auto.commit": False,
            "enable.partition.eof": not tail,
            # librdkafka's default starves consumers on a local broker (4x slower).
            "fetch.queue.backoff.ms": 10,
            **(add_config or {}),
        }

    def list_parts(self) -> list[str]:
        metadata = AdminClient({"bootstrap.servers": self._bootstrap}).list_topics(self._topic, timeout=10)
        topic = metadata.topics.get(self._topic)
        if topic is None or topic.error is not None or not topic.partitions:
            text = f"Kafka topic {self._topic!r} does not exist on {self._bootstrap}: create it first (tcp services up)"
            raise RuntimeError(text)
        return [f"{part}-{self._topic}" for part in sorted(topic.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _BatchPartition:
        idx, topic = for_part.split("-", 1)
        offset = OFFSET_BEGINNING if resume_state is None else resume_state
        return _BatchPartition(dict(self._config), topic, int(idx), offset, self._batch_size)


class _ProducePartition(StatelessSinkPartition[tuple[str, bytes | None, bytes]]):
    def __init__(self, producer: KafkaProducer) -> None:
        self._producer = producer

    def write_batch(self, items: list[tuple[str, bytes | None, bytes]]) -> None:
        produce = self._producer.produce
        for topic, key, value in items:
            produce(topic, value, key)
        # Delivered before Bytewax may snapshot past these items: at-least-once, never lost.
        remaining = self._producer.flush(60.0)
        if remaining or self._producer.stats.failed:
            text = (
                f"Kafka sink: {remaining} message(s) undelivered after 60 s, "
                f"{self._producer.stats.failed} failed: stopping rather than losing output"
            )
            raise RuntimeError(text)

    def close(self) -> None:
        self._producer.flush(60.0)


class KafkaProduceSink(DynamicSink[tuple[str, bytes | None, bytes]]):
    """Produces ``(topic, key, value)`` items with delivery reports; one producer per worker."""

    def __init__(self, bootstrap: str, *, client_id: str) -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ProducePartition:
        return _ProducePartition(KafkaProducer(self._bootstrap, client_id=f"{self._client_id}-{worker_index}"))
