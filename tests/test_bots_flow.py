"""The bots dataflow (dataflows/bots.py) against real Kafka, PostgreSQL and Redis.

Parity with a plain loop, commands and their events, many bots over many workers, Redis status.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import redis
from bytewax.testing import cluster_main, run_main
from pydantic import SecretStr

from bots.bot import Bot, decode_status
from bots.commands import make_command, send_commands
from bots.config import BotConfig
from bots.lifecycle import BotEvent, decode_event
from bots.lifecycle import encode as encode_command
from dataflows.bots import build_flow
from dataflows.candle_core import Candle, encode_candle
from sinks.kafka import KafkaProducer
from tcp import topics
from tcp.config import Settings
from tests.kafka_util import read_topic
from tests.test_strategies import make_candles, random_closes

pytestmark = pytest.mark.services

INSTRUMENTS = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "XRP-USDT", "DOGE-USDT", "ADA-USDT", "PEPE-USDT", "LTC-USDT",
               "BNB-USDT")  # fmt: skip
STRATEGIES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ema_crossover", {"fast": 3, "slow": 8}),
    ("ema_crossover", {"fast": 5, "slow": 13}),
    ("macd_cross", {"fast": 5, "slow": 12, "signal": 4}),
    ("rsi_reversion", {"period": 6, "oversold": 35, "overbought": 65}),
    ("bollinger_breakout", {"period": 10, "k": 1.5}),
)


def with_db(settings: Settings, dsn: str, **update: Any) -> Settings:
    return settings.model_copy(update={"postgres_dsn": SecretStr(dsn), "bot_heartbeat_s": 0.2, **update})


def stream_candles(n: int, *, inst_ids: Sequence[str] = ("BTC-USDT",), timeframe: str = "1m") -> list[Candle]:
    """``n`` candles per instrument, interleaved in time order as the candle dataflow emits them."""
    per = [
        make_candles(random_closes(n, seed=i + 1, scale=(40_000.0 if i == 0 else 10.0 / (i + 1))), inst_id=inst,
                     timeframe=timeframe)
        for i, inst in enumerate(inst_ids)
    ]  # fmt: skip
    return [c for group in zip(*per, strict=True) for c in group]


def produce_candles(settings: Settings, candles: Sequence[Candle]) -> None:
    producer = KafkaProducer(settings.kafka_bootstrap, client_id="test-candles")
    for candle in candles:
        producer.produce(settings.topic(topics.CANDLES), encode_candle(candle), candle.key)
    assert producer.flush(30) == 0 and producer.stats.failed == 0


def bot_config(name: str, inst_id: str, strategy: str = "ema_crossover", params: dict[str, Any] | None = None,
               **extra: Any) -> BotConfig:  # fmt: skip
    return BotConfig(name=name, strategy=strategy, params=params or {"fast": 3, "slow": 8}, inst_id=inst_id,
                     timeframe="1m", fee=Decimal("0.001"), slippage_bps=Decimal(5), **extra)  # fmt: skip


def plain_loop(
    config: BotConfig, candles: Sequence[Candle]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """What the bot should have done: the same Bot class over the candles, in a plain loop.

    Returns (signals, fills) as comparable tuples."""
    bot = Bot.create(config)
    bot.state = "running"
    signals, fills = [], []
    for candle in candles:
        step = bot.on_candle(candle)
        if step.signal is not None:
            s = step.signal
            signals.append(
                (s.strategy, s.params_hash, s.inst_id, s.timeframe, s.ts_close, s.action, Decimal(s.price))
            )
        if step.fill is not None:
            f = step.fill
            fills.append((f.bot, f.ts, f.side, f.seq, Decimal(f.price), Decimal(f.size), Decimal(f.fee),
                          Decimal(f.cash_after), Decimal(f.position_after)))  # fmt: skip
    return signals, fills


def db_signals(dsn: str, config: BotConfig) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT strategy, params_hash, inst_id, timeframe, (extract(epoch FROM ts_close) * 1000)::bigint, "
            "action, price FROM signals WHERE inst_id = %s AND timeframe = %s AND strategy = %s "
            "ORDER BY ts_close",
            (config.inst_id, config.timeframe, config.strategy),
        ).fetchall()
    return [r for r in rows if r[1] == Bot.create(config).strategy.params_hash]


def db_fills(dsn: str, bot: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT bot, (extract(epoch FROM ts) * 1000)::bigint, side, seq, price, size, fee, cash_after, "
            "position_after FROM bot_trades WHERE bot = %s ORDER BY seq",
            (bot,),
        ).fetchall()


def read_events(settings: Settings, expect: int) -> list[BotEvent]:
    return [decode_event(m.value() or b"") for m in read_topic(settings, topics.BOTS_EVENTS, expect=expect)]


# --------------------------------------------------------------------------------------------


def test_bots_trade_exactly_like_the_plain_loop_and_report_to_postgres_and_redis(
    settings: Settings, database: str
) -> None:
    """Bots given at start (``tcp run --bots``) see every candle: their signals, fills and equity in
    PostgreSQL equal the same Bot class in a plain loop; Redis holds the status hash and the
    status/signal channels carry the updates."""
    s = with_db(settings, database)
    candles = stream_candles(300, inst_ids=INSTRUMENTS[:2])
    configs = [bot_config("ema-btc", "BTC-USDT"), bot_config("macd-eth", "ETH-USDT", *STRATEGIES[2])]
    produce_candles(s, candles)

    client = redis.Redis.from_url(s.redis_url.get_secret_value())
    pubsub = client.pubsub()
    pubsub.subscribe("status:ema-btc", "signals:ema-btc")
    assert pubsub.get_message(timeout=5) is not None  # subscribe confirmations
    received: list[dict[str, Any]] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.5)
            if message and message["type"] == "message":
                received.append({"channel": message["channel"].decode(), "data": message["data"]})

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    run_main(build_flow(s, bots=configs, tail=False))

    for config in configs:
        bot_candles = [c for c in candles if c.inst_id == config.inst_id]
        want_signals, want_fills = plain_loop(config, bot_candles)
        assert len(want_fills) >= 4, config.name
        assert db_signals(database, config) == want_signals
        assert db_fills(database, config.name) == want_fills
        with psycopg.connect(database) as conn:
            marks = conn.execute(
                "SELECT count(*), max(ts_close) FROM bot_performance WHERE bot = %s", (config.name,)
            ).fetchone()
            row = conn.execute(
                "SELECT state, num_trades, last_heartbeat IS NOT NULL FROM bots WHERE name = %s",
                (config.name,),
            ).fetchone()
        assert marks is not None and marks[0] == len(bot_candles)
        assert row == ("running", len(want_fills), True)

    status = client.hgetall("bot:ema-btc")
    assert status[b"state"] == b"running" and int(status[b"num_trades"]) == len(
        plain_loop(configs[0], [c for c in candles if c.inst_id == "BTC-USDT"])[1]
    )
    assert 0 < client.ttl("bot:ema-btc") <= 600
    time.sleep(1.0)
    stop.set()
    listener.join(5)
    pubsub.close()
    channels = {r["channel"] for r in received}
    assert channels == {"status:ema-btc", "signals:ema-btc"}
    last_status = decode_status([r for r in received if r["channel"] == "status:ema-btc"][-1]["data"])
    assert last_status.name == "ema-btc" and last_status.state == "running"
    kinds = {json.loads(r["data"])["kind"] for r in received if r["channel"] == "signals:ema-btc"}
    assert kinds == {"signal", "fill"}


def test_commands_drive_the_lifecycle_and_invalid_ones_are_answered_with_a_reason(
    settings: Settings, database: str
) -> None:
    s = with_db(settings, database)
    good = bot_config("life", "BTC-USDT")
    commands = [
        make_command("create", "life", config=good),
        make_command("start", "life"),
        make_command("pause", "life"),
        make_command("pause", "life"),  # already paused
        make_command("resume", "life"),
        make_command("update", "life", params={"fast": 4, "slow": 9}),  # not while running
        make_command("stop", "life"),
        make_command("update", "life", params={"fast": 4, "slow": 9}),
        make_command("create", "life", config=good),  # exists
        make_command("start", "ghost"),  # no such bot
        make_command(
            "create", "bad-params", config=bot_config("bad-params", "BTC-USDT", params={"fast": 9, "slow": 3})
        ),
        make_command(
            "create", "bad-strategy", config=bot_config("bad-strategy", "BTC-USDT", strategy="nope")
        ),
    ]
    send_commands(s, commands)
    producer = KafkaProducer(s.kafka_bootstrap, client_id="test-junk")
    junk = [b"{not json", b'{"id":"j1","action":"explode","bot":"life","at":1}', b"[]"]
    for value in junk:
        producer.produce(s.topic(topics.BOTS_COMMANDS), value, b"life")
    assert producer.flush(30) == 0
    run_main(build_flow(s, tail=False))

    all_events = read_events(s, expect=len(commands) + len(junk))
    assert len(all_events) == len(commands) + len(junk)
    events = {e.command_id: e for e in all_events}
    outcome = [(events[c.id].ok, events[c.id].state) for c in commands]
    assert outcome == [
        (True, "created"), (True, "running"), (True, "paused"), (False, "paused"), (True, "running"),
        (False, "running"), (True, "stopped"), (True, "stopped"), (False, "stopped"), (False, None),
        (False, None), (False, None),
    ]  # fmt: skip
    reasons = {c.id: events[c.id].reason or "" for c in commands}
    assert "already paused" in reasons[commands[3].id]
    assert "running" in reasons[commands[5].id]
    assert "exists already" in reasons[commands[8].id]
    assert "no bot named 'ghost'" in reasons[commands[9].id]
    assert "fast" in reasons[commands[10].id]
    assert "nope" in reasons[commands[11].id]
    rejected_junk = [e for e in all_events if e.action == "?"]
    assert len(rejected_junk) == len(junk)
    assert any("unknown action 'explode'" in (e.reason or "") for e in rejected_junk)
    assert any("malformed JSON" in (e.reason or "") for e in rejected_junk)
    with psycopg.connect(database) as conn:
        rows = conn.execute("SELECT name, state, params->>'fast' FROM bots ORDER BY name").fetchall()
    assert rows == [("life", "stopped", "4")]  # rejected creates leave no bot behind


def test_a_hundred_bots_over_nine_instruments_spread_over_workers(
    settings: Settings, make_database: Any
) -> None:
    """100 bots, 9 instruments, 5 strategies: 1 worker and 3 workers give every bot exactly the
    fills of its plain loop."""
    candles = stream_candles(150, inst_ids=INSTRUMENTS)
    configs = [
        bot_config(f"bot-{i:03d}", INSTRUMENTS[i % 9], *STRATEGIES[i % len(STRATEGIES)],
                   sizing={"fraction": Decimal("0.5")} if i % 2 else "all-in")
        for i in range(100)
    ]  # fmt: skip
    produce_candles(settings, candles)
    one, three = make_database(), make_database()
    run_main(build_flow(with_db(settings, one), bots=configs, tail=False, write_redis=False))
    cluster_main(build_flow(with_db(settings, three), bots=configs, tail=False, write_redis=False), [], 0,
                 worker_count_per_proc=3)  # fmt: skip
    traded = 0
    for config in configs:
        _, want = plain_loop(config, [c for c in candles if c.inst_id == config.inst_id])
        traded += bool(want)
        assert db_fills(one, config.name) == want, config.name
        assert db_fills(three, config.name) == want, config.name
    assert traded >= 60
    for dsn in (one, three):
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM bots WHERE state = 'running'").fetchone() == (100,)


def test_a_command_on_the_topic_is_json_a_user_can_write() -> None:
    """The commands' wire format is plain JSON (what the CLI and the dashboard send)."""
    config = bot_config("x", "BTC-USDT")
    data = json.loads(encode_command(make_command("create", "x", config=config, user="alice")))
    assert data["action"] == "create" and data["bot"] == "x" and data["user"] == "alice"
    assert data["config"]["strategy"] == "ema_crossover" and data["config"]["fee"] in ("0.001", 0.001)
