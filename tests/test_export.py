"""backtest.export / `tcp export` against a real PostgreSQL: exact values, schemas, filters, order."""

from __future__ import annotations

import argparse
import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql
from pydantic import SecretStr

from backtest.cli import cmd_export, register
from backtest.export import EXPORT_TABLES, ExportTable, check_filters, export_schema, export_table, parse_time
from connectors.replay import ReplaySource
from dataflows.build import DECIMAL_TYPE, build_from_batches, write_parquet
from tcp.config import Settings

T0 = datetime(2024, 1, 1, tzinfo=UTC)
T0_MS = 1_704_067_200_000
MIN = timedelta(minutes=1)
TS_MS = pa.timestamp("ms", tz="UTC")
TS_US = pa.timestamp("us", tz="UTC")

CANDLE_COLUMNS = (
    "inst_id", "timeframe", "ts_close", "open", "high", "low", "close",
    "volume", "quote_volume", "trade_count", "vwap", "first_trade_id", "last_trade_id", "revision",
)  # fmt: skip
BIG = "12345678901234567890.123456789012345678"  # 20 + 18 digits: the most decimal128(38, 18) holds
FEE = "0.000000000001230615000000001234"  # 30 decimals: beyond decimal128(38, 18)


def insert(dsn: str, table: str, columns: tuple[str, ...], rows: list[tuple[object, ...]]) -> None:
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join([sql.Placeholder()] * len(columns)),
    )
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany(query, rows)


def candle_row(
    inst: str, tf: str, ts: datetime, close: str, *, volume: str = "1000000", flat: bool = False
) -> tuple[object, ...]:
    px = Decimal(close)
    vol = Decimal(0) if flat else Decimal(volume)
    return (
        inst, tf, ts, px, px, px, px, vol, px * vol, 0 if flat else 2,
        None if flat else px, None if flat else 7, None if flat else 8, 0,
    )  # fmt: skip


def signal_row(strategy: str, inst: str, tf: str, ts: datetime, price: str) -> tuple[object, ...]:
    indicators = json.dumps({"ema_fast": "0.0000012341", "rsi": 71.5, "nested": {"ok": True}})
    return (strategy, "h1", inst, tf, ts, "buy", Decimal(price), indicators, f"{strategy} crossed")


SIGNAL_COLUMNS = (
    "strategy", "params_hash", "inst_id", "timeframe", "ts_close", "action", "price", "indicators", "reason",
)  # fmt: skip
TRADE_COLUMNS = (
    "bot", "ts", "side", "seq", "inst_id", "timeframe", "price", "size",
    "notional", "fee", "cash_after", "position_after", "realized_pnl",
)  # fmt: skip
PERF_COLUMNS = (
    "bot", "ts_close", "close", "cash", "position", "equity", "unrealized_pnl", "realized_pnl", "fees_paid",
)  # fmt: skip


def trade_row(bot: str, ts: datetime, side: str, seq: int) -> tuple[object, ...]:
    return (
        bot, ts, side, seq, "PEPE-USDT", "1m", Decimal("0.000001230615"), Decimal("8125234567.123456789012"),
        Decimal("9999.123456789012345678"), Decimal(FEE), Decimal(BIG), Decimal("-0.0"), Decimal("1.2300"),
    )  # fmt: skip


def perf_row(bot: str, ts: datetime, equity: str) -> tuple[object, ...]:
    e = Decimal(equity)
    return (bot, ts, Decimal("0.000001234"), e, Decimal(0), e, Decimal(0), Decimal("-12.5"), Decimal(FEE))


def _frame(inst: str, trade_id: int, px: str, sz: str, ts: int) -> str:
    data = {"instId": inst, "tradeId": str(trade_id), "px": px, "sz": sz, "side": "buy", "ts": str(ts)}
    return json.dumps({"arg": {"channel": "trades", "instId": inst}, "data": [data]})


# ---- candles ----------------------------------------------------------------------------------


def test_candles_round_trip_equals_the_build_file(database: str, tmp_path: Path) -> None:
    """`tcp candles build` -> PostgreSQL -> `tcp export candles` gives back the very same table."""
    frames = tmp_path / "frames.jsonl"
    frames.write_text(
        "\n".join(
            [
                _frame("BTC-USDT", 1, "42000.1", "0.5", T0_MS + 1_000),
                _frame("BTC-USDT", 2, "42001.35", "0.00000001", T0_MS + 30_000),
                _frame("BTC-USDT", 3, "41999.9", "2", T0_MS + 200_000),  # flat candles between
                _frame("PEPE-USDT", 10, "0.000001234", "1000000", T0_MS + 5_000),
                _frame("PEPE-USDT", 11, "0.000001236", "2500000", T0_MS + 70_000),
            ]
        )
        + "\n"
    )
    built_path = tmp_path / "built.parquet"
    result = build_from_batches(ReplaySource(frames).iter_batches(), ["1m", "5m"])
    write_parquet(result.candles, built_path)
    built = pq.read_table(built_path)
    assert built.num_rows == 8 and built.schema.field("close").type == DECIMAL_TYPE

    rows = [tuple(r[c] for c in CANDLE_COLUMNS) for r in built.to_pylist()]
    random.Random(1).shuffle(rows)  # insertion order must not matter
    insert(database, "candles", CANDLE_COLUMNS, rows)

    out = tmp_path / "export.parquet"
    assert export_table(database, "candles", out, chunk_rows=3) == 8  # several chunks
    assert pq.read_schema(out) == pq.read_schema(built_path)
    assert pq.read_schema(out).names == list(CANDLE_COLUMNS)
    assert pq.read_table(out).equals(built)  # same values, same order (BTC 1m, BTC 5m, PEPE 1m, ...)
    assert export_schema("candles") == pq.read_schema(built_path)


def test_candle_numerics_are_exact_and_filters_work(database: str, tmp_path: Path) -> None:
    rows = [candle_row("PEPE-USDT", "1m", T0 + i * MIN, "0.000001234") for i in range(1, 6)]
    rows += [
        candle_row("BTC-USDT", "1m", T0 + MIN, BIG, volume="1"),
        candle_row("BTC-USDT", "5m", T0 + 5 * MIN, "42000.5"),
    ]
    rows.append(candle_row("BTC-USDT", "1m", T0 + 2 * MIN, "42000.5", flat=True))
    insert(database, "candles", CANDLE_COLUMNS, rows)

    out = tmp_path / "c.parquet"
    assert export_table(database, "candles", out) == 8
    table = pq.read_table(out)
    assert [(r["inst_id"], r["timeframe"]) for r in table.to_pylist()][:3] == [
        ("BTC-USDT", "1m"),
        ("BTC-USDT", "1m"),
        ("BTC-USDT", "5m"),
    ]
    first = table.to_pylist()[0]
    assert first["close"] == Decimal(BIG) and first["ts_close"] == T0 + MIN
    flat = table.to_pylist()[1]
    assert flat["vwap"] is None and flat["first_trade_id"] is None and flat["volume"] == 0

    n = export_table(
        database, "candles", out, inst_id="PEPE-USDT", timeframe="1m", start=T0 + 2 * MIN, end=T0 + 4 * MIN
    )
    got = pq.read_table(out).to_pylist()
    assert n == 2 and [r["ts_close"] for r in got] == [T0 + 2 * MIN, T0 + 3 * MIN]  # start <= t < end
    assert got[0]["close"] == Decimal("0.000001234") and got[0]["quote_volume"] == Decimal("1.234")
    assert pq.read_schema(out).field("close").type == DECIMAL_TYPE
    # epoch milliseconds and ISO strings select the same rows
    assert (
        export_table(
            database, "candles", out, inst_id="PEPE-USDT", start=T0_MS + 120_000, end=T0_MS + 240_000
        )
        == 2
    )
    start, end = parse_time("2024-01-01T00:02:00Z"), parse_time("2024-01-01T02:04:00+02:00")
    assert export_table(database, "candles", out, inst_id="PEPE-USDT", start=start, end=end) == 2
    assert export_table(database, "candles", out, timeframe="5m") == 1


def test_candles_fall_back_to_exact_strings_like_build(database: str, tmp_path: Path) -> None:
    tiny = "0.0000000000000000001"  # 19 decimals: does not fit decimal128(38, 18)
    rows = [candle_row("BTC-USDT", "1m", T0 + i * MIN, "42000.5") for i in range(1, 5)]
    rows.append(candle_row("SHIB-USDT", "1m", T0 + MIN, tiny))  # last in key order: in the last chunk
    insert(database, "candles", CANDLE_COLUMNS, rows)

    out = tmp_path / "c.parquet"
    with pytest.raises(ValueError, match="decimal128"):
        export_table(database, "candles", out, decimals="decimal")
    assert list(tmp_path.iterdir()) == []  # no file, no partial file

    assert export_table(database, "candles", out, chunk_rows=2) == 5  # auto: starts again with strings
    schema = pq.read_schema(out)
    assert schema == export_schema("candles", "string") and schema.field("open").type == pa.string()
    got = pq.read_table(out).to_pylist()
    assert [r["close"] for r in got] == ["42000.5"] * 4 + [tiny]
    assert got[-1]["quote_volume"] == "0.0000000000001"  # canonical: no exponent, no trailing zeros
    assert got[0]["quote_volume"] == "42000500000"


# ---- signals, bot fills, bot equity -----------------------------------------------------------


def test_signals_export(database: str, tmp_path: Path) -> None:
    rows = [
        signal_row("rsi", "PEPE-USDT", "1m", T0 + 2 * MIN, "0.000001234"),
        signal_row("ema", "PEPE-USDT", "1m", T0 + MIN, "0.000001234"),
        signal_row("ema", "BTC-USDT", "5m", T0 + 5 * MIN, BIG),
        signal_row("ema", "PEPE-USDT", "1m", T0 + 3 * MIN, "0.00000124"),
    ]
    insert(database, "signals", SIGNAL_COLUMNS, rows)
    out = tmp_path / "s.parquet"
    assert export_table(database, "signals", out) == 4
    schema = pq.read_schema(out)
    assert schema.names == list(SIGNAL_COLUMNS)
    assert schema.field("ts_close").type == TS_US and schema.field("price").type == pa.string()
    assert schema.field("indicators").type == pa.string()
    got = pq.read_table(out).to_pylist()
    assert [(r["strategy"], r["inst_id"], r["ts_close"]) for r in got] == [
        ("ema", "BTC-USDT", T0 + 5 * MIN),
        ("ema", "PEPE-USDT", T0 + MIN),
        ("ema", "PEPE-USDT", T0 + 3 * MIN),
        ("rsi", "PEPE-USDT", T0 + 2 * MIN),
    ]
    assert got[0]["price"] == BIG and got[1]["price"] == "0.000001234"
    assert json.loads(got[1]["indicators"]) == {
        "ema_fast": "0.0000012341",
        "rsi": 71.5,
        "nested": {"ok": True},
    }
    assert got[1]["reason"] == "ema crossed" and got[1]["action"] == "buy"

    n = export_table(
        database, "signals", out, strategy="ema", inst_id="PEPE-USDT", timeframe="1m", end=T0 + 3 * MIN
    )
    assert n == 1 and pq.read_table(out).column("ts_close").to_pylist() == [T0 + MIN]


def test_bot_trades_export_is_exact_and_in_key_order(database: str, tmp_path: Path) -> None:
    rows = [
        trade_row("b2", T0 + MIN, "buy", 1),
        trade_row("b1", T0 + 2 * MIN, "sell", 2),
        trade_row("b1", T0 + 2 * MIN, "buy", 3),
        trade_row("b1", T0 + MIN, "buy", 1),
    ]
    insert(database, "bot_trades", TRADE_COLUMNS, rows)
    out = tmp_path / "t.parquet"
    assert export_table(database, "bot-trades", out, bot="b1") == 3
    schema = pq.read_schema(out)
    assert schema.names == list(TRADE_COLUMNS)
    assert schema.field("ts").type == TS_US and schema.field("seq").type == pa.int64()
    for name in TRADE_COLUMNS[6:]:
        assert schema.field(name).type == pa.string(), name
    got = pq.read_table(out).to_pylist()
    assert [(r["ts"], r["side"], r["seq"]) for r in got] == [
        (T0 + MIN, "buy", 1),
        (T0 + 2 * MIN, "buy", 3),
        (T0 + 2 * MIN, "sell", 2),
    ]
    r = got[0]
    assert (r["price"], r["size"], r["notional"]) == (
        "0.000001230615",
        "8125234567.123456789012",
        "9999.123456789012345678",
    )
    assert r["fee"] == FEE.rstrip("0") and Decimal(r["fee"]) == Decimal(FEE)  # all 30 decimals kept
    assert (r["cash_after"], r["position_after"], r["realized_pnl"]) == (BIG, "0", "1.23")

    assert export_table(database, "bot-trades", out, inst_id="PEPE-USDT", timeframe="1m") == 4
    assert export_table(database, "bot-trades", out, inst_id="BTC-USDT") == 0


def test_bot_performance_time_range_is_start_inclusive_end_exclusive(database: str, tmp_path: Path) -> None:
    rows = [perf_row("b1", T0 + i * MIN, f"10000.00000000000{i}") for i in range(5)]
    rows.append(perf_row("b2", T0 + 2 * MIN, "1"))
    insert(database, "bot_performance", PERF_COLUMNS, rows)
    out = tmp_path / "p.parquet"
    assert export_table(database, "bot-performance", out, bot="b1", start=T0 + MIN, end=T0 + 3 * MIN) == 2
    got = pq.read_table(out).to_pylist()
    assert [r["ts_close"] for r in got] == [T0 + MIN, T0 + 2 * MIN]
    assert [r["equity"] for r in got] == ["10000.000000000001", "10000.000000000002"]
    assert got[0]["fees_paid"] == FEE.rstrip("0") and got[0]["realized_pnl"] == "-12.5"
    assert pq.read_schema(out).names == list(PERF_COLUMNS)
    assert export_table(database, "bot-performance", out, start=T0 + 2 * MIN) == 4  # b1 x3, b2
    assert [r["bot"] for r in pq.read_table(out).to_pylist()] == ["b1", "b1", "b1", "b2"]


@pytest.mark.parametrize("table", EXPORT_TABLES)
def test_an_empty_export_is_a_valid_file_with_the_schema(
    database: str, tmp_path: Path, table: ExportTable
) -> None:
    out = tmp_path / f"{table}.parquet"
    assert export_table(database, table, out) == 0
    assert pq.read_schema(out) == export_schema(table)
    assert pq.read_table(out).num_rows == 0
    assert len(pq.read_schema(out)) > 5


# ---- errors and the command -------------------------------------------------------------------


def test_bad_filters_are_refused_before_any_query() -> None:
    with pytest.raises(ValueError, match=r"bot-performance cannot be filtered by inst_id \(its filters: bot"):
        check_filters("bot-performance", inst_id="BTC-USDT")
    with pytest.raises(ValueError, match="candles cannot be filtered by bot"):
        check_filters("candles", bot="b1")
    with pytest.raises(ValueError, match="signals cannot be filtered by bot"):
        check_filters("signals", bot="b1")
    with pytest.raises(ValueError, match="must be after start"):
        check_filters("candles", start=T0, end=T0)
    with pytest.raises(ValueError, match="naive"):
        check_filters("candles", start=datetime(2024, 1, 1))  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError, match="unknown table 'trades'"):
        check_filters("trades")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inst_id filter is empty"):
        check_filters("candles", inst_id="")
    check_filters("bot-trades", bot="b1", inst_id="BTC-USDT", timeframe="1m", start=0, end=T0)


def test_parse_time() -> None:
    assert parse_time("2024-01-01") == T0  # no offset: UTC
    assert parse_time("2024-01-01T02:00:00+02:00") == T0
    assert parse_time("2024-01-01T00:00:00Z") == T0
    assert parse_time(str(T0_MS + 1)) == T0 + timedelta(milliseconds=1)
    assert parse_time("2024-01-01").tzinfo is UTC
    with pytest.raises(ValueError, match="ISO-8601 .* or epoch milliseconds, got 'yesterday'"):
        parse_time("yesterday")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tcp")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cmd_export(
    database: str, services_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    insert(
        database, "bot_trades", TRADE_COLUMNS, [trade_row("b1", T0 + i * MIN, "buy", i) for i in range(1, 4)]
    )
    settings = services_settings.model_copy(update={"postgres_dsn": SecretStr(database)})
    out = tmp_path / "fills.parquet"
    args = _parser().parse_args(
        ["export", "bot-trades", "--out", str(out), "--bot", "b1", "--start", str(T0_MS + 120_000)]
    )
    assert args.func is cmd_export
    assert args.func(args, settings) == 0
    assert capsys.readouterr().out.strip() == f"2 rows -> {out}"
    assert pq.read_table(out).column("seq").to_pylist() == [2, 3]

    args = _parser().parse_args(["export", "bot-performance", "--out", str(out), "--strategy", "ema"])
    assert cmd_export(args, settings) == 2
    assert "error: bot-performance cannot be filtered by strategy" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        _parser().parse_args(["export", "candles", "--out", str(out), "--start", "soon"])
    assert "epoch milliseconds, got 'soon'" in capsys.readouterr().err
