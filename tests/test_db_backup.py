"""`tcp db migrate|backup|restore` as a user runs them: the CLI in a subprocess, real PostgreSQL.

The embedded server has no TimescaleDB: the restore path for a backup that holds TimescaleDB
data (timescaledb_pre_restore / post_restore) is not run here.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dataflows.archive import TRADES_UPSERT
from dataflows.bots import BOT_PERFORMANCE_UPSERT, BOT_TRADES_UPSERT, BOTS_UPSERT, SIGNALS_UPSERT
from dataflows.candles import CANDLES_UPSERT
from sinks.db_cli import archived_extensions, user_tables
from sinks.migrate import apply_migrations, available_migrations
from sinks.postgres import PostgresWriter, Upsert
from tests.env_util import tcp_env

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def tcp_db(dsn: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = tcp_env(TCP_POSTGRES_DSN=dsn, TCP_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "tcp.cli", "db", *args], env=env, capture_output=True, text=True, timeout=180
    )


def write(dsn: str, upsert: Upsert, rows: list[tuple[object, ...]]) -> None:
    writer = PostgresWriter(dsn, upsert)
    try:
        writer.write(rows)
    finally:
        writer.close()


def fill(dsn: str) -> None:
    """Rows in every table, through the sinks the dataflows use; exact NUMERIC values included."""
    write(dsn, TRADES_UPSERT, [
        ("BTC-USDT", 1, T0, Decimal("65000.1"), Decimal("0.00000123"), "buy", 1, 0, 17, "ws", T0 + MINUTE),
        ("PEPE-USDT", 2, T0 + MINUTE, Decimal("0.00000123"), Decimal("1000000"), "sell", 3, 1, None, "rest", None),
    ])  # fmt: skip
    write(dsn, CANDLES_UPSERT, [
        ("BTC-USDT", "1m", T0 + MINUTE, Decimal("65000.1"), Decimal("65000.1"), Decimal("65000.1"),
         Decimal("65000.1"), Decimal("0.00000123"), Decimal("0.079950123"), 1, Decimal("65000.1"), 1, 1, 0),
        ("PEPE-USDT", "1m", T0 + 2 * MINUTE, Decimal("0.00000123"), Decimal("0.00000124"), Decimal("0.00000122"),
         Decimal("0.00000123"), Decimal("1000000"), Decimal("1.23"), 3, None, None, None, 2),
    ])  # fmt: skip
    write(dsn, SIGNALS_UPSERT, [
        ("sma_cross", "ab12", "BTC-USDT", "1m", T0 + MINUTE, "buy", Decimal("65000.1"),
         '{"fast": 65000.1, "slow": 64999.95}', "fast crossed above slow"),
    ])  # fmt: skip
    write(dsn, BOT_TRADES_UPSERT, [
        ("alpha", T0 + MINUTE, "buy", 1, "BTC-USDT", "1m", Decimal("65000.1"), Decimal("0.00000123"),
         Decimal("0.079950123"), Decimal("0.0000799501"), Decimal("9999.9199699269"), Decimal("0.00000123"),
         Decimal("0")),
    ])  # fmt: skip
    write(dsn, BOT_PERFORMANCE_UPSERT, [
        ("alpha", T0 + MINUTE, Decimal("65000.1"), Decimal("9999.9199699269"), Decimal("0.00000123"),
         Decimal("9999.9999200499"), Decimal("0"), Decimal("0"), Decimal("0.0000799501")),
    ])  # fmt: skip
    write(dsn, BOTS_UPSERT, [
        ("alpha", "sma_cross", '{"fast": 5, "slow": 20}', "ab12", "BTC-USDT", "1m",
         '{"name": "alpha", "cash": "10000"}', "running", None, Decimal("9999.9199699269"), Decimal("0.00000123"),
         Decimal("65000.1"), Decimal("0"), Decimal("9999.9999200499"), Decimal("0.0000799501"), 1, T0 + MINUTE,
         T0 + 2 * MINUTE, False, 0, T0 + 2 * MINUTE),
    ])  # fmt: skip


def snapshot(dsn: str) -> dict[str, list[str]]:
    """Every table's rows as PostgreSQL prints them (exact: NUMERIC scale, times to the µs), ordered."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        return {
            table: [
                row[0]
                for row in conn.execute(
                    sql.SQL("SELECT t::text FROM {} AS t ORDER BY 1").format(
                        sql.Identifier(*table.split("."))
                    )
                )
            ]
            for table in user_tables(dsn)
        }


def test_backup_then_restore_into_an_empty_database_gives_every_row_back_exactly(
    make_database: Callable[..., str], tmp_path: Path
) -> None:
    source, target = make_database(), make_database(migrated=False)
    fill(source)
    out = tmp_path / "backups" / "tcp.dump"

    made = tcp_db(source, tmp_path / "home", "backup", "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert f"-> {out}" in made.stdout and out.read_bytes().startswith(b"PGDMP")  # custom format
    assert not out.with_name("tcp.dump.partial").exists()
    assert user_tables(target) == []
    restored = tcp_db(target, tmp_path / "home", "restore", str(out))
    assert restored.returncode == 0, restored.stderr

    before, after = snapshot(source), snapshot(target)
    assert set(before) == {f"public.{t}" for t in ("trades", "candles", "signals", "bots", "bot_trades",
                                                     "bot_performance", "schema_migrations")}  # fmt: skip
    assert all(before[table] for table in before), "every table has rows"
    assert after == before
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT px::text, sz::text FROM trades ORDER BY trade_id").fetchall() == [
            ("65000.1", "0.00000123"),
            ("0.00000123", "1000000"),
        ]
    # The restored database is a working one: nothing left to migrate, the sinks' upserts work
    # (the keys are back), and so does migration 0003's trigger that refreshes written_at.
    assert apply_migrations(target) == []
    query = "SELECT close::text, revision, written_at FROM candles WHERE inst_id = 'BTC-USDT'"
    with psycopg.connect(target) as conn:
        written_before = conn.execute(query).fetchall()[0][2]
    write(target, CANDLES_UPSERT, [("BTC-USDT", "1m", T0 + MINUTE, *[Decimal("65001")] * 4, Decimal("1"),
                                    Decimal("65001"), 2, None, None, None, 1)])  # fmt: skip
    with psycopg.connect(target) as conn:
        (close, revision, written_after), *_ = conn.execute(query).fetchall()
    assert (close, revision) == ("65001", 1) and written_after > written_before


def test_restore_refuses_a_database_with_tables_unless_clean(
    make_database: Callable[..., str], tmp_path: Path
) -> None:
    source, target = make_database(), make_database()  # target: migrated, with its own rows
    fill(source)
    write(
        target,
        TRADES_UPSERT,
        [("ETH-USDT", 9, T0, Decimal("3000"), Decimal("1"), "buy", 1, 0, None, "ws", None)],
    )
    out = tmp_path / "tcp.dump"
    assert tcp_db(source, tmp_path / "home", "backup", "--out", str(out)).returncode == 0
    target_before = snapshot(target)

    refused = tcp_db(target, tmp_path / "home", "restore", str(out))
    assert refused.returncode == 2
    assert "the database is not empty (tables public.bot_performance" in refused.stderr
    assert "--clean" in refused.stderr
    assert snapshot(target) == target_before

    clean = tcp_db(target, tmp_path / "home", "restore", "--clean", str(out))
    assert clean.returncode == 0, clean.stderr
    assert snapshot(target) == snapshot(source)  # the ETH-USDT trade is gone: the tables were replaced


def test_restore_of_a_missing_or_broken_file_fails_with_the_reason(
    make_database: Callable[..., str], tmp_path: Path
) -> None:
    target = make_database(migrated=False)
    missing = tcp_db(target, tmp_path / "home", "restore", str(tmp_path / "nothing.dump"))
    assert missing.returncode == 2
    assert f"error: database {conninfo_to_dict(target)['dbname']} on" in missing.stderr
    assert f"no backup file at {tmp_path / 'nothing.dump'}" in missing.stderr

    broken = tmp_path / "broken.dump"
    broken.write_text("not a pg_dump archive\n")
    failed = tcp_db(target, tmp_path / "home", "restore", str(broken))
    assert failed.returncode == 2
    assert "pg_restore failed (exit code 1): pg_restore: error:" in failed.stderr  # its own message
    assert "valid archive" in failed.stderr
    assert user_tables(target) == []


def test_the_password_is_never_printed(make_database: Callable[..., str], tmp_path: Path) -> None:
    """It goes to pg_dump in PGPASSWORD. (The embedded server trusts local connections, so any
    password is accepted: this checks what is printed, not the authentication.)"""
    secret = "s3cret-never-printed"
    with_password = make_conninfo(make_database(), password=secret)
    made = tcp_db(with_password, tmp_path / "home", "backup", "--out", str(tmp_path / "a.dump"))
    assert made.returncode == 0, made.stderr
    unreachable = make_conninfo(with_password, host="127.0.0.1", port="1")
    failed = tcp_db(unreachable, tmp_path / "home", "backup", "--out", str(tmp_path / "b.dump"))
    assert failed.returncode == 2
    assert (
        'pg_dump failed (exit code 1): pg_dump: error: connection to server at "127.0.0.1", port 1 failed'
        in (failed.stderr)
    )
    assert not (tmp_path / "b.dump").exists() and not (tmp_path / "b.dump.partial").exists()
    for result in (made, failed):
        assert secret not in result.stdout + result.stderr


def test_extensions_are_found_in_a_backup_and_their_objects_are_no_tables(
    make_database: Callable[..., str], tmp_path: Path
) -> None:
    """What the TimescaleDB path builds on, with extensions the embedded server has: a backup's
    extensions are read from it (pg_restore --list), and a database whose only objects belong to
    an extension (TimescaleDB's images create theirs in every new database) counts as empty."""
    source, target = make_database(), make_database(migrated=False)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_trgm")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")  # two views in public
        assert conn.execute(
            "SELECT count(*) FROM pg_views WHERE viewname LIKE 'pg_stat_statements%'"
        ).fetchone() == (2,)
    out = tmp_path / "tcp.dump"
    assert tcp_db(source, tmp_path / "home", "backup", "--out", str(out)).returncode == 0
    assert archived_extensions(out) == ["pg_trgm"]
    assert user_tables(target) == []
    restored = tcp_db(target, tmp_path / "home", "restore", str(out))
    assert restored.returncode == 0, restored.stderr
    assert snapshot(target) == snapshot(source)


def test_migrate_applies_what_is_missing_once(make_database: Callable[..., str], tmp_path: Path) -> None:
    target = make_database(migrated=False)
    first = tcp_db(target, tmp_path / "home", "migrate")
    assert first.returncode == 0, first.stderr
    assert "applied " + ", ".join(v for v, _ in available_migrations()) in first.stdout
    again = tcp_db(target, tmp_path / "home", "migrate")
    assert again.returncode == 0 and again.stdout.endswith(": up to date\n")
