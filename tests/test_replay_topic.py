"""`tcp replay`'s rules, in process against the real broker: the time range, the errors, cleanup.

(That a replay gives the same signals and fills as `tcp run --exit-at-end` and `tcp backtest
run` is checked end to end in tests/test_run.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from backtest.engine import BacktestError
from backtest.replay import replay
from bots.config import BotConfig
from connectors.replay import ReplaySource
from connectors.simulate import write_simulated
from dataflows.build import build_from_batches
from tcp.cli import ingest_replay
from tcp.config import Settings

pytestmark = pytest.mark.services

START_MS = 1_710_028_800_000  # 2024-03-10 00:00 UTC
MINUTE = 60_000


def bot(name: str, inst_id: str = "BTC-USDT") -> BotConfig:
    return BotConfig.model_validate(
        {"name": name, "strategy": "ema_crossover", "params": {"fast": 3, "slow": 7}, "inst_id": inst_id,
         "timeframe": "1m"}
    )  # fmt: skip


@pytest.fixture
def recorded(settings: Settings, tmp_path: Path) -> Path:
    """An hour of simulated BTC-USDT trades in the test's okx.trades topic (and the file)."""
    path = tmp_path / "trades.jsonl"
    write_simulated(path, instruments=("BTC-USDT",), seed=11, start_ms=START_MS, end_ms=START_MS + 60 * MINUTE,
                    event_rate=2.0)  # fmt: skip
    assert ingest_replay(settings, path, "max") == 0
    return path


def test_a_replay_keeps_the_trades_of_its_range_and_cleans_up(settings: Settings, recorded: Path) -> None:
    since, until = START_MS + 10 * MINUTE, START_MS + 40 * MINUTE
    result = replay(settings, bots=[bot("a")], since_ms=since, until_ms=until)

    series = result.results["a"].series
    # Candle T holds [T - 1m, T): the range's whole minutes, each as the full file builds it.
    assert series.ts_close.tolist() == list(range(since + MINUTE, until + 1, MINUTE))
    built = build_from_batches(ReplaySource(recorded).iter_batches(), ("1m",), "flat").candles
    full = {c.ts_close: (c.open, c.high, c.low, c.close, c.volume, c.trade_count) for c in built}
    replayed = series.table.select(["ts_close", "open", "high", "low", "close", "volume", "trade_count"])
    for row in replayed.to_pylist():
        assert full[row["ts_close"]] == tuple(
            row[k] for k in ("open", "high", "low", "close", "volume", "trade_count")
        )
    assert result.dead_letters == 0

    topics = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(timeout=10).topics
    assert not [name for name in topics if name.startswith("replay-")]  # its own topics are gone


def test_a_replay_says_what_is_missing(settings: Settings, recorded: Path) -> None:
    with pytest.raises(BacktestError, match=r"topic 'no-such\.topic' does not exist"):
        replay(settings, bots=[bot("a")], topic="no-such.topic")
    with pytest.raises(BacktestError, match=r"bot 'eth': the replay made no ETH-USDT 1m candles"):
        replay(settings, bots=[bot("btc"), bot("eth", "ETH-USDT")])
    with pytest.raises(BacktestError, match="no bots to replay"):
        replay(settings, bots=[])
