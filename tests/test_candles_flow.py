"""The streaming candle dataflow (dataflows/candles.py) against real Kafka and real PostgreSQL.

No mocks: trades are produced to ``okx.trades``, the dataflow runs (in-process with
``bytewax.testing``, or as ``tcp candles run`` subprocesses) and what a user sees is checked:
the PostgreSQL ``candles`` and ``trades`` tables and the Kafka topics ``candles``,
``candles.live``, ``okx.trades.late`` and ``okx.trades.dlq``. The expected candles come from the
independent reference aggregation (tests/reference_candles.py), compared field by field with
NUMERIC columns as exact Decimals and ``ts_close`` as timestamptz.

Finite runs (``tail=False``) end with ``close_all``: the last candle of every instrument and
timeframe is made final and nothing after it is invented (no trailing flat candles), exactly
like the reference, which fills flat candles only between an instrument's candles.

Replays run much faster than the data was recorded, and the watermark also advances with the
wall-clock time the flow spends between batches (docs/candles.md, rule 7, like Bytewax's
EventClock). A generated trade arrives at most 1.85 s after newer ones, so the replays here
allow 10 s of lateness: a machine stall of up to 8 s cannot make an in-order trade late.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from bytewax.testing import cluster_main, run_main
from confluent_kafka import Message
from pydantic import SecretStr

from dataflows import archive
from dataflows.candle_core import Candle, LateTrade, decode_candle, decode_late_trade
from dataflows.candles import build_flow, candle_row
from sinks.kafka import KafkaProducer
from tcp import topics
from tcp.config import Settings
from tcp.schemas import DeadLetter, Trade, decode_dead_letter, encode
from tcp.timeframes import close_of
from tests.env_util import tcp_env
from tests.kafka_util import read_topic
from tests.reference_candles import generate_arrivals, reference_candles

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[1]
ALL = ("1m", "5m", "15m", "1h", "4h", "1d")
REPLAY_LATENESS_MS = 10_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00:00 UTC
Key = tuple[str, str, int]  # inst_id, timeframe, ts_close (ms)
Row = tuple[Any, ...]  # a candles row: numerics as Decimal, ts_close as an aware datetime
T = TypeVar("T")

CANDLE_SELECT = (
    "SELECT inst_id, timeframe, ts_close, open, high, low, close, volume, quote_volume, trade_count, vwap, "
    "first_trade_id, last_trade_id, revision FROM candles"
)


# --------------------------------------------------------------------------------------------
# helpers


def row_of(candle: Candle, revision: int | None = None) -> Row:
    """The row PostgreSQL should hold for ``candle`` (numerics as Decimal), revision overridable."""
    r = candle_row(candle)
    numerics = tuple(Decimal(x) for x in r[3:9])
    vwap = None if r[10] is None else Decimal(r[10])
    return (*r[:3], *numerics, r[9], vwap, r[11], r[12], r[13] if revision is None else revision)


def row_key(row: Row) -> Key:
    return (row[0], row[1], int(row[2].timestamp() * 1000))


def db_rows(dsn: str, where: str = "") -> dict[Key, Row]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f"{CANDLE_SELECT} {where}").fetchall()
    result = {row_key(row): tuple(row) for row in rows}
    assert len(result) == len(rows)
    return result


def written_at(dsn: str) -> dict[Key, float]:
    """When each candle row was first inserted (PostgreSQL's now(), epoch seconds)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT inst_id, timeframe, ts_close, written_at FROM candles").fetchall()
    return {(i, tf, int(ts.timestamp() * 1000)): at.timestamp() for i, tf, ts, at in rows}


def assert_same(got: dict[Key, Row], want: dict[Key, Row], what: str = "candles") -> None:
    """Equal row sets; on failure say which keys are missing, extra or different (first few)."""
    missing = sorted(want.keys() - got.keys())
    extra = sorted(got.keys() - want.keys())
    different = sorted(k for k in want.keys() & got.keys() if got[k] != want[k])
    if missing or extra or different:
        lines = [f"{what}: {len(missing)} missing, {len(extra)} extra, {len(different)} different"]
        lines += [f"  missing {want[k]}" for k in missing[:5]]
        lines += [f"  extra   {got[k]}" for k in extra[:5]]
        lines += [f"  got     {got[k]}\n  want    {want[k]}" for k in different[:5]]
        pytest.fail("\n".join(lines))


def expected(candles: Iterable[Candle], revisions: dict[Key, int] | None = None) -> dict[Key, Row]:
    revisions = revisions or {}
    result: dict[Key, Row] = {}
    for c in candles:
        k = (c.inst_id, c.timeframe, c.ts_close)
        result[k] = row_of(c, revisions.get(k, 0))
    return result


def produce(
    settings: Settings, messages: Iterable[tuple[bytes | None, bytes]], producer: KafkaProducer | None = None
) -> None:
    """Produce (key, value) messages to okx.trades, in order, and wait until they are delivered."""
    producer = producer or KafkaProducer(settings.kafka_bootstrap, client_id="test-candles-flow")
    topic = settings.topic(topics.TRADES)
    for key, value in messages:
        producer.produce(topic, value, key)
    assert producer.flush(60) == 0
    assert producer.stats.delivered == producer.stats.produced and producer.stats.failed == 0


def produce_trades(
    settings: Settings, trades: Iterable[Trade], producer: KafkaProducer | None = None
) -> None:
    """Directly, keyed by inst_id (no de-duplication on the way: duplicates reach the flow)."""
    produce(settings, ((t.inst_id.encode(), encode(t)) for t in trades), producer)


def with_db(settings: Settings, dsn: str, **update: Any) -> Settings:
    return settings.model_copy(update={"postgres_dsn": SecretStr(dsn), **update})


def candles_of(messages: Sequence[Message]) -> list[Candle]:
    """The candles of a candles topic's messages, checking each key is ``inst_id|timeframe``."""
    result = []
    for msg in messages:
        candle = decode_candle(msg.value() or b"")
        assert msg.key() == candle.key == f"{candle.inst_id}|{candle.timeframe}".encode()
        result.append(candle)
    return result


def latest(candles: Iterable[Candle]) -> dict[Key, Row]:
    """The highest revision of every candle, as rows."""
    best: dict[Key, Candle] = {}
    for c in candles:
        k = (c.inst_id, c.timeframe, c.ts_close)
        if k not in best or c.revision > best[k].revision:
            best[k] = c
    return {k: row_of(c) for k, c in best.items()}


def wait_for(check: Callable[[], T | None], timeout_s: float, what: str, every_s: float = 0.1) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flow_env(settings: Settings, home: Path, log_level: str = "WARNING") -> dict[str, str]:
    """TCP_* variables that make ``tcp candles run`` use exactly these settings."""
    return tcp_env(settings, TCP_HOME=str(home), TCP_LOG_LEVEL=log_level)


@contextmanager
def candle_processes(
    settings: Settings, tmp_path: Path, commands: Sequence[Sequence[str]], log_level: str = "WARNING"
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``tcp candles run --no-recovery ARGS`` for each ARGS; stopped (SIGTERM) on the way out.
    Process ``i`` logs to ``tmp_path / f"candles-run-{i}.log"``."""
    env = flow_env(settings, tmp_path / "home", log_level)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for i, args in enumerate(commands):
            log = tmp_path / f"candles-run-{i}.log"
            logs.append(log)
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "tcp.cli", "candles", "run", "--no-recovery", *args],
                        env=env,
                        cwd=ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:  # shown by pytest when the test failed
            print(f"---- {log.name}\n{log.read_text(errors='replace')[-3000:]}")


def wait_until_consuming(settings: Settings) -> None:
    """Block until a running flow has consumed okx.trades: a junk message comes back dead-lettered."""
    produce(settings, [(b"PROBE", b"probe: not a trade")])
    letters = read_topic(settings, topics.DLQ, expect=1, timeout_s=60)
    assert letters, "the dataflow did not start consuming okx.trades within 60 s"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------------------------
# 1. a million trades, streamed, equal the reference


def test_million_trades_stream_into_the_reference_candles(settings: Settings, database: str) -> None:
    """1M generated trades through Kafka and the dataflow: PostgreSQL, the candles topic and the
    trade archive hold exactly what the reference aggregation says, for every timeframe."""
    started = time.monotonic()
    s = with_db(settings, database, candle_lateness_ms=REPLAY_LATENESS_MS)
    arrivals = generate_arrivals(1_000_000, seed=21)
    trades = [a.trade for a in arrivals]
    # The data has what it should: duplicates, out-of-order arrival (within the lateness),
    # PEPE's tiny prices, a quiet instrument with hour-long gaps, a run over UTC midnight.
    distinct = {(t.inst_id, t.trade_id) for t in trades}
    assert len(trades) >= 1_000_000 and len(trades) - len(distinct) > 5_000
    newest: dict[str, int] = {}
    behind = 0
    for t in trades:
        if t.ts < newest.get(t.inst_id, 0):
            behind += 1
            assert newest[t.inst_id] - t.ts <= 1_850  # within the allowed lateness
        newest[t.inst_id] = max(newest.get(t.inst_id, 0), t.ts)
    assert behind > 100_000
    assert {"BTC-USDT", "ETH-USDT", "PEPE-USDT", "UNI-USDT"} == set(newest)
    assert any(t.px.startswith("0.000001") for t in trades)
    days = {close_of(t.ts, 86_400_000) for t in trades}
    assert len(days) >= 2
    generated = time.monotonic()

    produce_trades(s, trades)
    produced = time.monotonic()
    run_main(build_flow(s, tail=False))
    run_main(archive.build_flow(s, tail=False))  # the trade archive, a dataflow of its own
    flowed = time.monotonic()

    want = expected(reference_candles(trades, ALL))
    assert any(r[9] == 0 and r[0] == "UNI-USDT" and r[1] == "1h" for r in want.values())  # flat candles
    assert sum(1 for r in want.values() if r[0] == "BTC-USDT" and r[1] == "1d") >= 2  # midnights
    got = db_rows(database)
    assert_same(got, want)
    # The end of the input closed every last candle and invented nothing after it.
    last: dict[tuple[str, str], Row] = {}
    for k in sorted(got):
        last[k[:2]] = got[k]
    assert len(last) == 4 * len(ALL) and all(row[9] > 0 for row in last.values())

    # The candles topic: the same final candles (nothing was late, so one revision each),
    # keyed inst_id|timeframe, each key's candles in time order.
    on_topic = candles_of(read_topic(s, topics.CANDLES, expect=len(want), timeout_s=60))
    assert len(on_topic) == len(want)
    assert_same(latest(on_topic), got, "candles topic")
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for c in on_topic:
        by_key[c.key].append(c.ts_close)
    assert all(closes == sorted(closes) for closes in by_key.values())

    # The trade archive: every distinct trade exactly once, with its exact size.
    with psycopg.connect(database) as conn:
        archived = conn.execute("SELECT inst_id, trade_id FROM trades").fetchall()
        volume: dict[str, Decimal] = dict(
            conn.execute("SELECT inst_id, sum(sz) FROM trades GROUP BY inst_id").fetchall()
        )
    assert len(archived) == len(distinct)
    assert set(archived) == distinct
    first: dict[tuple[str, int], Trade] = {}
    for t in trades:
        first.setdefault((t.inst_id, t.trade_id), t)
    want_volume: dict[str, Decimal] = defaultdict(Decimal)
    for t in first.values():
        want_volume[t.inst_id] += Decimal(t.sz)
    assert volume == want_volume

    # Nothing was late or dead-lettered.
    assert read_topic(s, topics.LATE, idle_s=0.5) == []
    assert read_topic(s, topics.DLQ, idle_s=0.5) == []
    checked = time.monotonic()
    print(
        f"\n1M flow test: generate {generated - started:.1f} s, produce {produced - generated:.1f} s, "
        f"dataflow {flowed - produced:.1f} s ({len(trades) / (flowed - produced):,.0f} trades/s), "
        f"reference + checks {checked - flowed:.1f} s; {len(want):,} candles"
    )


# --------------------------------------------------------------------------------------------
# 2. the same candles whatever the number of workers and processes


def test_same_candles_for_1_worker_3_workers_and_2_processes_of_2(
    settings: Settings, make_database: Callable[[], str], tmp_path: Path
) -> None:
    """One instrument's candles are built by one worker whatever the cluster: 1 worker
    (run_main), 3 workers in one process (cluster_main) and 2 ``tcp candles run`` processes of
    2 workers each write identical candles (each into its own database), equal to the reference."""
    s = settings.model_copy(update={"candle_lateness_ms": REPLAY_LATENESS_MS})
    trades = [a.trade for a in generate_arrivals(100_000, seed=22)]
    produce_trades(s, trades)
    want = expected(reference_candles(trades, ALL))
    timings = {}

    one = make_database()
    t = time.monotonic()
    run_main(build_flow(with_db(s, one), tail=False))
    timings["1 worker"] = time.monotonic() - t

    three = make_database()
    t = time.monotonic()
    cluster_main(build_flow(with_db(s, three), tail=False), [], 0, worker_count_per_proc=3)
    timings["3 workers"] = time.monotonic() - t

    four = make_database()
    addresses = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    commands = [["--exit-at-end", "-w", "2", "-i", str(i), "-a", addresses] for i in (0, 1)]
    t = time.monotonic()
    with candle_processes(with_db(s, four), tmp_path, commands) as procs:
        codes = [proc.wait(120) for proc in procs]
    timings["2 processes x 2 workers"] = time.monotonic() - t
    assert codes == [0, 0]

    results = {name: db_rows(dsn) for name, dsn in [("1 worker", one), ("3 workers", three), ("2x2", four)]}
    for name, got in results.items():
        assert_same(got, want, f"candles with {name}")
    assert results["1 worker"] == results["3 workers"] == results["2x2"]
    # The archive dataflow with 3 workers: every distinct trade once.
    cluster_main(archive.build_flow(with_db(s, one), tail=False), [], 0, worker_count_per_proc=3)
    distinct = len({(t.inst_id, t.trade_id) for t in trades})
    with psycopg.connect(one) as conn:
        assert conn.execute("SELECT count(*) FROM trades").fetchone() == (distinct,)
    print("\nworker runs:", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


# --------------------------------------------------------------------------------------------
# 3. late trades


def _trade(trade_id: int, at_ms: int, px: str, sz: str = "1") -> Trade:
    return Trade("BTC-USDT", trade_id, px, sz, "buy", T0 + at_ms, "sim")


@pytest.mark.parametrize("policy", ["revise", "drop-to-late-topic-only"])
def test_a_trade_after_its_candle_is_final_goes_to_the_late_topic(
    settings: Settings, database: str, policy: str
) -> None:
    """Minute 1 is final once a minute-3 trade moved the watermark past it; then a trade of
    minute 1 arrives. It is reported on okx.trades.late; with ``revise`` the candle (and the
    flat minute 2 after it, whose price follows minute 1's close) get revision 1 in PostgreSQL."""
    s = with_db(settings, database, candle_late_policy=policy)  # lateness: the default 2 s
    on_time = [_trade(1, 10_000, "100"), _trade(2, 20_000, "101"), _trade(3, 150_000, "102")]
    late = _trade(4, 30_000, "105", "2")  # after trade 2 in event order: the new close
    again = _trade(2, 20_000, "101")  # a late re-delivery of a counted trade
    produce_trades(s, [*on_time, late, again])
    run_main(build_flow(s, tail=False))
    run_main(archive.build_flow(s, tail=False))

    reports = [decode_late_trade(m.value() or b"") for m in read_topic(s, topics.LATE, expect=1)]
    assert len(reports) == 1  # the re-delivered duplicate is dropped, not reported
    report = reports[0]
    assert isinstance(report, LateTrade)
    assert report.trade == late
    assert (report.timeframe, report.ts_close) == ("1m", T0 + 60_000)
    assert T0 + 148_000 <= report.watermark < T0 + 180_000  # 150 s - lateness, + wall time
    assert report.action == ("revised" if policy == "revise" else "reported")

    got = db_rows(database)
    if policy == "revise":
        revised = {("BTC-USDT", "1m", T0 + 60_000): 1, ("BTC-USDT", "1m", T0 + 120_000): 1}
        want = expected(reference_candles([*on_time, late], ALL), revised)
        assert got[("BTC-USDT", "1m", T0 + 120_000)][3] == Decimal(105)  # the flat minute, re-priced
    else:
        want = expected(reference_candles(on_time, ALL))
    assert_same(got, want)

    # The candles topic carries the first version and, with revise, the correction after it.
    versions = candles_of(read_topic(s, topics.CANDLES, idle_s=1.0))
    minute1 = [c for c in versions if c.timeframe == "1m" and c.ts_close == T0 + 60_000]
    assert [(c.revision, c.close) for c in minute1] == (
        [(0, "101"), (1, "105")] if policy == "revise" else [(0, "101")]
    )
    assert_same(latest(versions), got, "candles topic")

    # The archive keeps every distinct trade, the late one too (and the duplicate once).
    with psycopg.connect(database) as conn:
        ids = sorted(r[0] for r in conn.execute("SELECT trade_id FROM trades").fetchall())
    assert ids == [1, 2, 3, 4]


# --------------------------------------------------------------------------------------------
# 4. bad input


def test_bad_messages_go_to_the_dlq_and_the_flow_goes_on(settings: Settings, database: str) -> None:
    """Junk bytes, broken JSON and JSON that is not a valid Trade, between good trades: each
    lands on okx.trades.dlq, kept exactly, with its reason and ``topic[partition]@offset``;
    the flow runs to the end and the good trades make exactly the reference candles."""
    s = with_db(settings, database)
    good = [_trade(i, i * 7_000, str(100 + i % 5)) for i in range(1, 41)]
    bad = {
        b"\xff\xfe\x00\x81 binary junk": "malformed",
        b"not json at all": "malformed",
        b'{"inst_id": "BTC-USDT", "trade_id": 5': "truncated",
        b"[1, 2, 3]": "Expected `object`",
        b"": "",  # an empty value
        b'{"inst_id": "BTC-USDT", "px": "1"}': "missing required field",
        encode(_trade(900, 1_000, "1")).replace(b'"px":"1"', b'"px":"-1"'): "px",
        encode(_trade(901, 1_000, "1")).replace(b'"sz":"1"', b'"sz":"1e3"'): "sz",
        encode(_trade(902, 1_000, "1")).replace(
            str(T0 + 1_000).encode(), str((T0 + 1_000) * 1000).encode()
        ): "ts",
        encode(_trade(903, 1_000, "1")).replace(b'"BTC-USDT"', b'"btc-usdt"'): "inst_id",
        encode(_trade(904, 1_000, "1"))[:-1] + b',"extra":1}': "unknown field",
    }
    assert len(bad) == 11
    messages: list[tuple[bytes | None, bytes]] = []
    junk = iter(bad)
    for i, trade in enumerate(good):  # bad messages between good ones, same partition
        messages.append((b"BTC-USDT", encode(trade)))
        if i % 3 == 1:
            value = next(junk, None)
            if value is not None:
                messages.append((b"BTC-USDT", value))
    messages.extend((b"BTC-USDT", value) for value in junk)
    produce(s, messages)
    run_main(build_flow(s, tail=False))  # returns: the flow did not crash

    trades_topic = s.topic(topics.TRADES)
    where = {
        m.value() or b"": f"{trades_topic}[{m.partition()}]@{m.offset()}"
        for m in read_topic(s, topics.TRADES)
    }
    letters = [decode_dead_letter(m.value() or b"") for m in read_topic(s, topics.DLQ, expect=len(bad))]
    assert len(letters) == len(bad)
    by_raw: dict[bytes, DeadLetter] = {letter.raw_bytes(): letter for letter in letters}
    assert set(by_raw) == set(bad)  # each kept exactly, the non-UTF-8 one in base64
    assert by_raw[next(iter(bad))].raw_b64 is not None
    for raw, reason in bad.items():
        letter = by_raw[raw]
        assert letter.where == where[raw]
        assert letter.reason and reason in letter.reason, (raw, letter.reason)
        assert abs(letter.at - now_ms()) < 120_000

    assert_same(db_rows(database), expected(reference_candles(good, s.timeframes)))
    # The archive dataflow over the same topic skips the bad values (the DLQ has them once).
    run_main(archive.build_flow(s, tail=False))
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM trades").fetchone() == (len(good),)
    assert len(read_topic(s, topics.DLQ, idle_s=1.0)) == len(bad)


# --------------------------------------------------------------------------------------------
# 5. live candles


def test_live_candles_are_forming_throttled_and_precede_the_final_ones(
    settings: Settings, database: str, tmp_path: Path
) -> None:
    """A running flow (``tcp candles run``) publishes forming candles on candles.live: for each
    candle at most once per ``candle_live_every_ms`` of wall time, never a final one: each was
    sent before its final row reached PostgreSQL and holds no more than the final candle."""
    every = 500
    s = with_db(
        settings, database, timeframes=("1s", "5s", "1m"), candle_lateness_ms=500, candle_live_every_ms=every
    )
    rng = random.Random(5)
    producer = KafkaProducer(s.kafka_bootstrap, client_id="test-live")
    with candle_processes(s, tmp_path, [[]]):
        wait_until_consuming(s)
        started = now_ms()
        trade_id = 0
        while now_ms() - started < 3_000:
            trade_id += 1
            batch = [
                Trade(inst, trade_id, str(rng.randint(100, 110)), "1", "buy", now_ms(), "sim")
                for inst in ("SOL-USDT", "DOGE-USDT")
            ]
            produce_trades(s, batch, producer)
            time.sleep(0.03)
        last_ts = now_ms()
        # The last 1s candles become final after the lateness, via the wall-clock watermark.
        last = ("1s", close_of(last_ts, 1_000))
        wait_for(lambda: sum(k[1:] == last for k in written_at(database)) == 2, 10, "the last 1s candles")
        live = read_topic(s, topics.CANDLES_LIVE, idle_s=0.5)
    finals = db_rows(database)
    inserted = written_at(database)

    sent: dict[Key, list[tuple[int, Candle]]] = defaultdict(list)
    for msg in live:
        candle = decode_candle(msg.value() or b"")
        assert msg.key() == candle.key
        assert candle.revision == 0 and candle.trade_count > 0
        sent[(candle.inst_id, candle.timeframe, candle.ts_close)].append((msg.timestamp()[1], candle))
    # About one emission per 500 ms over ~3 s of trades, per instrument and timeframe.
    emissions = Counter((k[0], k[1]) for k, versions in sent.items() for _ in versions)
    assert all(emissions[(inst, tf)] >= 4 for inst in ("SOL-USDT", "DOGE-USDT") for tf in s.timeframes), (
        emissions
    )

    compared = 0
    for k, versions in sent.items():
        stamps = sorted(at for at, _ in versions)
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        # Throttled: emitted at least `every` ms apart; the producer's timestamps jitter a little.
        assert all(gap >= every - 200 for gap in gaps), (k, gaps)
        final = finals.get(k)
        if final is None:
            continue  # still forming when the flow was stopped (the 1m and most 5m candles)
        for at, candle in versions:
            compared += 1
            assert at / 1000 <= inserted[k] + 0.2, f"live {candle} sent after its final row was written"
            assert candle.trade_count <= final[9] and Decimal(candle.volume) <= final[7]
            assert Decimal(candle.high) <= final[4] and Decimal(candle.low) >= final[5]
    assert compared >= 4  # the check above was not vacuous


# --------------------------------------------------------------------------------------------
# 6. idle close: the wall-clock watermark


def test_idle_instruments_close_by_wall_clock_after_lateness_not_before(
    settings: Settings, database: str, tmp_path: Path
) -> None:
    """With the flow running and no more trades, the last candle becomes final once the
    watermark (newest event - lateness + wall time idle since it arrived) reaches its close:
    after ``close - newest + lateness`` of idleness, not before and not much later; for trades
    stamped now and for trades from 2024 alike (old data is not closed at once just because the
    wall clock is far ahead). Flat candles follow while the instrument stays idle."""
    lateness = 500
    s = with_db(settings, database, timeframes=("1s", "5s"), candle_lateness_ms=lateness)
    with candle_processes(s, tmp_path, [[]]):
        wait_until_consuming(s)
        # 2024 data: 16 trades 200 ms apart, the newest at T0 + 3 s. On arrival the watermark
        # is T0 + 2.5 s: the candles closing at T0 + 1 s and 2 s are final by event time; the
        # last one closes at T0 + 4 s and may become final only after 1 s + lateness of idleness.
        old = [Trade("ETH-USDT", i, f"{2000 + i}", "1", "sell", T0 + i * 200, "sim") for i in range(16)]
        producer = KafkaProducer(s.kafka_bootstrap, client_id="test-idle")
        old_sent = time.time()
        produce_trades(s, old, producer)
        # Trades stamped now, one per 100 ms for about a second.
        live: list[Trade] = []
        for i in range(1, 11):
            live.append(Trade("BTC-USDT", i, f"{67000 + i}", "0.5", "buy", now_ms(), "sim"))
            produce_trades(s, live[-1:], producer)
            time.sleep(0.1)
        newest = live[-1].ts
        btc_close = close_of(newest, 1_000)
        old_key, btc_key = ("ETH-USDT", "1s", T0 + 4_000), ("BTC-USDT", "1s", btc_close)
        wait_for(lambda: {old_key, btc_key} <= written_at(database).keys(), 15, "the last candles to close")
        time.sleep(1.2)  # idle: flat candles follow
        inserted = written_at(database)
        rows = db_rows(database)

    # 2024 data: the candle at T0 + 2 s closed by event time on arrival; the last one only
    # after 1 s + lateness of idleness (a naive wall-clock watermark would close it at once).
    on_arrival = ("ETH-USDT", "1s", T0 + 2_000)
    needed_s = (T0 + 4_000 - old[-1].ts + lateness) / 1000
    assert inserted[old_key] >= old_sent + needed_s
    assert inserted[old_key] - inserted[on_arrival] >= needed_s - 0.5
    assert inserted[old_key] <= old_sent + needed_s + 4.0
    assert_same(
        {k: v for k, v in rows.items() if k[0] == "ETH-USDT" and k[2] <= T0 + 4_000},
        expected(c for c in reference_candles(old, ["1s", "5s"]) if c.timeframe == "1s"),
        "ETH 1s candles",
    )
    old_5s = ("ETH-USDT", "5s", T0 + 5_000)  # needs 2 s + lateness of idleness
    assert old_5s not in inserted or inserted[old_5s] >= old_sent + (5_000 - 3_000 + lateness) / 1000

    # Trades stamped now: final at close + lateness (the trade was stamped before it arrived).
    assert inserted[btc_key] >= btc_close / 1000 + lateness / 1000
    assert inserted[btc_key] <= btc_close / 1000 + lateness / 1000 + 4.0
    want_btc = {c.ts_close: c for c in reference_candles(live, ["1s"])}
    # (Revision aside: a stall of the machine longer than the lateness between two trades
    # would advance the watermark by wall time and make a trade late, then revised in.)
    assert rows[btc_key][3:13] == row_of(want_btc[btc_close])[3:13]
    # ... then flat candles at the last price while BTC stays idle.
    flats = sorted(k[2] for k in rows if k[:2] == ("BTC-USDT", "1s") and k[2] > btc_close)
    assert flats and flats[0] == btc_close + 1_000
    close_px = Decimal(want_btc[btc_close].close)
    for ts in flats:
        row = rows[("BTC-USDT", "1s", ts)]
        assert row[3:10] == (close_px, close_px, close_px, close_px, 0, 0, 0)
        assert inserted[("BTC-USDT", "1s", ts)] >= ts / 1000 + lateness / 1000


# --------------------------------------------------------------------------------------------
# 7. Redis: market:{inst_id} for live charts


def test_final_candles_are_published_on_the_market_channel(settings: Settings, database: str) -> None:
    """Every final candle written to PostgreSQL is also published on ``market:{inst_id}``
    (``{"kind": "final", "candle": ...}``) for the dashboard's live charts."""
    import json

    import redis

    s = with_db(settings, database, timeframes=("1m", "5m"))
    client = redis.Redis.from_url(s.redis_url.get_secret_value())
    pubsub = client.pubsub()
    pubsub.subscribe("market:BTC-USDT")
    assert pubsub.get_message(timeout=5) is not None  # the subscription is confirmed
    produce_trades(s, [_trade(i, i * 17_000, f"{100 + i % 7}") for i in range(40)])
    run_main(build_flow(s, tail=False))
    finals = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is None:
            if finals:
                break
            continue
        if message["type"] == "message":
            data = json.loads(message["data"])
            if data["kind"] == "final":
                finals.append(decode_candle(json.dumps(data["candle"])))
    pubsub.close()
    published = {(c.inst_id, c.timeframe, c.ts_close): c for c in finals}
    assert len(published) == len(finals)  # each once (no crash, no replay)
    got = db_rows(database)
    assert set(got) == set(published)
