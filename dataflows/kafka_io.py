"""Kafka in and out of Bytewax dataflows, a batch at a time, with nothing lost silently.

Input: :class:`KafkaBatchSource` works like Bytewax's ``KafkaSource`` (one input partition per
Kafka partition, the next offset as recovery state, the same ``tail`` semantics) but emits each
consumed batch as ONE item: a :class:`MessageBatch` (partition, values, offsets). Bytewax's per-item cost is paid once per
batch instead of once per message, and no ``KafkaSourceMessage`` is built per message: measured
in BENCHMARKS.md. It also refuses to skip data or wait for offsets that will never come: the
recovery state of a partition is its next offset AND the id of the topic it was read from
(Kafka topic ids, KIP-516: a topic deleted and re-created under the same name gets a new one).
On resume, a different id means the topic was reset under the dataflow (e.g. by a restart of
the in-memory local broker): it stops with :class:`TopicResetError` naming the topic and
partition. The id is what works on every broker: Tansu (the embedded broker) answers a fetch
past the end of a partition with no data and no error, so the consumer would wait forever (or,
once the new topic grows past the saved offset, silently skip its first messages); Apache Kafka
answers OFFSET_OUT_OF_RANGE, which ``auto.offset.reset=error`` turns into the same
:class:`TopicResetError` (it also covers messages deleted by retention before they were read).
While running, every partition (and a Kafka sink waiting for deliveries) checks the topic's id
every few seconds (:meth:`KafkaBatchSource.check_topic`): a broker restarted under a running
dataflow without its topics stops it with the same error, within seconds.

Output: :class:`KafkaProduceSink` produces ``(topic, key, value)`` items through
:class:`sinks.kafka.KafkaProducer` (delivery reports, retries) and flushes at the end of every
batch Bytewax hands it, so a snapshot never covers a message that was not delivered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicCollection, TopicPartition
from confluent_kafka import KafkaError as ConfluentKafkaError
from confluent_kafka.admin import AdminClient

from sinks.kafka import KafkaProducer
from tcp.observe import CONSUMER_LAG

__all__ = [
    "KafkaBatchSource",
    "KafkaProduceSink",
    "PartitionState",
    "MessageBatch",
    "TopicResetError",
    "topic_id",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MessageBatch:
    """What one poll of one partition returned: the values and their offsets, in order."""

    partition: int
    values: list[bytes]
    offsets: list[int]


#: What a partition snapshots: the next offset to read, and the id of the topic it was read
#: from (None: the broker reports no topic ids). Snapshots written before the id was kept hold
#: the offset alone (an ``int``); they are still read.
PartitionState = tuple[int, str | None]
_Resume = PartitionState | int

_IDLE_POLL = timedelta(milliseconds=2)
#: How often a partition reports its consumer lag (tcp.observe.CONSUMER_LAG).
_LAG_EVERY_S = 5.0
#: How long a running partition waits for the broker to describe its topic (check_topic).
_CHECK_TIMEOUT_S = 3.0
#: How long a Kafka sink waits for its batch to be delivered before it stops the dataflow, and
#: how often it looks at the source's topics meanwhile.
_DELIVERY_WAIT_S, _WAIT_SLICE_S = 60.0, 2.0
_EOF = ConfluentKafkaError._PARTITION_EOF
_OFFSET_RESET = ConfluentKafkaError._AUTO_OFFSET_RESET
_NO_TOPIC_IDS = (ConfluentKafkaError._UNSUPPORTED_FEATURE, ConfluentKafkaError.UNSUPPORTED_VERSION)
_FIX = (
    "Nothing was skipped: the dataflow stops rather than mix the old state with another topic's "
    "data. Start over with a fresh recovery directory (after re-ingesting the trades), or point "
    "the dataflow back at the original topic."
)


class TopicResetError(RuntimeError):
    """The saved offsets belong to another incarnation of the topic: data would be skipped, so we stop."""


def topic_id(admin: AdminClient, topic: str, *, timeout: float = 10.0) -> str | None:
    """The broker's id of ``topic`` (base64, as Kafka prints it), or None if it reports none.

    Brokers before Kafka 2.8 have no topic ids (they answer with the zero id or not at all).
    Keep ``admin`` for the life of the process: a client dropped right after the answer
    logs "Purging 1 unserved events from background queue".
    """
    try:
        description = admin.describe_topics(TopicCollection([topic]), request_timeout=timeout)[topic].result()
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if isinstance(error, ConfluentKafkaError) and error.code() in _NO_TOPIC_IDS:
            return None
        raise
    uuid = description.topic_id
    if uuid is None or (uuid.get_most_significant_bits() == 0 and uuid.get_least_significant_bits() == 0):
        return None
    return str(uuid)


class _BatchPartition(StatefulSourcePartition[MessageBatch, _Resume]):
    def __init__(
        self,
        config: dict[str, Any],
        topic: str,
        part: int,
        offset: int,
        batch_size: int,
        topic_id: str | None,
        check_topic: Callable[[], None],
    ) -> None:
        self._topic, self._part, self._offset, self._batch_size = topic, part, offset, batch_size
        self._topic_id = topic_id
        self._check_topic = check_topic
        # Never jump to the end silently when the saved offset is out of range: report it.
        config = {**config, "auto.offset.reset": "error"}
        self._consumer = Consumer(config)
        self._consumer.assign([TopicPartition(topic, part, offset)])
        self._eof = False
        self._awake: datetime | None = None
        self._lag = CONSUMER_LAG.labels(topic, str(part))
        self._lag_due = 0.0

    def next_batch(self) -> list[MessageBatch]:
        if self._eof:
            raise StopIteration
        # Never block here: one worker polls every partition in turn, and a blocking wait on an
        # idle partition delays the others (it cost ~50 ms of p50 latency at live rates).
        msgs = self._consumer.consume(self._batch_size, 0)
        self._awake = None
        if not msgs:
            self._awake = datetime.now(tz=UTC) + _IDLE_POLL  # nothing now: look again shortly
            if time.monotonic() >= self._lag_due:
                self._every_few_seconds()
            return []
        failed = [msg for msg in msgs if msg.error() is not None]
        if failed:
            msgs = msgs[: msgs.index(failed[0])]
            self._failed(failed[0].error())  # type: ignore[arg-type]  # not None: filtered above
            if not msgs:
                return []
        # Values and offsets as two lists (C-level loops), not a tuple per message.
        values = [msg.value() or b"" for msg in msgs]
        offsets: list[int] = [msg.offset() for msg in msgs]  # type: ignore[misc]  # never None here
        batch = MessageBatch(self._part, values, offsets)
        self._offset = batch.offsets[-1] + 1
        if time.monotonic() >= self._lag_due:
            self._every_few_seconds()
        return [batch]

    def _every_few_seconds(self) -> None:
        """Check the topic is still the one this partition started on
        (:meth:`KafkaBatchSource.check_topic`), then report the lag."""
        self._lag_due = time.monotonic() + _LAG_EVERY_S
        self._check_topic()
        self._report_lag()

    def _report_lag(self) -> None:
        """``tcp_consumer_lag``: the partition's end (as of the last fetch: librdkafka's cached high
        watermark, no broker round trip) minus the next offset to read."""
        _low, high = self._consumer.get_watermark_offsets(
            TopicPartition(self._topic, self._part), cached=True
        )
        if high >= 0:
            self._lag.set(max(0, high - self._offset))

    def _failed(self, error: ConfluentKafkaError) -> None:
        """End of the partition (finite input), or an error that stops the dataflow."""
        if error.code() == _EOF:
            self._eof = True
            return
        if error.code() == _OFFSET_RESET or error.code() == ConfluentKafkaError.OFFSET_OUT_OF_RANGE:
            text = (
                f"{self._topic}[{self._part}]: the saved offset {self._offset} is out of range "
                f"({error.str()}): the topic was reset under the dataflow (deleted and re-created), "
                f"or retention deleted messages before they were read. {_FIX}"
            )
            raise TopicResetError(text)
        text = f"error consuming {self._topic}[{self._part}]: {error.str()}"
        raise RuntimeError(text)

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> PartitionState:
        return (self._offset, self._topic_id)

    def close(self) -> None:
        self._consumer.close()


class KafkaBatchSource(FixedPartitionedSource[MessageBatch, _Resume]):
    """One topic as a Bytewax input: one :class:`MessageBatch` per consumed batch.

    ``tail=False`` ends the input at the end of every partition (replays, backfills, tests).
    On resume, raises :class:`TopicResetError` if the topic is not the one the snapshot read.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        tail: bool = True,
        batch_size: int = 2_000,
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
            # librdkafka prefetches up to 64 MB per consumer by default, and there is one consumer
            # per partition: cap the read-ahead (peak RSS, see BENCHMARKS.md).
            "queued.max.messages.kbytes": 1024,
            "queued.min.messages": 1000,
            **(add_config or {}),
        }
        # One admin client for the life of the source, made on first use (the workers of a
        # process share the source: hence the lock); topic ids looked up once per process.
        self._lock = threading.Lock()
        self._admin_client: AdminClient | None = None
        self._topic_ids: dict[str, str | None] = {}
        self._checked: dict[str, float] = {}  # topic -> when it was last checked (monotonic)
        self._unreachable_logged = False

    def _admin(self) -> AdminClient:
        with self._lock:
            if self._admin_client is None:
                self._admin_client = AdminClient({"bootstrap.servers": self._bootstrap})
            return self._admin_client

    def _topic_id(self, topic: str) -> str | None:
        admin = self._admin()
        with self._lock:
            if topic not in self._topic_ids:
                self._topic_ids[topic] = topic_id(admin, topic)
            return self._topic_ids[topic]

    def check_topic(self, topic: str) -> None:
        """While running: raise :class:`TopicResetError` if ``topic`` was deleted, or deleted and
        re-created (a new topic id), since the dataflow started reading it.

        On the embedded broker a restart loses every topic (it keeps them in memory); a consumer
        at offset N of the new, empty topic would wait forever without a word, and once the
        new topic grows past N it would silently skip its first N messages. Asked every
        ``_LAG_EVERY_S`` by each partition, at most once per period per process; a broker that
        does not answer (down, restarting) is not an error here: the check runs again later.
        """
        started = self._topic_ids.get(topic)
        now = time.monotonic()
        with self._lock:
            if started is None or now - self._checked.get(topic, 0.0) < _LAG_EVERY_S:
                return
            self._checked[topic] = now
        try:
            current = topic_id(self._admin(), topic, timeout=_CHECK_TIMEOUT_S)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if (
                isinstance(error, ConfluentKafkaError)
                and error.code() == ConfluentKafkaError.UNKNOWN_TOPIC_OR_PART
            ):
                text = (
                    f"{topic}: the topic was reset under the running dataflow: it no longer exists on "
                    f"{self._bootstrap} (deleted, or the embedded broker restarted: it keeps topics in "
                    f"memory, so what it held is lost). {_FIX}"
                )
                raise TopicResetError(text) from None
            if not self._unreachable_logged:
                self._unreachable_logged = True
                log.warning(
                    "%s: cannot check the topic on %s (%s); will check again", topic, self._bootstrap, exc
                )
            return
        self._unreachable_logged = False
        if current is not None and current != started:
            text = (
                f"{topic}: the topic was reset under the running dataflow: it was deleted and re-created "
                f"on {self._bootstrap} (topic id {started} -> {current}; e.g. the embedded broker "
                f"restarted: it keeps topics in memory, so what it held is lost). {_FIX}"
            )
            raise TopicResetError(text)

    def check_topics(self) -> None:
        """:meth:`check_topic` for every topic this process reads."""
        for topic in list(self._topic_ids):
            self.check_topic(topic)

    def list_parts(self) -> list[str]:
        metadata = self._admin().list_topics(self._topic, timeout=10)
        topic = metadata.topics.get(self._topic)
        if topic is None or topic.error is not None or not topic.partitions:
            text = f"Kafka topic {self._topic!r} does not exist on {self._bootstrap}: create it first (tcp services up)"
            raise RuntimeError(text)
        return [f"{part}-{self._topic}" for part in sorted(topic.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: _Resume | None) -> _BatchPartition:
        idx, topic = for_part.split("-", 1)
        current = self._topic_id(topic)
        if resume_state is None:
            offset, saved = OFFSET_BEGINNING, None
        elif isinstance(resume_state, int):  # a snapshot from before topic ids were kept
            offset, saved = resume_state, None
        else:
            offset, saved = resume_state
        # A partition the snapshot had read nothing from (OFFSET_BEGINNING) skips nothing.
        if offset >= 0 and saved is not None and current is not None and saved != current:
            text = (
                f"{topic}[{idx}]: the topic was reset under the dataflow: the recovery snapshot read it up to "
                f"offset {offset} when its topic id was {saved}, but the topic named {topic!r} on "
                f"{self._bootstrap} now has id {current} (it was deleted and re-created, e.g. the embedded "
                f"broker restarted: it keeps topics in memory). {_FIX}"
            )
            raise TopicResetError(text)
        if offset >= 0 and saved is not None and current is None:
            log.warning(
                "%s[%s]: the broker reports no topic id: cannot check the topic was not reset", topic, idx
            )
        # Where each partition starts (a resume shows its offset); also the moment the input
        # starts, after start-up and the cluster's connection (bench/scaling_bench.py times from it).
        log.info(
            "%s[%s]: reading from %s", topic, idx, f"offset {offset}" if offset >= 0 else "the beginning"
        )
        return _BatchPartition(dict(self._config), topic, int(idx), offset, self._batch_size, current,
                               lambda: self.check_topic(topic))  # fmt: skip


class _ProducePartition(StatelessSinkPartition[tuple[str, bytes | None, bytes]]):
    def __init__(self, producer: KafkaProducer, while_waiting: Callable[[], None]) -> None:
        self._producer = producer
        self._while_waiting = while_waiting

    def write_batch(self, items: list[tuple[str, bytes | None, bytes]]) -> None:
        produce = self._producer.produce
        for topic, key, value in items:
            produce(topic, value, key)
        # Delivered before Bytewax may snapshot past these items: at-least-once, never lost.
        deadline = time.monotonic() + _DELIVERY_WAIT_S
        remaining = self._producer.flush(_WAIT_SLICE_S)
        while remaining and time.monotonic() < deadline:
            self._while_waiting()  # e.g. raise TopicResetError: the broker lost its topics
            remaining = self._producer.flush(min(_WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))
        if remaining or self._producer.stats.failed:
            text = (
                f"Kafka sink: {remaining} message(s) undelivered after {_DELIVERY_WAIT_S:.0f} s, "
                f"{self._producer.stats.failed} failed: stopping rather than losing output"
            )
            raise RuntimeError(text)

    def close(self) -> None:
        # Every batch was delivered in write_batch; after a failure, do not hold the exit up.
        self._producer.flush(_WAIT_SLICE_S)


class KafkaProduceSink(DynamicSink[tuple[str, bytes | None, bytes]]):
    """Produces ``(topic, key, value)`` items with delivery reports; one producer per worker.

    Each batch is flushed before the next one (nothing undelivered is ever covered by a
    snapshot); after 60 s without delivery the dataflow stops. ``while_waiting`` is called
    every few seconds while a flush waits: the dataflows pass their source's
    :meth:`KafkaBatchSource.check_topics`, so a broker that restarted without its topics is
    reported as that, at once, rather than as undelivered messages a minute later.
    """

    def __init__(
        self, bootstrap: str, *, client_id: str, while_waiting: Callable[[], None] = lambda: None
    ) -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._while_waiting = while_waiting

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ProducePartition:
        producer = KafkaProducer(self._bootstrap, client_id=f"{self._client_id}-{worker_index}")
        return _ProducePartition(producer, self._while_waiting)
