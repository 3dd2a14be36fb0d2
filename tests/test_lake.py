"""The Parquet lake against real PostgreSQL and Kafka: incremental exports lose nothing and repeat
nothing (late rows with old times, an open transaction, revised candles), topic ranges by message
time, and `tcp sql` over the views."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

from backtest.lake import export_lake, export_topic, open_lake
from bots.config import BotConfig
from dataflows.archive import TRADES_UPSERT, trade_rows
from dataflows.bots import BOT_PERFORMANCE_UPSERT, BOTS_UPSERT, mark_row, status_row
from dataflows.candle_core import Candle
from dataflows.candles import CANDLES_UPSERT, candle_row
from sinks.postgres import PostgresWriter, Upsert
from tcp import topics
from tcp.config import Settings
from tcp.schemas import Trade, encode
from tests.env_util import tcp_env

pytestmark = pytest.mark.services

DAY = 86_400_000
T0 = 1_710_028_800_000  # 2024-03-10 00:00 UTC


def trade(inst_id: str, trade_id: int, ts: int, px: str = "42000.123456789012345678") -> Trade:
    return Trade(inst_id, trade_id, px, "0.00000001", "buy", ts, "sim", received_at=ts)


def write(dsn: str, upsert: Upsert, rows: Sequence[Sequence[Any]]) -> None:
    writer = PostgresWriter(dsn, upsert)
    try:
        writer.write(rows)
    finally:
        writer.close()


def lake_rows(root: Path, query: str) -> list[tuple[Any, ...]]:
    return open_lake(root).sql(query).fetchall()


def test_trades_are_exported_once_including_late_ones_and_open_transactions(
    database: str, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    first = [trade("BTC-USDT", i, T0 + i * 3_600_000) for i in range(1, 31)]  # 30 h: two days
    first += [trade("ETH-USDT", i, T0 + i * 60_000, "3100.5") for i in range(1, 11)]
    write(database, TRADES_UPSERT, trade_rows(first))

    runs = export_lake(database, lake, tables=("trades",))
    assert (runs[0].rows, runs[0].files) == (40, 3)  # BTC on two days, ETH on one
    files = sorted(p.relative_to(lake).as_posix() for p in lake.rglob("*.parquet"))
    assert files == [
        "trades/inst_id=BTC-USDT/date=2024-03-10/part-000001.parquet",
        "trades/inst_id=BTC-USDT/date=2024-03-11/part-000001.parquet",
        "trades/inst_id=ETH-USDT/date=2024-03-10/part-000001.parquet",
    ]
    # Exact values: the price with 18 decimals, the size of 1e-8.
    assert lake_rows(lake, "SELECT px, sz FROM trades WHERE inst_id = 'BTC-USDT' AND trade_id = 1") == [
        (Decimal("42000.123456789012345678"), Decimal("0.00000001"))
    ]
    assert export_lake(database, lake, tables=("trades",))[0].rows == 0  # nothing new: nothing written
    assert len(list(lake.rglob("*.parquet"))) == 3

    # A backfill after a reconnect: trades OLDER than what was exported, written now; and a
    # trade written by a transaction still open while the lake exports.
    late = [trade("BTC-USDT", 100 + i, T0 - DAY + i) for i in range(5)]
    write(database, TRADES_UPSERT, trade_rows(late))
    with psycopg.connect(database) as open_conn:
        open_conn.execute(
            "INSERT INTO trades (inst_id, trade_id, ts, px, sz, side, origin) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            ("ETH-USDT", 999, trade_rows([trade("ETH-USDT", 999, T0)])[0][2], "3100.5", "1", "sell", "sim"),
        )
        assert export_lake(database, lake, tables=("trades",))[0].rows == 5  # the open one is not visible
        open_conn.commit()
    assert export_lake(database, lake, tables=("trades",))[0].rows == 1  # ... and comes with the next run

    counts = lake_rows(
        lake, "SELECT inst_id, count(*), count(DISTINCT trade_id) FROM trades GROUP BY 1 ORDER BY 1"
    )
    assert counts == [("BTC-USDT", 35, 35), ("ETH-USDT", 11, 11)]
    assert lake_rows(lake, "SELECT min(date) FROM trades")[0][0].isoformat() == "2024-03-09"


def candle(revision: int, close: str) -> Candle:
    return Candle("BTC-USDT", "1m", T0 + 60_000, "100", "101", "99", close, "2", "200", 3, "100",
                  1, 3, revision)  # fmt: skip


def test_a_revised_candle_is_exported_again_and_read_once(database: str, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    write(database, CANDLES_UPSERT, [candle_row(candle(0, "100.5"))])
    assert export_lake(database, lake, tables=("candles",))[0].rows == 1
    write(database, CANDLES_UPSERT, [candle_row(candle(1, "100.75"))])  # a late trade revised it
    assert export_lake(database, lake, tables=("candles",))[0].rows == 1
    assert len(list(lake.rglob("*.parquet"))) == 2  # both versions are kept ...
    assert lake_rows(lake, "SELECT revision, close FROM candles") == [
        (1, Decimal("100.75"))
    ]  # ... one is read


def test_bot_tables_keep_exact_money_and_the_bot_instrument(database: str, tmp_path: Path) -> None:
    from bots.bot import Bot
    from bots.portfolio import Mark

    lake = tmp_path / "lake"
    config = BotConfig.model_validate({"name": "ema-eth", "strategy": "ema_crossover", "params": {},
                                       "inst_id": "ETH-USDT", "timeframe": "1m"})  # fmt: skip
    write(database, BOTS_UPSERT, [status_row(Bot.create(config).status(now=T0))])
    mark = Mark("ema-eth", T0, "3100.5", "0.000000000000000000000123", "1.5", "4650.75", "0", "0", "0.1")
    write(database, BOT_PERFORMANCE_UPSERT, [mark_row(mark)])
    runs = export_lake(database, lake, tables=("bot_performance", "bot_trades"))
    assert [(r.table, r.rows) for r in runs] == [("bot_performance", 1), ("bot_trades", 0)]
    assert lake_rows(lake, "SELECT inst_id, cash, equity FROM bot_performance") == [
        ("ETH-USDT", "0.000000000000000000000123", "4650.75")
    ]


def test_a_topic_range_is_selected_by_message_time(settings: Settings, tmp_path: Path) -> None:
    topic = settings.topic(topics.TRADES)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    stamps = {"before": T0 - 1, "inside": T0, "late inside": T0 + DAY - 1, "after": T0 + DAY}
    trade_id = 0
    for label, stamp in stamps.items():
        for _ in range(3):
            trade_id += 1
            value = encode(trade("SOL-USDT", trade_id, T0 - 5 * DAY + trade_id))  # trade time is not used
            producer.produce(topic, value, b"SOL-USDT", timestamp=stamp)
        if label == "inside":
            producer.produce(topic, b"not a trade", timestamp=stamp)
    assert producer.flush(30) == 0

    lake = tmp_path / "lake"
    result = export_topic(settings.kafka_bootstrap, topic, lake, since_ms=T0, until_ms=T0 + DAY)
    assert (result.rows, result.outside, result.invalid) == (6, 6, 1)
    again = export_topic(settings.kafka_bootstrap, topic, lake, since_ms=T0, until_ms=T0 + DAY)
    assert again.rows == 6 and len(list(lake.rglob("*.parquet"))) == result.files  # replaced, not added
    assert lake_rows(lake, "SELECT list(trade_id ORDER BY trade_id) FROM trades") == [([4, 5, 6, 7, 8, 9],)]
    with pytest.raises(ValueError, match="does not exist"):
        export_topic(
            settings.kafka_bootstrap, f"missing-{uuid.uuid4().hex}", lake, since_ms=T0, until_ms=T0 + 1
        )


def test_tcp_sql_prints_writes_and_explains(
    services_settings: Settings, database: str, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    write(database, TRADES_UPSERT, trade_rows([trade("BTC-USDT", i, T0 + i) for i in range(1, 8)]))
    export_lake(database, lake, tables=("trades",))
    env = tcp_env(services_settings, TCP_HOME=str(tmp_path / "home"), TCP_LAKE_DIR=str(lake))

    def tcp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tcp.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    shown = tcp("sql", "SELECT inst_id, count(*) AS n, sum(px) AS total FROM trades GROUP BY 1")
    assert shown.returncode == 0, shown.stderr
    total = 7 * Decimal("42000.123456789012345678")  # exact: DECIMAL(38, 18) all the way
    assert "BTC-USDT" in shown.stdout and str(total) in shown.stdout, shown.stdout
    out = tmp_path / "n.csv"
    written = tcp("sql", "SELECT trade_id FROM trades ORDER BY 1", "--out", str(out))
    assert written.returncode == 0, written.stderr
    assert out.read_text().split() == ["trade_id", *map(str, range(1, 8))]
    bad = tcp("sql", "SELECT nope FROM trades")
    assert bad.returncode == 2 and "nope" in bad.stderr
    empty = tcp("sql", "SELECT 1", "--lake", str(tmp_path / "nothing"))
    assert empty.returncode == 2 and "tcp export lake" in empty.stderr
