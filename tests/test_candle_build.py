"""Batch mode: build_candles against the reference aggregation, and the Parquet output."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataflows.build import (
    DECIMAL_TYPE,
    build_candles,
    build_from_batches,
    candles_table,
    read_parquet,
    write_parquet,
)
from dataflows.candle_core import Candle
from tcp.schemas import DeadLetter, Trade
from tests.reference_candles import generate_arrivals, reference_candles

ALL = ["1m", "5m", "15m", "1h", "4h", "1d"]
T0 = 1_704_067_200_000  # 2024-01-01 00:00:00 UTC


@pytest.fixture(scope="module")
def trades() -> list[Trade]:
    """200k trades in arrival order: out of order, duplicates, PEPE prices, a midnight, gaps."""
    return [a.trade for a in generate_arrivals(200_000, seed=3)]


def test_build_matches_reference_on_200k_trades(trades: list[Trade]) -> None:
    got = build_candles(trades, ALL)
    want = reference_candles(trades, ALL)
    assert got == want  # same candles, same order, field by field
    assert all(c.revision == 0 for c in got)
    assert {c.timeframe for c in got} == set(ALL)
    assert len({c.inst_id for c in got}) == 4


def test_build_skip_policy_matches_reference(trades: list[Trade]) -> None:
    part = trades[:50_000]
    got = build_candles(part, ["1m", "1h", "1d"], empty="skip")
    assert got == reference_candles(part, ["1m", "1h", "1d"], empty="skip")
    assert not any(c.is_flat for c in got)


def test_build_ignores_file_order_and_chunking(trades: list[Trade]) -> None:
    part = trades[:20_000]
    want = build_candles(part, ["1m", "15m"])
    shuffled = part[:]
    random.Random(5).shuffle(shuffled)  # far out of order: no lateness in batch mode
    assert build_candles(shuffled, ["1m", "15m"], chunk_size=777) == want
    assert build_candles(reversed(part), "15m,1m") == want


def test_build_from_batches_counts_dead_letters(trades: list[Trade]) -> None:
    part = trades[:5_000]
    dead = DeadLetter(reason="bad px", where="replay:x:1", at=0, raw="{}")
    batches: list[list[Trade | DeadLetter]] = [[*part[:2_500], dead], [dead, *part[2_500:]]]
    result = build_from_batches(batches, ["1m"])
    assert result.dead_letters == 2
    assert result.trades == 5_000
    assert result.stats.duplicates == 5_000 - len({(t.inst_id, t.trade_id) for t in part})
    assert result.candles == build_candles(part, ["1m"])


def test_empty_input_builds_nothing() -> None:
    assert build_candles([], ALL) == []


def test_million_trades_match_reference() -> None:
    """The 1M-trade run (about 15 s): batch build equals the reference field by field."""
    trades = [a.trade for a in generate_arrivals(1_000_000, seed=99, span_ms=26 * 3_600_000)]
    assert build_candles(trades, ALL) == reference_candles(trades, ALL)


# ---- Parquet ----------------------------------------------------------------------------------


def test_parquet_round_trip_with_decimal128(tmp_path: Path, trades: list[Trade]) -> None:
    candles = build_candles(trades[:30_000], ALL)
    path = tmp_path / "candles.parquet"
    table = write_parquet(candles, path)
    schema = pq.read_schema(path)
    assert schema.field("ts_close").type == pa.timestamp("ms", tz="UTC")
    for name in ("open", "high", "low", "close", "volume", "quote_volume", "vwap"):
        assert schema.field(name).type == DECIMAL_TYPE, name
    assert schema.field("first_trade_id").type == pa.int64()
    assert table.num_rows == len(candles)
    assert read_parquet(path) == candles  # exact, PEPE prices included


def test_parquet_reads_in_duckdb(tmp_path: Path) -> None:
    trades = [
        Trade("PEPE-USDT", 1, "0.00000123", "1000000", "buy", T0 + 1_000, "sim"),
        Trade("PEPE-USDT", 2, "0.00000125", "2000000", "sell", T0 + 61_000, "sim"),
    ]
    path = tmp_path / "pepe.parquet"
    write_parquet(build_candles(trades, ["1m"]), path)
    rows = (
        duckdb.connect()
        .execute(f"SELECT epoch_ms(ts_close), close, volume, quote_volume FROM '{path}' ORDER BY ts_close")
        .fetchall()
    )
    assert rows == [
        (T0 + 60_000, Decimal("0.00000123"), Decimal("1000000"), Decimal("1.23")),
        (T0 + 120_000, Decimal("0.00000125"), Decimal("2000000"), Decimal("2.5")),
    ]


def test_parquet_falls_back_to_strings_when_decimal128_cannot_hold_a_value(tmp_path: Path) -> None:
    tiny = [Trade("SHIB-USDT", 1, "0.0000000000000000001", "3", "buy", T0, "sim")]  # 19 decimals
    candles = build_candles(tiny, ["1m"])
    with pytest.raises(ValueError, match="decimal128"):
        candles_table(candles, decimals="decimal")
    path = tmp_path / "tiny.parquet"
    write_parquet(candles, path)  # auto: strings, exact
    assert pq.read_schema(path).field("open").type == pa.string()
    assert read_parquet(path) == candles
    assert candles[0].quote_volume == "0.0000000000000000003"


def test_parquet_string_mode_and_flat_nulls(tmp_path: Path) -> None:
    trades = [
        Trade("BTC-USDT", 1, "67000.1", "0.5", "buy", T0, "sim"),
        Trade("BTC-USDT", 2, "67001", "0.25", "buy", T0 + 180_000, "sim"),
    ]
    candles = build_candles(trades, ["1m"])
    assert [c.is_flat for c in candles] == [False, True, True, False]
    path = tmp_path / "s.parquet"
    table = write_parquet(candles, path, decimals="string")
    assert table.schema.field("close").type == pa.string()
    assert table.column("vwap").null_count == 2
    assert table.column("first_trade_id").null_count == 2
    back = read_parquet(path)
    assert back == candles
    assert isinstance(back[1], Candle) and back[1].vwap is None
