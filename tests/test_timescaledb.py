"""Migration 0004 (optional TimescaleDB) on a real PostgreSQL without TimescaleDB.

What runs here: the migration applies, does nothing (the tables stay plain, the sinks' upserts
work), and says why. What does not run: the branch that creates the extension and the
hypertables, because the embedded server has no TimescaleDB. Of that branch this file checks
what can be checked without it: PL/pgSQL accepted its syntax when the migration created the
function (a syntax error in that very branch is refused, shown below), and the tables and time
columns it names exist, with the time column in every unique index as hypertables require.
Whether TimescaleDB accepts the calls (create_hypertable, by_range: TimescaleDB 2.13 or newer)
is not tested.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import TupleRow

from dataflows.archive import TRADES_UPSERT
from dataflows.candles import CANDLES_UPSERT
from sinks.postgres import PostgresWriter

T0 = datetime(2024, 3, 1, 12, 1, tzinfo=UTC)
HYPERTABLE_CALL = re.compile(r"create_hypertable\('(\w+)', by_range\('(\w+)'")


def function_source(conn: psycopg.Connection[TupleRow]) -> str:
    row = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'tcp_enable_timescaledb'").fetchone()
    assert row is not None, "migration 0004 creates tcp_enable_timescaledb()"
    return str(row[0])


@pytest.fixture
def plain_database(database: str) -> str:
    with psycopg.connect(database) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone():
            pytest.skip("this server has TimescaleDB: these tests are about a server without it")
    return database


def test_without_timescaledb_the_migration_changes_nothing_and_says_why(plain_database: str) -> None:
    notices: list[str] = []
    with psycopg.connect(plain_database, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(str(diag.message_primary)))
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
        assert "0004_timescaledb" in versions
        assert conn.execute("SELECT tcp_enable_timescaledb()").fetchone() == (False,)  # again: still nothing
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'").fetchone() == (
            0,
        )
        kinds = conn.execute(
            "SELECT relname, relkind FROM pg_class WHERE relname IN ('trades', 'candles') ORDER BY 1"
        ).fetchall()
    assert kinds == [("candles", "r"), ("trades", "r")]  # plain tables
    assert notices == ["TimescaleDB is not installed on this server: trades and candles stay plain tables"]

    trade = ("BTC-USDT", 1, T0, Decimal("65000.1"), Decimal("0.00000123"), "buy", 1, 0, None, "ws", None)
    candle = ("BTC-USDT", "1m", T0, *[Decimal("65000.1")] * 4, Decimal("0.00000123"), Decimal("0.079950123"),
              1, None, 1, 1, 0)  # fmt: skip
    revised = (*candle[:6], Decimal("65000.2"), *candle[7:13], 1)
    for upsert, rows in ((TRADES_UPSERT, [trade, trade]), (CANDLES_UPSERT, [candle, revised, candle])):
        writer = PostgresWriter(plain_database, upsert)
        try:
            writer.write(rows)
            writer.write(rows)  # a replay
        finally:
            writer.close()
    with psycopg.connect(plain_database) as conn:
        assert conn.execute("SELECT count(*), min(sz)::text FROM trades").fetchone() == (1, "0.00000123")
        assert conn.execute("SELECT count(*), min(close)::text, min(revision) FROM candles").fetchone() == (
            1,
            "65000.2",
            1,
        )


def test_the_hypertable_branch_names_time_columns_that_are_in_every_unique_index(plain_database: str) -> None:
    with psycopg.connect(plain_database) as conn:
        calls = HYPERTABLE_CALL.findall(function_source(conn))
        assert calls == [("trades", "ts"), ("candles", "ts_close")]
        for table, column in calls:
            kind = conn.execute(
                "SELECT data_type FROM information_schema.columns WHERE table_name = %s AND column_name = %s",
                (table, column),
            ).fetchone()
            assert kind == ("timestamp with time zone",), (table, column)
            unique = conn.execute(
                "SELECT i.indexrelid::regclass::text, %s = ANY (array_agg(a.attname)) FROM pg_index i"
                " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
                " WHERE i.indrelid = %s::regclass AND i.indisunique GROUP BY 1",
                (column, table),
            ).fetchall()
            assert unique == [(f"{table}_pkey", True)], (table, unique)
    # ... and the sinks upsert on exactly those keys (ON CONFLICT needs a unique index).
    assert TRADES_UPSERT.key == ("inst_id", "trade_id", "ts")
    assert CANDLES_UPSERT.key == ("inst_id", "timeframe", "ts_close")


def test_plpgsql_checked_the_syntax_of_the_branch_that_did_not_run(plain_database: str) -> None:
    """The migration's function was created, so its whole body passed PL/pgSQL's syntax check,
    the hypertable branch included; the same body with a syntax error in that branch is refused.
    (Names such as create_hypertable are resolved only when a statement runs: not checked.)"""
    with psycopg.connect(plain_database, autocommit=True) as conn:
        body = function_source(conn)
        conn.execute("SELECT plpgsql_validator('tcp_enable_timescaledb'::regproc)")  # the check, again
        broken = body.replace("by_range('ts', INTERVAL", "by_range('ts' INTERVAL")
        assert broken != body
        with pytest.raises(psycopg.errors.SyntaxError, match='syntax error at or near "INTERVAL"'):
            conn.execute(
                sql.SQL("CREATE FUNCTION tcp_broken_copy() RETURNS boolean LANGUAGE plpgsql AS {}").format(
                    sql.Literal(broken)
                )
            )
        # Both calls may run again (if_not_exists) and move rows already there (migrate_data).
        assert body.count("if_not_exists => true, migrate_data => true") == 2
