"""Fault drills (the deploy issue, section 4): small in the test suite, full size under
``make drill`` (tests/drill_util.py), each recording its figures for BENCHMARKS.md.

2. 1,000,000 malformed or hostile messages (small: 5,000) in okx.trades, among valid trades:
   `tcp candles run --exit-at-end` does not crash, the DLQ holds exactly one dead letter per
   malformed message (matched by the bytes kept in the letter), each with a reason, and the
   valid trades make exactly the candles of the batch build; `tcp archive run` archives the
   valid trades and nothing else.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from pydantic import SecretStr

from dataflows.build import build_candles
from tcp import services
from tcp.config import Settings
from tcp.schemas import DeadLetter, Trade, decode_dead_letter
from tcp.topics import DLQ, TRADES, ensure_topics
from tests.drill_util import record, size
from tests.env_util import tcp_env
from tests.fuzz_util import FuzzMessage, fuzz_messages
from tests.kafka_util import assigned_consumer
from tests.test_candles_recovery import (
    CANDLES_QUERY,
    TRADES_QUERY,
    _candle_tuple,
    _first_difference,
    _rows,
    _run,
    _trade_tuple,
)

pytestmark = [pytest.mark.services, pytest.mark.drill]

FUZZ_SEED = 20240612


# --------------------------------------------------------------------------------------------
# 2. Malformed or hostile messages


def _digest(raw: bytes) -> int:
    """A message's identity in the comparison: 64 bits of its SHA-256."""
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")


def _letter_digest(letter: DeadLetter) -> int:
    """The digest of the whole value a dead letter stands for (a cut one carries its SHA-256)."""
    if letter.raw_sha256 is not None:
        return int(letter.raw_sha256[:16], 16)
    return _digest(letter.raw_bytes())


def _multiset_difference(expected: list[int], got: list[int]) -> tuple[int, int]:
    """(missing, extra): how many of ``expected`` have no match in ``got``, and the reverse."""
    expected, got = sorted(expected), sorted(got)
    i = j = matched = 0
    while i < len(expected) and j < len(got):
        if expected[i] == got[j]:
            matched, i, j = matched + 1, i + 1, j + 1
        elif expected[i] < got[j]:
            i += 1
        else:
            j += 1
    return len(expected) - matched, len(got) - matched


def _reason_kind(reason: str) -> str:
    """A reason without its values: "px: '-1' is not ..." and "px: '0' is not ..." are one kind."""
    return re.sub(r"'[^']*('|$)|\"[^\"]*(\"|$)|`[^`]*(`|$)|-?\d+", "_", reason)[:100]


def _produce_fuzz(
    settings: Settings, messages: Iterable[FuzzMessage]
) -> tuple[list[int], list[Trade], Counter[str]]:
    """Produce pre-encoded messages to okx.trades with delivery reports; returns the digests of
    the malformed values, the valid trades and how many messages of each kind were sent."""
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 500_000,
            "message.max.bytes": 2 * 1024 * 1024,  # the 1 MB values
        }
    )
    failed: list[Any] = []

    def report(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(err)

    topic = settings.topic(TRADES)
    digests: list[int] = []
    valid: list[Trade] = []
    kinds: Counter[str] = Counter()
    for i, msg in enumerate(messages):
        kinds[msg.kind] += 1
        if msg.trade is None:
            digests.append(_digest(msg.value or b""))
        else:
            valid.append(msg.trade)
        while True:
            try:
                producer.produce(topic, msg.value, msg.key, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 5_000 == 0:
            producer.poll(0)
    remaining = producer.flush(300)
    assert remaining == 0 and not failed, f"{remaining} undelivered, {len(failed)} failed: {failed[:3]}"
    return digests, valid, kinds


def _topic_values(settings: Settings, name: str, *, expect: int, timeout_s: float) -> Iterator[bytes]:
    """The values of a topic, read in big batches (nothing kept): until ``expect`` were read and
    none came for a second, or none came for 10 s, or ``timeout_s`` passed."""
    consumer = assigned_consumer(settings, name)
    try:
        read, deadline, last = 0, time.monotonic() + timeout_s, time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.consume(10_000, 0.5)
            for msg in batch:
                if msg.error() is None:
                    read += 1
                    yield msg.value() or b""
            now = time.monotonic()
            last = now if batch else last
            if now - last > (1.0 if read >= expect else 10.0):
                return
    finally:
        consumer.close()


@pytest.mark.timeout(size(300, 3600))
def test_malformed_or_hostile_messages_each_make_one_dead_letter(
    services_settings: Settings, database: str, tmp_path: Path
) -> None:
    malformed, valid_count = size(5_000, 1_000_000), size(500, 50_000)
    home = tmp_path / "broker"
    # A private embedded broker: a million messages and their dead letters leave with it.
    base = Settings.load(
        home=home,
        kafka_bootstrap="",
        postgres_dsn=SecretStr(database),
        redis_url=services_settings.redis_url,
        topic_prefix="fuzz.",
        candle_lateness_ms=3_600_000,  # the valid trades come in order: none may turn late
    )
    kafka = services.ensure(base, ("kafka",))
    try:
        ensure_topics(kafka)
        started = time.monotonic()
        expected, valid, kinds = _produce_fuzz(kafka, fuzz_messages(FUZZ_SEED, malformed, valid_count))
        produced_s = time.monotonic() - started
        assert len(expected) == malformed and len(valid) == valid_count
        env = tcp_env(kafka, TCP_HOME=str(home), TCP_LOG_LEVEL="WARNING")

        started = time.monotonic()
        code, output = _run(
            env, tmp_path / "candles.log", "--exit-at-end", "--no-recovery", timeout=size(120, 3000)
        )
        took = time.monotonic() - started
        assert code == 0, output  # no crash
        code, output = _run(
            env, tmp_path / "archive.log", "--exit-at-end", "--no-recovery", timeout=size(120, 3000),
            flow="archive",
        )  # fmt: skip
        assert code == 0, output

        got: list[int] = []
        reasons: Counter[str] = Counter()
        no_reason = 0
        for value in _topic_values(kafka, DLQ, expect=malformed, timeout_s=size(60, 600)):
            letter = decode_dead_letter(value)
            got.append(_letter_digest(letter))
            reasons[_reason_kind(letter.reason)] += 1
            no_reason += not letter.reason.strip()
        lost, duplicated = _multiset_difference(expected, got)
        del expected, got

        candles = _rows(database, CANDLES_QUERY)
        reference = sorted(_candle_tuple(c) for c in build_candles(valid, kafka.timeframes))
        trades = _rows(database, TRADES_QUERY)
        candles_ok = candles == reference and trades == sorted(map(_trade_tuple, valid))
        detail = (
            f"exit 0; {len(kinds) - 1} kinds of bad value, {sum(reasons.values()):,} dead letters with "
            f"{len(reasons)} kinds of reason; {valid_count:,} valid trades mixed in -> "
            f"{'the same' if candles_ok else 'DIFFERENT'} {len(candles):,} candles as the batch build, "
            f"archived once; candle dataflow {took:.0f} s ({(malformed + valid_count) / took:,.0f} msg/s)"
        )
        print(f"{detail}\nproduced in {produced_s:.1f} s; kinds {dict(kinds)}")
        print("\n".join(f"{n:>9,}  {kind}" for kind, n in reasons.most_common()))
        record("1,000,000 malformed or hostile messages", runs=malformed, compared=malformed, lost=lost,
               duplicated=duplicated, detail=detail)  # fmt: skip

        assert (lost, duplicated, no_reason) == (0, 0, 0)
        assert candles == reference, _first_difference(candles, reference)
        assert trades == sorted(map(_trade_tuple, valid))
        assert len(reasons) >= 20  # the values reached many of the decoder's rules
    finally:
        services.stop(base, ("kafka",))
