"""`tcp run` end to end, the bot supervisor, and crashes of the bots dataflow (real services).

The commands run as a user runs them: `python -m tcp.cli ...` subprocesses with TCP_* settings.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr

from bots.bot import Bot
from bots.commands import make_command, send_commands
from bots.config import BotConfig, load_bots
from bots.lifecycle import decode_command
from bots.supervisor import Supervisor
from connectors.replay import ReplaySource
from connectors.simulate import write_simulated
from dataflows.build import build_from_batches
from dataflows.candle_core import Candle, encode_candle
from sinks.kafka import KafkaProducer
from tcp import topics
from tcp.config import Settings
from tests.env_util import tcp_env
from tests.kafka_util import read_topic
from tests.test_strategies import make_candles, random_closes

pytestmark = pytest.mark.services

START_MS = 1_710_028_800_000  # 2024-03-10 00:00 UTC


def run_tcp(env: dict[str, str], log: Path, *args: str, timeout: float = 240) -> str:
    with open(log, "wb") as out:
        proc = subprocess.run([sys.executable, "-m", "tcp.cli", *args], env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout, check=False)  # fmt: skip
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


def rows(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params).fetchall()


def pg_candles(dsn: str, inst_id: str, timeframe: str) -> list[Candle]:
    """The candles the streaming dataflow wrote, as Candle structs (exact strings)."""
    result = []
    for r in rows(
        dsn,
        "SELECT inst_id, timeframe, (extract(epoch FROM ts_close) * 1000)::bigint, open::text, high::text, "
        "low::text, close::text, volume::text, quote_volume::text, trade_count FROM candles "
        "WHERE inst_id = %s AND timeframe = %s ORDER BY ts_close",
        (inst_id, timeframe),
    ):
        result.append(Candle(*r[:3], *(_plain(v) for v in r[3:9]), trade_count=r[9]))  # type: ignore[arg-type]
    return result


def _plain(text: str) -> str:
    value = Decimal(text).normalize()
    return format(value, "f") if value else "0"


def plain_loop(
    config: BotConfig, candles: list[Candle]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The same Bot class over the candles in a plain loop: (signals, fills) as comparable tuples."""
    bot = Bot.create(config)
    bot.state = "running"
    signals, fills = [], []
    for candle in candles:
        step = bot.on_candle(candle)
        if step.signal is not None:
            signals.append((step.signal.ts_close, step.signal.action, Decimal(step.signal.price)))
        if step.fill is not None:
            f = step.fill
            fills.append(
                (
                    f.ts,
                    f.side,
                    f.seq,
                    Decimal(f.price),
                    Decimal(f.size),
                    Decimal(f.fee),
                    Decimal(f.cash_after),
                )
            )
    return signals, fills


def db_results(dsn: str, config: BotConfig) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    params_hash = Bot.create(config).strategy.params_hash
    signals = rows(
        dsn,
        "SELECT (extract(epoch FROM ts_close) * 1000)::bigint, action, price FROM signals WHERE strategy = %s "
        "AND params_hash = %s AND inst_id = %s AND timeframe = %s ORDER BY ts_close",
        (config.strategy, params_hash, config.inst_id, config.timeframe),
    )
    fills = rows(
        dsn,
        "SELECT (extract(epoch FROM ts) * 1000)::bigint, side, seq, price, size, fee, cash_after FROM bot_trades "
        "WHERE bot = %s ORDER BY seq",
        (config.name,),
    )
    return signals, fills


def file_results(out: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The signals and fills a backtest or replay wrote to ``out``, as :func:`db_results` gives them."""
    import pyarrow.parquet as pq

    sig = pq.read_table(out / "signals.parquet").to_pylist()
    fills = pq.read_table(out / "trades.parquet").to_pylist()
    ms = lambda t: int(t.timestamp() * 1000)  # noqa: E731
    return (
        [(ms(x["ts_close"]), x["action"], Decimal(x["price"])) for x in sig],
        [(ms(x["ts"]), x["side"], x["seq"], *(Decimal(x[k]) for k in ("price", "size", "fee", "cash_after")))
         for x in fills],
    )  # fmt: skip


BOTS = [
    {"name": "ema-btc", "strategy": "ema_crossover", "params": {"fast": 4, "slow": 11}, "inst_id": "BTC-USDT",
     "timeframe": "1m", "fee": 0.001, "slippage_bps": 5, "initial_cash": 10000},
    {"name": "rsi-eth", "strategy": "rsi_reversion", "params": {"period": 6, "oversold": 40, "overbought": 60},
     "inst_id": "ETH-USDT", "timeframe": "1m", "fee": 0.002, "slippage_bps": 2, "initial_cash": 5000},
    {"name": "bb-sol-5m", "strategy": "bollinger_breakout", "params": {"period": 5, "k": 1.0},
     "inst_id": "SOL-USDT", "timeframe": "5m", "sizing": {"fraction": 0.5}},
]  # fmt: skip


def test_tcp_run_replay_and_backtest_agree_on_every_signal_and_fill(
    settings: Settings, database: str, tmp_path: Path
) -> None:
    """A recorded file through `tcp run --exit-at-end`: for every bot, PostgreSQL holds exactly the
    signals and fills that the same strategy and bot give over the same candles in a plain loop;
    and those candles are the ones `tcp candles build` makes from the file. Then the recorded
    topic through `tcp replay`, and `tcp backtest run` over the built candles (Parquet): the
    same signals and fills again, and the two write byte-identical signals, trades and equity."""
    trades_file = tmp_path / "trades.jsonl"
    write_simulated(trades_file, instruments=("BTC-USDT", "ETH-USDT", "SOL-USDT"), seed=5, start_ms=START_MS,
                    end_ms=START_MS + 6 * 3_600_000, event_rate=3.0)  # fmt: skip
    bots_file = tmp_path / "bots.json"
    bots_file.write_text(json.dumps(BOTS))
    s = settings.model_copy(update={"postgres_dsn": SecretStr(database)})
    env = tcp_env(s, TCP_HOME=str(tmp_path / "home"), TCP_LOG_LEVEL="WARNING")
    output = run_tcp(env, tmp_path / "run.log", "run", "--input", str(trades_file), "--bots", str(bots_file),
                     "--exit-at-end")  # fmt: skip
    assert "3/3 bots dataflow" in output and "done in" in output

    built = build_from_batches(ReplaySource(trades_file).iter_batches(), ("1m", "5m"), "flat").candles
    for config in load_bots(bots_file):
        streamed = pg_candles(database, config.inst_id, config.timeframe)
        batch = [c for c in built if (c.inst_id, c.timeframe) == (config.inst_id, config.timeframe)]
        assert [(c.ts_close, c.close, c.volume) for c in streamed] == [
            (c.ts_close, c.close, c.volume) for c in batch
        ]
        want = plain_loop(config, streamed)
        assert len(want[1]) >= 3, config.name
        assert db_results(database, config) == want, config.name
    assert rows(database, "SELECT count(*) FROM trades")[0][0] > 10_000  # the archive ran too
    assert rows(database, "SELECT name, state FROM bots ORDER BY name") == [
        ("bb-sol-5m", "running"), ("ema-btc", "running"), ("rsi-eth", "running")
    ]  # fmt: skip

    # The recorded topic through the live dataflows again (tcp replay), and the built candles
    # through the backtest engine: the same signals and fills as the live run, file for file.
    replayed = tmp_path / "replay"
    output = run_tcp(env, tmp_path / "replay.log", "replay", "--topic", s.topic(topics.TRADES), "--bots",
                     str(bots_file), "--out", str(replayed), "--no-report")  # fmt: skip
    assert all(f"  {name}: " in output for name in ("ema-btc", "rsi-eth", "bb-sol-5m")), output
    candles_file = tmp_path / "candles.parquet"
    run_tcp(env, tmp_path / "build.log", "candles", "build", "--input", str(trades_file), "--output",
            str(candles_file), "--timeframes", "1m,5m")  # fmt: skip
    for config in load_bots(bots_file):
        backtested = tmp_path / "backtest" / config.name
        run_tcp(env, tmp_path / f"backtest-{config.name}.log", "backtest", "run", "--strategy", config.strategy,
                "--params", json.dumps(config.params), "--candles", str(candles_file), "--inst-id", config.inst_id,
                "--timeframe", config.timeframe, "--fee", str(config.fee), "--slippage-bps",
                str(config.slippage_bps), "--initial-cash", str(config.initial_cash),
                *(["--sizing", config.sizing.model_dump_json()] if not isinstance(config.sizing, str) else []),
                "--out", str(backtested))  # fmt: skip
        live = db_results(database, config)
        for result in (replayed / config.name, backtested):
            assert file_results(result) == live, (config.name, result)
        for name in ("signals.parquet", "trades.parquet", "equity.parquet"):
            assert (replayed / config.name / name).read_bytes() == (backtested / name).read_bytes(), name


# --------------------------------------------------------------------------------------------
# The supervisor: a strategy plug-in that fails, a dataflow that dies

EXPLODING = """
from pydantic import Field
from strategies import Signal, Strategy, StrategyConfig


class ExplodeConfig(StrategyConfig):
    every: int = Field(default=3, ge=1)


class Explode(Strategy[ExplodeConfig]):
    '''Fails on every `every`-th candle it sees (a bug in a user's strategy).'''

    name = "explode"
    config_type = ExplodeConfig

    def __init__(self, config):
        super().__init__(config)
        self.seen = 0

    def on_new_candle(self, candle):
        self.seen += 1
        if self.seen % self.config.every == 0:
            raise ZeroDivisionError("the user's bug")
        return None
"""


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    """A user's strategy package, 'installed' with a tcp.strategies entry point."""
    root = tmp_path / "plugins"
    root.mkdir()
    (root / "user_strategies.py").write_text(textwrap.dedent(EXPLODING))
    dist = root / "user_strategies-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: user-strategies\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tcp.strategies]\nexplode = user_strategies:Explode\n")
    return root


def produce_candles(settings: Settings, candles: list[Candle]) -> None:
    producer = KafkaProducer(settings.kafka_bootstrap, client_id="test-candles")
    for candle in candles:
        producer.produce(settings.topic(topics.CANDLES), encode_candle(candle), candle.key)
    assert producer.flush(30) == 0 and producer.stats.failed == 0


@pytest.fixture
def candle_stream(settings: Settings) -> Iterator[list[Candle]]:
    yield make_candles(random_closes(400, seed=9, scale=100.0), inst_id="BTC-USDT")


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_supervisor_restarts_a_failing_bot_3_times_an_hour_and_marks_dead_ones_stale(
    settings: Settings, database: str, tmp_path: Path, plugin_path: Path, candle_stream: list[Candle]
) -> None:
    s = settings.model_copy(
        update={"postgres_dsn": SecretStr(database), "bot_heartbeat_s": 0.3, "bot_stale_after_s": 2.0}
    )
    bots_file = tmp_path / "bots.json"
    bots_file.write_text(json.dumps([{"name": "buggy", "strategy": "explode", "params": {"every": 3},
                                      "inst_id": "BTC-USDT", "timeframe": "1m"}]))  # fmt: skip
    env = tcp_env(s, TCP_HOME=str(tmp_path / "home"), TCP_LOG_LEVEL="WARNING", PYTHONPATH=str(plugin_path))
    log = open(tmp_path / "bots.log", "wb")  # noqa: SIM115  # closed below
    flow = subprocess.Popen([sys.executable, "-m", "tcp.cli", "bots", "run", "--bots", str(bots_file)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    supervisor = Supervisor(s)
    state = "SELECT state, reason, restarts FROM bots WHERE name = 'buggy'"
    try:
        wait_for("the bot to run", lambda: rows(database, state) and rows(database, state)[0][0] == "running")
        sent = 0
        restarted: list[str] = []
        for round_ in range(4):
            # Candles until the strategy raises: the bot fails, the dataflow goes on.
            produce_candles(s, candle_stream[sent : sent + 3])
            sent += 3
            failed = wait_for(
                "the bot to fail", lambda: [r for r in rows(database, state) if r[0] == "failed"]
            )
            assert "ZeroDivisionError: the user's bug" in failed[0][1]
            report = supervisor.check()
            if round_ < 3:
                assert report.restarted == ("buggy",)
                restarted.append("buggy")
                wait_for("the restart", lambda: rows(database, state)[0][0] == "running")
            else:  # the 4th failure within the hour: held back
                assert report.restarted == () and report.held_back == ("buggy",)
        assert rows(database, state)[0][2] == 3
        starts = [decode_command(m.value() or b"") for m in read_topic(s, topics.BOTS_COMMANDS, idle_s=1.0)]
        assert [(c.action, c.user) for c in starts] == [("start", "supervisor")] * 3

        # A user may start it by hand (not rate-limited); then the dataflow dies: no more
        # heartbeats, and the supervisor marks the running bot stale.
        send_commands(s, [make_command("start", "buggy", user="alice")])
        wait_for("the manual start", lambda: rows(database, state)[0][0] == "running")
        assert supervisor.check().stale == ()  # it beats
        flow.send_signal(signal.SIGKILL)
        flow.wait(10)
        time.sleep(2.5)
        assert supervisor.check().stale == ("buggy",)
        assert rows(database, "SELECT state, stale FROM bots WHERE name = 'buggy'") == [("running", True)]
    finally:
        if flow.poll() is None:
            flow.kill()
            flow.wait(10)
        log.close()


# --------------------------------------------------------------------------------------------
# SIGKILL of the bots dataflow


def test_sigkill_of_the_bots_dataflow_loses_and_duplicates_no_fill(
    settings: Settings, make_database: Any, tmp_path: Path
) -> None:
    """Candles stream in while `tcp bots run` is SIGKILLed at random moments and restarted; the
    fills and equity rows end identical to an uninterrupted run's, none lost, none twice."""
    rng = random.Random(11)
    candles = [
        c
        for pair in zip(
            make_candles(random_closes(1500, seed=1, scale=40_000.0), inst_id="BTC-USDT"),
            make_candles(random_closes(1500, seed=2, scale=3_000.0), inst_id="ETH-USDT"),
            strict=True,
        )
        for c in pair
    ]
    configs = [
        {"name": f"b{i}", "strategy": strategy, "params": params, "inst_id": inst, "timeframe": "1m"}
        for i, (inst, (strategy, params)) in enumerate(
            (inst, sp)
            for inst in ("BTC-USDT", "ETH-USDT")
            for sp in (("ema_crossover", {"fast": 3, "slow": 8}), ("macd_cross", {"fast": 4, "slow": 9, "signal": 3}),
                       ("rsi_reversion", {"period": 5, "oversold": 40, "overbought": 60}))
        )
    ]  # fmt: skip
    bots_file = tmp_path / "bots.json"
    bots_file.write_text(json.dumps(configs))
    crashed, reference = make_database(), make_database()
    s = settings.model_copy(update={"postgres_dsn": SecretStr(crashed)})
    env = tcp_env(s, TCP_HOME=str(tmp_path / "home"), TCP_LOG_LEVEL="WARNING", TCP_SNAPSHOT_INTERVAL_S="0.5",
                  TCP_RECOVERY_DIR=str(tmp_path / "recovery"))  # fmt: skip

    done = threading.Event()

    def stream() -> None:
        producer = KafkaProducer(s.kafka_bootstrap, client_id="test-stream")
        for i in range(0, len(candles), 60):
            for candle in candles[i : i + 60]:
                producer.produce(s.topic(topics.CANDLES), encode_candle(candle), candle.key)
            producer.flush(30)
            time.sleep(0.25)  # ~13 s of candles: the kills land while they stream in
        done.set()

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    kills = 0
    progress: list[int] = []  # equity rows written when each run was killed
    while not done.is_set() or kills < 4:
        with open(tmp_path / f"run-{kills}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tcp.cli", "bots", "run", "--bots", str(bots_file)],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            time.sleep(rng.uniform(2.0, 4.0))
            assert proc.poll() is None, (tmp_path / f"run-{kills}.log").read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        kills += 1
        progress.append(rows(crashed, "SELECT count(*) FROM bot_performance")[0][0])
    streamer.join(30)
    # Runs were killed while at work: some had written part of the rows, not all.
    assert any(0 < n < 6 * 1500 for n in progress), progress
    run_tcp(env, tmp_path / "final.log", "bots", "run", "--bots", str(bots_file), "--exit-at-end")
    ref_env = tcp_env(s.model_copy(update={"postgres_dsn": SecretStr(reference)}),
                      TCP_HOME=str(tmp_path / "home-ref"), TCP_LOG_LEVEL="WARNING")  # fmt: skip
    run_tcp(
        ref_env,
        tmp_path / "ref.log",
        "bots",
        "run",
        "--bots",
        str(bots_file),
        "--exit-at-end",
        "--no-recovery",
    )

    fills = "SELECT bot, ts, side, seq, price, size, fee, cash_after, position_after FROM bot_trades ORDER BY 1, 2, 3"
    equity = "SELECT bot, ts_close, equity, cash, position FROM bot_performance ORDER BY 1, 2"
    assert rows(crashed, fills) == rows(reference, fills)
    assert len(rows(reference, fills)) > 50
    assert rows(crashed, equity) == rows(reference, equity)
    assert len(rows(reference, equity)) == 6 * 1500
    print(f"\n{kills} kills; equity rows written when killed: {progress} of {6 * 1500}")
