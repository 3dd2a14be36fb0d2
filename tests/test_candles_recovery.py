"""Crash recovery of the candle dataflow, end to end: `tcp candles run` as a user runs it.

1. SIGKILL at random points while trades stream in, restart, and PostgreSQL ends identical
   (candles, revisions included, and trades) to an uninterrupted run over the same topic.
2. A topic reset under the dataflow (the embedded broker keeps topics in memory: a restart
   loses them) makes the resumed dataflow stop with an error naming the topic and partition,
   instead of waiting forever or skipping the new topic's first messages.
3. The time the dataflow lies dead does not count as idle time for the watermark: otherwise,
   at real-time speed, a restart longer than the lateness would finalise windows before the
   trades waiting in Kafka are read, and they would revise them.

How the data of (1) keeps the comparison exact: the watermark advances with event time and
also with wall-clock time while an instrument is idle (docs/candles.md, rule 7), so a run's
pauses (start-up, the time it lies dead after a SIGKILL) move it too. Trades are therefore
streamed with event time running SPEED times faster than the wall clock and a lateness of
60 s of event time: a pause of a few seconds is far too short to make a trade late or to
finalise a window early, so both runs see the same late trades. The late trades are made on
purpose (4 minutes behind, sent while the watermark is ~30 s away from any candle boundary), so
both runs revise the same candles the same number of times.
"""

from __future__ import annotations

import gc
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr

from dataflows.build import build_candles
from dataflows.candle_core import decode_candle
from dataflows.kafka_io import KafkaBatchSource, TopicResetError
from sinks.kafka import KafkaProducer
from tcp import services
from tcp.config import DEFAULT_TIMEFRAMES, Settings
from tcp.schemas import Trade, encode
from tcp.topics import TRADES, ensure_topics
from tests.drill_util import record, size
from tests.env_util import tcp_env
from tests.kafka_util import read_topic

pytestmark = pytest.mark.services

SEED = 20240611
SPEED = 80  # event time runs this many times faster than the wall clock
EVENT_SPAN_MS = size(20, 100) * 60_000  # 20 minutes of trades, streamed in 15 s (make drill: 100, 75 s)
LATENESS_MS = 60_000
LATE_BY_MS = 240_000
MIN_KILLS = size(4, 20)  # make drill: at least 20 SIGKILLs of each dataflow while trades stream in
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# Helpers


def _env(settings: Settings, home: Path, dsn: str, recovery: Path | None = None) -> dict[str, str]:
    extra = {"TCP_RECOVERY_DIR": str(recovery)} if recovery is not None else {}
    return tcp_env(
        settings,
        TCP_HOME=str(home),
        TCP_POSTGRES_DSN=dsn,
        TCP_SNAPSHOT_INTERVAL_S="0.5",
        TCP_CANDLE_LATENESS_MS=str(LATENESS_MS),
        TCP_LOG_LEVEL="WARNING",
        **extra,
    )


class _Run:
    """One `tcp candles run` (or `tcp archive run`) subprocess; its output goes to a file (a pipe
    could fill and block it)."""

    def __init__(self, env: dict[str, str], log: Path, *args: str, flow: str = "candles") -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115  # closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tcp.cli", flow, "run", *args],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.started = time.monotonic()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait(30)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"`tcp candles run` did not stop within {timeout} s:\n{self.output()}"
            ) from None
        finally:
            self._out.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _run(
    env: dict[str, str], log: Path, *args: str, timeout: float = 60, flow: str = "candles"
) -> tuple[int, str]:
    run = _Run(env, log, *args, flow=flow)
    code = run.wait(timeout)
    return code, run.output()


def _saved_offsets(recovery: Path) -> dict[str, int]:
    """The next offset per Kafka partition in the newest snapshot of the recovery store."""
    newest: dict[str, tuple[int, int]] = {}
    for part in (recovery / "candles").glob("part-*.sqlite3"):
        with sqlite3.connect(part) as conn:
            rows = conn.execute(
                "SELECT state_key, snap_epoch, ser_change FROM snaps WHERE step_id = 'candles.trades_in'"
            ).fetchall()
        for key, epoch, data in rows:
            if data is None or (key in newest and newest[key][0] >= epoch):
                continue
            state = pickle.loads(data)
            newest[key] = (epoch, state if isinstance(state, int) else state[0])
    return {key: offset for key, (_, offset) in newest.items()}


def _read(offsets: dict[str, int]) -> int:
    """How many messages a snapshot had read (unread partitions hold OFFSET_BEGINNING, -2)."""
    return sum(offset for offset in offsets.values() if offset > 0)


def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchall()


CANDLES_QUERY = (
    "SELECT inst_id, timeframe, ts_close, open, high, low, close, volume, quote_volume, trade_count, "
    "vwap, first_trade_id, last_trade_id, revision FROM candles ORDER BY inst_id, timeframe, ts_close"
)
TRADES_QUERY = (
    "SELECT inst_id, trade_id, ts, px, sz, side, count, source, seq_id, origin, received_at FROM trades "
    "ORDER BY inst_id, trade_id"
)


def _candle_tuple(c: Any) -> tuple[Any, ...]:
    """A core/Kafka Candle in the shape of a `candles` row (numerics as Decimal)."""
    return (
        c.inst_id, c.timeframe, _EPOCH + timedelta(milliseconds=c.ts_close), Decimal(c.open), Decimal(c.high),
        Decimal(c.low), Decimal(c.close), Decimal(c.volume), Decimal(c.quote_volume), c.trade_count,
        None if c.vwap is None else Decimal(c.vwap), c.first_trade_id, c.last_trade_id, c.revision,
    )  # fmt: skip


def _trade_tuple(t: Trade) -> tuple[Any, ...]:
    ms = timedelta(milliseconds=1)
    return (
        t.inst_id, t.trade_id, _EPOCH + t.ts * ms, Decimal(t.px), Decimal(t.sz), t.side, t.count, t.source,
        t.seq_id, t.origin, _EPOCH + t.received_at * ms,
    )  # fmt: skip


def _first_difference(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> str:
    keyed_a = {row[:3]: row for row in a}
    keyed_b = {row[:3]: row for row in b}
    lines = [f"{len(a)} rows vs {len(b)} rows"]
    for key in sorted(keyed_a.keys() | keyed_b.keys()):
        if keyed_a.get(key) != keyed_b.get(key):
            lines.append(f"  {keyed_a.get(key)}\n  {keyed_b.get(key)}")
            if len(lines) > 8:
                break
    return "\n".join(lines)


@pytest.fixture
def second_database(make_database: Callable[[], str]) -> str:
    """Another fresh database (the `database` fixture gives one per test)."""
    return make_database()


# --------------------------------------------------------------------------------------------
# The trades: (event offset in ms from t0 at which to send it, trade), in sending order


def _price(inst: str, ticks: int) -> str:
    if inst == "PEPE-USDT":
        return f"0.{ticks:08d}"  # 1e-8 tick
    return f"{ticks // 10}.{ticks % 10}"  # 0.1 tick


def _size(lots: int) -> str:
    return f"{lots // 10**8}.{lots % 10**8:08d}"


def _generate(rng: random.Random, t0: int) -> list[tuple[int, Trade]]:
    # Trades per event second; DOGE pauses from minute 6 to 12 (flat candles), PEPE trades every
    # few minutes and stops at minute 12 (so the last run gets nothing for it and must still
    # close its windows at the end of the input).
    rates = {"BTC-USDT": 1.6, "ETH-USDT": 1.2, "SOL-USDT": 0.8, "DOGE-USDT": 0.6}
    start_px = {
        "BTC-USDT": 670_001,
        "ETH-USDT": 35_002,
        "SOL-USDT": 1_503,
        "DOGE-USDT": 17,
        "PEPE-USDT": 1_234,
    }
    events: list[tuple[int, str]] = []
    for inst, rate in rates.items():
        at = 0.0
        while True:
            at += rng.expovariate(rate) * 1000
            if at >= EVENT_SPAN_MS:
                break
            if inst == "DOGE-USDT" and 360_000 <= at < 720_000:
                continue
            events.append((int(at), inst))
    at = 20_000.0
    while at < 720_000:
        events.append((int(at), "PEPE-USDT"))
        at += rng.uniform(90_000, 240_000)
    events.sort()

    ticks = dict(start_px)
    next_id = dict.fromkeys(start_px, 1_000_000)
    last_minute: dict[str, int] = {}
    sent: dict[str, list[Trade]] = {inst: [] for inst in start_px}
    out: list[tuple[int, Trade]] = []
    for at, inst in events:
        ticks[inst] = max(1, ticks[inst] + rng.randint(-3, 3))
        ts = t0 + at
        minute = at // 60_000
        if last_minute.get(inst, minute) != minute and rng.random() < 0.5:
            ts = t0 + minute * 60_000  # exactly on a boundary: belongs to the next candle
        elif rng.random() < 0.3:
            ts -= rng.randint(1, 3_000)  # out of order, well within the lateness
        last_minute[inst] = minute
        next_id[inst] += 1
        trade = Trade(
            inst_id=inst,
            trade_id=next_id[inst],
            px=_price(inst, ticks[inst]),
            sz=_size(rng.randint(1, 5 * 10**8)),
            side=rng.choice(("buy", "sell")),
            ts=ts,
            origin="sim",
            received_at=ts + 7,
            count=rng.choice((1, 1, 1, 2, 3)),
            seq_id=next_id[inst] * 10,
        )
        sent[inst].append(trade)
        out.append((at, trade))
        if rng.random() < 0.01:  # a re-delivery, right after: counted once
            out.append((at, trade))
    # Late trades, 4 minutes behind, each sent when the watermark (60 s behind) is 25-35 s away
    # from every candle boundary: the same candles are final in every run when they arrive.
    late_id = 9_000_000
    for minute in (7, 11, 15, 18):
        for inst in ("BTC-USDT", "ETH-USDT"):
            at = minute * 60_000 + 30_000 + rng.randint(-5_000, 5_000)
            late_id += 1
            ts = t0 + at - LATE_BY_MS + rng.randint(-10_000, 10_000)
            px = _price(inst, ticks[inst] + rng.randint(-50, 50))
            late = Trade(inst_id=inst, trade_id=late_id, px=px, sz="0.25", side="buy", ts=ts, origin="sim",
                         received_at=ts + 7)  # fmt: skip
            out.append((at, late))
    # A late re-delivery of a trade already counted: still counted once.
    old = next(t for t in sent["SOL-USDT"] if t.ts >= t0 + 9 * 60_000)
    out.append((13 * 60_000 + 30_000, old))
    out.sort(key=lambda item: item[0])
    return out


def _stream(
    settings: Settings, trades: list[tuple[int, Trade]], done: threading.Event, errors: list[str]
) -> None:
    """Send each trade when its time comes (event time / SPEED), keyed by instrument."""
    producer = KafkaProducer(settings.kafka_bootstrap, client_id="recovery-test")
    topic = settings.topic(TRADES)
    try:
        started = time.monotonic()
        for at, trade in trades:
            delay = started + at / SPEED / 1000 - time.monotonic()
            if delay > 0.005:
                producer.poll(0)
                time.sleep(delay)
            producer.produce(topic, encode(trade), trade.key)
        remaining = producer.flush(30)
        if remaining or producer.stats.failed or producer.stats.delivered != len(trades):
            errors.append(f"producer: {remaining} undelivered, stats {producer.stats}")
    except Exception as exc:  # reported by the test, not lost in a thread
        errors.append(f"producer: {exc!r}")
    finally:
        done.set()


# --------------------------------------------------------------------------------------------
# 1. SIGKILL at random points


@pytest.mark.drill
def test_sigkill_at_random_points_ends_identical_to_an_uninterrupted_run(
    settings: Settings, database: str, second_database: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    hour = int(time.time() // 3600 * 3600 * 1000)
    t0 = hour - 10 * 60_000  # the stream crosses an hour boundary: 1h candles close while it runs
    trades = _generate(rng, t0)
    recovery = tmp_path / "recovery"
    env = _env(settings, tmp_path / "home", database, recovery)

    done = threading.Event()
    errors: list[str] = []
    producer = threading.Thread(target=_stream, args=(settings, trades, done, errors), daemon=True)
    producer.start()
    kills: list[str] = []
    runs: list[_Run] = []
    try:
        # Kill at random moments while the trades stream in, then once more after they are all
        # sent (it may still be catching up), and at least MIN_KILLS times in all. The trade
        # archive dataflow runs beside the candle one and is killed at moments of its own.
        while not done.is_set() or len(kills) < MIN_KILLS:
            workers = rng.choice(("1", "2"))  # resumes may change the number of workers
            n = len(kills)
            runs = [
                _Run(env, tmp_path / f"run-{n}.log", "-w", workers),
                _Run(env, tmp_path / f"archive-{n}.log", "-w", rng.choice(("1", "2")), flow="archive"),
            ]
            uptimes = [rng.uniform(1.5, 4.5), rng.uniform(1.5, 4.5)]
            for run, uptime in sorted(zip(runs, uptimes, strict=True), key=lambda ru: ru[1]):
                while time.monotonic() - run.started < uptime and run.proc.poll() is None:
                    time.sleep(0.05)
                assert run.proc.poll() is None, f"the dataflow stopped by itself:\n{run.output()}"
                run.kill()
            offsets = _saved_offsets(recovery)
            kills.append(
                f"-w {workers} killed after {uptimes[0]:.1f} s (archive after {uptimes[1]:.1f} s), "
                f"snapshot had read {_read(offsets)}"
            )
            runs = []
            time.sleep(rng.uniform(0.0, 0.5))  # lies dead a moment: trades pile up in Kafka
        producer.join(30)
        assert not errors, errors
        before_last = _saved_offsets(recovery)
        ((last_started,),) = _rows(database, "SELECT now()")
        # The last runs drain the topic and close every window at its end (resumed, tail=False).
        code, output = _run(env, tmp_path / "final.log", "--exit-at-end", "-w", "2")
        assert code == 0, output
        code, output = _run(env, tmp_path / "archive-final.log", "--exit-at-end", flow="archive")
        assert code == 0, output
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.kill()
    candles_topic = read_topic(settings, "candles", idle_s=1.0)

    # The reference: one uninterrupted run over the same topic into another database.
    reference_env = _env(settings, tmp_path / "home-ref", second_database)
    code, output = _run(
        reference_env, tmp_path / "reference.log", "--exit-at-end", "--no-recovery", "-w", "2"
    )
    assert code == 0, output
    code, output = _run(
        reference_env, tmp_path / "reference-archive.log", "--exit-at-end", "--no-recovery", flow="archive"
    )
    assert code == 0, output

    summary = "\n".join(kills) + f"\nlast run resumed after {_read(before_last)} of {len(trades)} messages"
    print(summary)
    # The kills hit a dataflow at work: snapshots had moved on before the last one.
    assert _read(before_last) > 0, summary

    # Trades: every distinct trade once, exactly as sent.
    distinct: dict[tuple[str, int], Trade] = {}
    for _, trade in trades:
        distinct.setdefault((trade.inst_id, trade.trade_id), trade)
    expected_trades = sorted(_trade_tuple(t) for t in distinct.values())
    recovered_trades = _rows(database, TRADES_QUERY)
    recovered = _rows(database, CANDLES_QUERY)
    reference = _rows(second_database, CANDLES_QUERY)
    lost = len(set(expected_trades) - set(recovered_trades)) + len(set(reference) - set(recovered))
    extra_keys = {r[:2] for r in recovered_trades} - {r[:2] for r in expected_trades}
    extra_keys |= {r[:3] for r in recovered} - {r[:3] for r in reference}
    record("SIGKILL at random moments while trades stream in (candles + archive dataflows)", runs=len(kills),
           compared=len(expected_trades) + len(reference), lost=lost, duplicated=len(extra_keys),
           detail=f"{len(kills)} kills of each of the 2 dataflows ({2 * len(kills)} processes), -w 1 or 2 at "
           f"random; PostgreSQL candles (revisions included) and trades equal an uninterrupted run")  # fmt: skip
    assert recovered_trades == expected_trades
    assert _rows(second_database, TRADES_QUERY) == expected_trades

    # Candles: identical, revisions included.
    assert recovered == reference, _first_difference(recovered, reference)
    # PEPE's last trade was sent at minute 12 of 20: its last candle (60 s of lateness) closes
    # only at the end of the input, in the last run, which resumed and got nothing for PEPE.
    ((pepe_closed,),) = _rows(
        database,
        "SELECT written_at FROM candles WHERE inst_id = 'PEPE-USDT' AND timeframe = '1m' "
        "ORDER BY ts_close DESC LIMIT 1",
    )
    assert pepe_closed >= last_started
    revised = [row for row in reference if row[-1] > 0]
    assert revised, "the late trades revised nothing: the test lost its point"
    assert any(row[1] == "1m" and row[9] == 0 for row in reference), "no flat candle"

    # The same candles as the batch build over the same trades (which knows no lateness).
    batch = sorted(_candle_tuple(c)[:-1] for c in build_candles(distinct.values(), DEFAULT_TIMEFRAMES))
    assert sorted(row[:-1] for row in reference) == batch

    # Kafka `candles` got every final candle (at least once: a restart re-sends what followed
    # the snapshot); the newest revision of each is the PostgreSQL row.
    newest: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for msg in candles_topic:
        row = _candle_tuple(decode_candle(msg.value() or b""))
        if row[:3] not in newest or newest[row[:3]][-1] < row[-1]:
            newest[row[:3]] = row
    assert sorted(newest.values()) == recovered


# --------------------------------------------------------------------------------------------
# 2. A topic reset under the dataflow


def _produce(settings: Settings, count: int, first_id: int) -> None:
    producer = KafkaProducer(settings.kafka_bootstrap, client_id="reset-test")
    for i in range(count):
        inst = ("BTC-USDT", "ETH-USDT", "SOL-USDT")[i % 3]
        ts = 1_700_000_000_000 + (first_id + i) * 500
        trade = Trade(inst_id=inst, trade_id=first_id + i, px=f"{100 + i % 9}.5", sz="0.1", side="sell",
                      ts=ts, origin="sim", received_at=ts)  # fmt: skip
        producer.produce(settings.topic(TRADES), encode(trade), trade.key)
    assert producer.flush(30) == 0 and producer.stats.failed == 0
    # Its callbacks make a reference cycle: collect it now, or it would keep reconnecting
    # (and logging) to the broker this test stops.
    del producer
    gc.collect()


def test_a_topic_reset_under_the_dataflow_stops_it_loudly(
    services_settings: Settings, database: str, tmp_path: Path
) -> None:
    home = tmp_path / "broker"
    # A private embedded broker (kafka_bootstrap="" even if TCP_KAFKA_BOOTSTRAP is set).
    base = Settings.load(
        home=home,
        kafka_bootstrap="",
        postgres_dsn=SecretStr(database),
        topic_prefix=f"reset-{uuid.uuid4().hex[:8]}.",
    )
    recovery = tmp_path / "recovery"
    kafka = services.ensure(base, ("kafka",))
    try:
        ensure_topics(kafka)
        _produce(kafka, 300, first_id=1)
        code, output = _run(_env(kafka, home, database, recovery), tmp_path / "first.log", "--exit-at-end")
        assert code == 0, output
        saved = _saved_offsets(recovery)
        assert _read(saved) == 300, saved
        first_candles = _rows(database, CANDLES_QUERY)
        assert first_candles

        # The broker restarts: Tansu keeps topics in memory, they come back empty.
        services.stop(kafka, ("kafka",))
        kafka = services.ensure(base, ("kafka",))
        ensure_topics(kafka)
        env = _env(kafka, home, database, recovery)

        # Empty topic, saved offsets past its end: Tansu answers such a fetch with no data and
        # no error, so the consumer would wait forever. It must stop at once instead.
        code, output = _run(env, tmp_path / "empty.log", timeout=45)
        assert code == 2, output
        assert f"error: {kafka.topic(TRADES)}[" in output and "the topic was reset" in output, output
        assert str(recovery) in output

        # The new topic grows past the saved offsets: resuming would silently skip its first
        # messages (Apache Kafka too: no OFFSET_OUT_OF_RANGE then). It must stop as well.
        _produce(kafka, 3000, first_id=100_000)
        code, output = _run(env, tmp_path / "grown.log", "--exit-at-end", timeout=45)
        assert code == 2, output
        assert "the topic was reset" in output, output
        assert _rows(database, CANDLES_QUERY) == first_candles  # nothing mixed in

        # What the message says to do works: a fresh recovery directory starts over.
        fresh = _env(kafka, home, database, tmp_path / "recovery-2")
        code, output = _run(fresh, tmp_path / "fresh.log", "--exit-at-end")
        assert code == 0, output
        ((newest_id,),) = _rows(database, "SELECT max(last_trade_id) FROM candles")
        assert newest_id == 100_000 + 3000 - 1  # the new topic's trades made it into candles
        # ... and the archive dataflow (its own recovery store) archives the new topic's trades.
        code, output = _run(fresh, tmp_path / "fresh-archive.log", "--exit-at-end", flow="archive")
        assert code == 0, output
        assert _rows(database, "SELECT count(*) FROM trades") == [(3000,)]
    finally:
        services.stop(base)  # its Kafka, and the Redis the dataflow started in this home


@pytest.mark.drill
def test_a_broker_restart_under_a_running_dataflow_stops_it_loudly(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    """The drill "restart the local broker under a running dataflow": the embedded broker loses
    its topics; the running dataflow (candles, and the trade archive under ``make drill``) must
    not wait forever at its old offsets, nor later skip the new topic's first messages: it
    stops within seconds with an error naming the topic, exit code 2."""
    flows = size(["candles"], ["candles", "archive", "candles"])
    detected: list[float] = []
    for n, flow in enumerate(flows):
        database = make_database()  # empty: rows appear once this run has read the trades
        home = tmp_path / f"broker-{n}"
        base = Settings.load(home=home, kafka_bootstrap="", postgres_dsn=SecretStr(database),
                             topic_prefix=f"restart-{uuid.uuid4().hex[:8]}.")  # fmt: skip
        kafka = services.ensure(base, ("kafka",))
        try:
            ensure_topics(kafka)
            _produce(kafka, 300, first_id=1 + n * 1_000_000)
            run = _Run(_env(kafka, home, database, tmp_path / f"recovery-{n}"), tmp_path / f"{flow}-{n}.log",
                       flow=flow)  # fmt: skip
            try:
                deadline = time.monotonic() + 60
                table = "candles" if flow == "candles" else "trades"
                while not _rows(database, f"SELECT count(*) FROM {table}")[0][0]:  # noqa: S608
                    assert run.proc.poll() is None and time.monotonic() < deadline, run.output()
                    time.sleep(0.2)
                # The broker restarts under the running dataflow; the ingest re-creates the topics.
                services.stop(kafka, ("kafka",))
                kafka = services.ensure(base, ("kafka",))
                ensure_topics(kafka)
                back = time.monotonic()
                _produce(kafka, 3000, first_id=500_000 + n * 1_000_000)
                code = run.wait(60)
                detected.append(time.monotonic() - back)
            finally:
                if run.proc.poll() is None:
                    run.kill()
            output = run.output()
            assert code == 2, output
            assert (
                f"error: {kafka.topic(TRADES)}" in output
                and "the topic was reset under the running dataflow" in output
            )
        finally:
            services.stop(base)
    record("broker restarted under a running dataflow (embedded Tansu: topics lost)", runs=len(flows),
           compared=len(flows), lost=0, duplicated=0,
           detail=f"every restart stopped the dataflow with exit code 2 and the error, "
           f"{max(detected):.1f} s at most after the broker was back ({', '.join(flows)})")  # fmt: skip


def test_partition_state_checks_the_topic_id(settings: Settings) -> None:
    """The source's recovery state: (next offset, topic id); an old bare offset still resumes."""
    topic = settings.topic(TRADES)
    source = KafkaBatchSource(settings.kafka_bootstrap, topic)
    current = source.build_part("s", f"0-{topic}", None)
    offset, topic_id = current.snapshot()
    current.close()
    assert topic_id and offset < 0  # OFFSET_BEGINNING: nothing read yet
    for state in (5, (5, topic_id), (5, None), (-2, "another-topic-id")):
        source.build_part("s", f"0-{topic}", state).close()  # type: ignore[arg-type]
    with pytest.raises(TopicResetError, match=rf"{topic}\[0\]: the topic was reset.*offset 5"):
        source.build_part("s", f"0-{topic}", (5, "another-topic-id"))


# --------------------------------------------------------------------------------------------
# 3. Time spent down is not idle time


def test_time_spent_down_does_not_make_the_waiting_trades_late(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataflows.candles as candles

    options = candles.CandleOptions(
        timeframes=("1m",), lateness_ms=2_000, empty="flat", late="revise", live_every_ms=60_000
    )
    t0 = 1_700_000_040_000 - 1_700_000_040_000 % 60_000
    clock = [t0]
    monkeypatch.setattr(candles, "_now_ms", lambda: clock[0])

    def trade(second: int) -> Trade:
        ts = t0 + second * 1000
        return Trade(inst_id="BTC-USDT", trade_id=second + 1, px="100.5", sz="1", side="buy", ts=ts,
                     origin="sim", received_at=ts)  # fmt: skip

    # Live: a trade a second, each read as it happens; a snapshot at second 49, then SIGKILL.
    logic = candles.CandleLogic(options, None)
    for second in range(50):
        clock[0] = t0 + second * 1000
        logic.on_item([trade(second)])
    saved = logic.snapshot()
    # Back 15 s later: the trades of seconds 50-64 wait in Kafka and come in one batch.
    clock[0] = t0 + 65_000
    logic = candles.CandleLogic(options, saved)
    out, _ = logic.on_item([trade(second) for second in range(50, 65)])
    assert [kind for kind, _ in out if kind == "late"] == []
    finals = [item for kind, item in out if kind == "final"]
    assert [(c.ts_close - t0, c.trade_count, c.revision) for c in finals] == [(60_000, 60, 0)]
