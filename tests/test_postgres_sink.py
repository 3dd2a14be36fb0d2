"""sinks.postgres and sinks.migrate against a real PostgreSQL: idempotent upserts, retries, migrations."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from sinks.migrate import apply_migrations, available_migrations
from sinks.postgres import PostgresWriter, Upsert
from tcp import services
from tcp.config import Settings

CANDLE_COLUMNS = (
    "inst_id", "timeframe", "ts_close", "open", "high", "low", "close",
    "volume", "quote_volume", "trade_count", "vwap", "first_trade_id", "last_trade_id", "revision",
)  # fmt: skip
CANDLES = Upsert("candles", CANDLE_COLUMNS, ("inst_id", "timeframe", "ts_close"), newer="revision")
T0 = datetime(2024, 1, 1, 0, 1, tzinfo=UTC)


def candle(close: str, revision: int, ts: datetime = T0) -> tuple[object, ...]:
    px = Decimal(close)
    return (
        "BTC-USDT",
        "1m",
        ts,
        px,
        px,
        px,
        px,
        Decimal("1.5"),
        px * Decimal("1.5"),
        2,
        px,
        10,
        11,
        revision,
    )


def rows(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT ts_close, close, revision FROM candles ORDER BY ts_close").fetchall()


def test_migrations_are_recorded_and_applied_once(database: str) -> None:
    assert apply_migrations(database) == []
    with psycopg.connect(database) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [v for v, _ in available_migrations()]


def test_writing_twice_is_writing_once(database: str) -> None:
    writer = PostgresWriter(database, CANDLES)
    batch = [candle("100.1", 0, T0.replace(minute=m)) for m in range(1, 50)]
    writer.write(batch)
    writer.write(batch)  # a replay after a crash
    assert len(rows(database)) == 49
    writer.close()


def test_newer_revision_wins_older_never_does(database: str) -> None:
    writer = PostgresWriter(database, CANDLES)
    writer.write([candle("100", 0)])
    writer.write([candle("101", 1)])
    writer.write([candle("99", 0)])  # a stale replay of revision 0
    assert rows(database) == [(T0, Decimal("101"), 1)]
    writer.write([candle("102", 2), candle("103", 3), candle("98", 1)])  # one batch, three revisions
    assert rows(database) == [(T0, Decimal("103"), 3)]
    writer.close()


def test_exact_numerics_survive(database: str) -> None:
    writer = PostgresWriter(database, CANDLES)
    writer.write([candle("0.00000123", 0)])
    with psycopg.connect(database) as conn:
        close, quote = conn.execute("SELECT close, quote_volume FROM candles").fetchone()  # type: ignore[misc]
    assert close == Decimal("0.00000123") and quote == Decimal("0.000001845")


def test_write_waits_while_the_database_is_down_and_resumes(tmp_path: Path) -> None:
    settings = Settings.load(home=tmp_path, postgres_dsn="")
    dsn = services.ensure(settings, ("postgres",)).postgres_dsn.get_secret_value()
    apply_migrations(dsn)
    writer = PostgresWriter(dsn, CANDLES, retry_initial_s=0.1, retry_max_s=0.5, give_up_after_s=60)
    writer.write([candle("1", 0, T0)])
    services.stop(settings, ("postgres",))

    restarted: list[str] = []

    def restart_later() -> None:
        time.sleep(2.0)
        restarted.append(services.ensure(settings, ("postgres",)).postgres_dsn.get_secret_value())

    thread = threading.Thread(target=restart_later)
    thread.start()
    started = time.monotonic()
    writer.write([candle("2", 0, T0.replace(minute=2))])  # blocks until the server is back
    thread.join()
    try:
        assert restarted == [dsn]  # same address after the restart
        assert time.monotonic() - started >= 1.5
        assert writer.retries >= 1
        assert [r[1] for r in rows(dsn)] == [Decimal("1"), Decimal("2")]
    finally:
        writer.close()
        services.stop(settings)


def test_give_up_after_raises(tmp_path: Path) -> None:
    writer = PostgresWriter(
        "postgresql://postgres@127.0.0.1:1/none", CANDLES, retry_initial_s=0.05, give_up_after_s=0.3
    )
    with pytest.raises(psycopg.OperationalError):
        writer.write([candle("1", 0)])
    assert writer.retries >= 1


def test_a_trades_largest_integers_fit_the_trades_and_candles_columns(database: str) -> None:
    """tcp.schemas bounds a trade's integers by these columns (a value beyond them is dead-lettered
    at decoding instead of stopping a sink): the extremes are stored exactly."""
    from dataflows.archive import TRADES_UPSERT, trade_rows
    from dataflows.build import build_candles
    from dataflows.candles import CANDLES_UPSERT, candle_row
    from tcp.schemas import MAX_BIGINT, MAX_COUNT, MAX_SOURCE, MAX_TS_MS, decode_trade, encode

    edge = {"inst_id": "BTC-USDT", "trade_id": MAX_BIGINT, "px": "1", "sz": "1", "side": "buy",
            "ts": MAX_TS_MS - 1, "origin": "sim", "received_at": MAX_TS_MS - 1, "count": MAX_COUNT,
            "source": MAX_SOURCE, "seq_id": -MAX_BIGINT - 1}  # fmt: skip
    trade = decode_trade(encode(edge))
    PostgresWriter(database, TRADES_UPSERT).write(trade_rows([trade]))
    PostgresWriter(database, CANDLES_UPSERT).write([candle_row(c) for c in build_candles([trade], "1m")])
    with psycopg.connect(database) as conn:
        stored = conn.execute("SELECT trade_id, count, source, seq_id, received_at FROM trades").fetchone()
        candle = conn.execute("SELECT trade_count, first_trade_id, last_trade_id FROM candles").fetchone()
    assert stored == (
        MAX_BIGINT,
        MAX_COUNT,
        MAX_SOURCE,
        -MAX_BIGINT - 1,
        datetime(2099, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
    )
    assert candle == (MAX_COUNT, MAX_BIGINT, MAX_BIGINT)
