"""Fault drills (the deploy issue, section 4): small in the test suite, full size under
``make drill`` (tests/drill_util.py), each recording its figures for BENCHMARKS.md.

1. PostgreSQL stopped for 30 s mid-run (small: 5 s): the candle and archive dataflows, running
   as `tcp candles run` / `tcp archive run` against a PRIVATE embedded PostgreSQL while trades
   stream in, hold their rows and retry while it is down, resume on their own when it is back
   (on the same port: the dataflows keep their DSN), and PostgreSQL ends with exactly the
   candles and trades of the batch build over the same trades.
2. 1,000,000 malformed or hostile messages (small: 5,000) in okx.trades, among valid trades:
   `tcp candles run --exit-at-end` does not crash, the DLQ holds exactly one dead letter per
   malformed message (matched by the bytes kept in the letter), each with a reason, and the
   valid trades make exactly the candles of the batch build; `tcp archive run` archives the
   valid trades and nothing else.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from dataflows.build import build_candles
from sinks.kafka import KafkaProducer
from sinks.migrate import apply_migrations
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
    SPEED,
    TRADES_QUERY,
    _candle_tuple,
    _env,
    _first_difference,
    _price,
    _rows,
    _Run,
    _run,
    _size,
    _stream,
    _trade_tuple,
)

pytestmark = [pytest.mark.services, pytest.mark.drill]

OUTAGE_SEED = 20240613
FUZZ_SEED = 20240612
#: The outage drill's lateness (event time): the dataflows stall while PostgreSQL is down, and a
#: stall advances the watermark by its wall-clock length; trades arrive at most 3 s out of order.
OUTAGE_LATENESS_MS = 180_000
_RETRY = re.compile(r"PostgreSQL write to (\w+) failed .*\((\d+) rows held\)")


# --------------------------------------------------------------------------------------------
# 1. PostgreSQL stopped mid-run


def _outage_trades(rng: random.Random, t0: int, span_ms: int) -> list[tuple[int, Trade]]:
    """(event offset from t0 at which to send it, trade), in sending order: four instruments
    trading all along, 30 % of the trades up to 3 s out of order, 1 % sent twice."""
    rates = {"BTC-USDT": 1.4, "ETH-USDT": 1.0, "SOL-USDT": 0.7, "DOGE-USDT": 0.5}  # per event second
    events = sorted(
        (int(at), inst) for inst, rate in rates.items() for at in _poisson(rng, rate / 1000, span_ms)
    )
    ticks = dict.fromkeys(rates, 35_000)
    out: list[tuple[int, Trade]] = []
    for i, (at, inst) in enumerate(events):
        ticks[inst] = max(1, ticks[inst] + rng.randint(-3, 3))
        ts = t0 + at - (rng.randint(1, 3_000) if rng.random() < 0.3 else 0)
        trade = Trade(inst_id=inst, trade_id=1_000_000 + i, px=_price(inst, ticks[inst]),
                      sz=_size(rng.randint(1, 5 * 10**8)), side=rng.choice(("buy", "sell")), ts=ts,
                      origin="sim", received_at=ts + 7, seq_id=i)  # fmt: skip
        out.extend([(at, trade)] * (2 if rng.random() < 0.01 else 1))
    return out


def _poisson(rng: random.Random, rate_per_ms: float, span_ms: int) -> Iterator[float]:
    at = rng.expovariate(rate_per_ms)
    while at < span_ms:
        yield at
        at += rng.expovariate(rate_per_ms)


def _count(dsn: str, table: str) -> int:
    ((n,),) = _rows(dsn, f"SELECT count(*) FROM {table}")  # noqa: S608  # our own table names
    return int(n)


def _wait_for(check: Callable[[], object], timeout_s: float, what: str) -> None:
    """Until ``check()`` is true; fails after ``timeout_s``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


def _held(logs: Sequence[Path]) -> tuple[int, dict[str, int]]:
    """The sinks' retry warnings in the logs: how many, and the most rows held per table."""
    retries, held = 0, {}
    for log in logs:
        for table, rows in _RETRY.findall(log.read_text(errors="replace")):
            retries += 1
            held[table] = max(held.get(table, 0), int(rows))
    return retries, held


def _differences(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]], key: int) -> tuple[int, int]:
    """(lost, extra) rows, matched on their first ``key`` columns: a row that differs is lost."""
    got_by = {row[:key]: row for row in got}
    want_by = {row[:key]: row for row in want}
    lost = sum(got_by.get(k) != row for k, row in want_by.items())
    return lost, len(got_by.keys() - want_by.keys()) + len(got) - len(got_by)


@dataclass(frozen=True)
class _Outage:
    down_s: float  # from the stop until the server answered again
    sent_while_down: int  # trades produced meanwhile (they wait in Kafka)
    first_write_s: float  # the first candle written this long after the server was back


def _stop_for(
    pg_base: Settings, dsn: str, outage_s: float, runs: Sequence[_Run], sent_at: list[float]
) -> _Outage:
    """Stop the PostgreSQL of ``pg_base`` for ``outage_s``, checking that the dataflows stay up,
    start it again (same address) and wait until they write again. ``sent_at``: when each trade
    is produced (monotonic)."""
    stopped = time.monotonic()
    assert services.stop(pg_base, ("postgres",)) == ["postgres"]
    while time.monotonic() - stopped < outage_s:
        for run in runs:  # the sinks hold back and retry: nothing stops
            assert run.proc.poll() is None, f"a dataflow stopped while PostgreSQL was down:\n{run.output()}"
        time.sleep(0.2)
    back = services.ensure(pg_base, ("postgres",)).postgres_dsn.get_secret_value()
    answered = time.monotonic()
    assert back == dsn, "PostgreSQL came back at another address: the dataflows' DSN is stale"
    written = "SELECT extract(epoch FROM min(written_at) - pg_postmaster_start_time()) FROM candles "
    written += "WHERE written_at >= pg_postmaster_start_time()"
    _wait_for(lambda: _rows(dsn, written)[0][0] is not None, 60, "a candle written after the restart")
    archived = _count(dsn, "trades")
    _wait_for(lambda: _count(dsn, "trades") > archived, 60, "the archive to write again")
    sent = sum(stopped <= at < answered for at in sent_at)
    return _Outage(answered - stopped, sent, float(_rows(dsn, written)[0][0]))


@pytest.mark.timeout(size(300, 900))
def test_postgresql_stopped_mid_run_loses_and_duplicates_nothing(settings: Settings, tmp_path: Path) -> None:
    outage_s = size(5, 30)
    stream_s = outage_s + 15  # trades keep coming before, during and after the outage
    t0 = int(time.time() // 3600 * 3600 * 1000) - 10 * 60_000  # crosses an hour boundary
    trades = _outage_trades(random.Random(OUTAGE_SEED), t0, stream_s * SPEED * 1000)
    # A private embedded PostgreSQL (postgres_dsn="": never the configured one), stopped at will.
    pg_base = Settings.load(home=tmp_path / "pg", postgres_dsn=SecretStr(""))
    dsn = services.ensure(pg_base, ("postgres",)).postgres_dsn.get_secret_value()
    runs: list[_Run] = []
    try:
        apply_migrations(dsn)
        env = _env(settings, tmp_path / "home", dsn, tmp_path / "recovery")
        env["TCP_CANDLE_LATENESS_MS"] = str(OUTAGE_LATENESS_MS)
        done, errors = threading.Event(), list[str]()
        producer = threading.Thread(target=_stream, args=(settings, trades, done, errors), daemon=True)
        runs = [_Run(env, tmp_path / "candles.log"), _Run(env, tmp_path / "archive.log", flow="archive")]
        producer.start()
        sent_at = [time.monotonic() + at / SPEED / 1000 for at, _ in trades]
        _wait_for(lambda: _count(dsn, "trades") and _count(dsn, "candles"), 60, "the first rows")
        outage = _stop_for(pg_base, dsn, outage_s, runs, sent_at)
        assert not done.is_set(), "all trades were sent before PostgreSQL came back: the drill lost its point"
        producer.join(stream_s + 30)
        assert not errors, errors
        time.sleep(2)  # let them catch up, then stop them as an operator would
        for run in runs:
            assert run.proc.poll() is None, f"a dataflow stopped:\n{run.output()}"
            run.kill()
        retries, held = _held([run.log for run in runs])
        # The last runs resume from the recovery store, drain the topic and close every window.
        runs = [_Run(env, tmp_path / "final.log", "--exit-at-end"),
                _Run(env, tmp_path / "archive-final.log", "--exit-at-end", flow="archive")]  # fmt: skip
        for run in runs:
            assert run.wait(120) == 0, run.output()
        got_trades, got_candles = _rows(dsn, TRADES_QUERY), _rows(dsn, CANDLES_QUERY)
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.kill()
        services.stop(pg_base)

    distinct = {(t.inst_id, t.trade_id): t for _, t in trades}
    want_trades = sorted(map(_trade_tuple, distinct.values()))
    want_candles = sorted(_candle_tuple(c) for c in build_candles(distinct.values(), settings.timeframes))
    lost_t, extra_t = _differences(got_trades, want_trades, 2)
    lost_c, extra_c = _differences(got_candles, want_candles, 3)
    detail = (
        f"down {outage.down_s:.0f} s, back on the same port, while {len(trades):,} trades streamed in {stream_s} s "
        f"({outage.sent_while_down:,} during the outage: they waited in Kafka); both dataflows stayed up, "
        f"their sinks holding their batch (up to {held.get('candles', 0):,} candle and {held.get('trades', 0):,} "
        f"trade rows) through {retries} retries; first candle written {outage.first_write_s:.1f} s after the "
        f"restart; {len(want_candles):,} candles and {len(want_trades):,} trades as the batch build and the input"
    )
    print(detail)
    record("PostgreSQL stopped for 30 s mid-run", runs=1, compared=len(want_candles) + len(want_trades),
           lost=lost_c + lost_t, duplicated=extra_c + extra_t, detail=detail)  # fmt: skip
    assert got_trades == want_trades, _first_difference(got_trades, want_trades)
    assert got_candles == want_candles, _first_difference(got_candles, want_candles)
    assert held.get("candles") and held.get("trades"), "the sinks held nothing: the outage hit no write"


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
    producer = KafkaProducer(
        settings.kafka_bootstrap,
        client_id="fuzz",
        config={
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 500_000,
            "message.max.bytes": 2 * 1024 * 1024,
        },  # fmt: skip  # the 1 MB values
    )
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
        producer.produce(topic, msg.value, msg.key)
        if i % 5_000 == 0:
            producer.poll(0)
    remaining = producer.flush(300)
    assert remaining == 0 and producer.stats.failed == 0, f"{remaining} undelivered, stats {producer.stats}"
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
