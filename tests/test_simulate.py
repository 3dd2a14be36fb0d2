"""connectors.simulate: a seeded market that looks like OKX's, and its JSON-lines writer."""

from __future__ import annotations

import asyncio
import gzip
import shlex
import time
from collections import defaultdict
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors import simulate
from connectors.replay import ReplaySource
from connectors.simulate import (
    INSTRUMENT_SPECS,
    SimulatedSource,
    format_units,
    main,
    spec_for,
    write_frames,
    write_simulated,
)
from tcp.config import DEFAULT_INSTRUMENTS
from tcp.schemas import Trade, decode_trade, encode

T0 = 1_735_689_600_000  # 2025-01-01T00:00:00Z
SAMPLE = Path(__file__).resolve().parents[1] / "tcp" / "data" / "sample-trades.jsonl.gz"


def run(seed: int = 7, trades: int = 20_000, **kwargs: object) -> list[Trade]:
    return list(SimulatedSource(seed=seed, trades=trades, start_ms=T0, **kwargs).iter_trades())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trades() -> list[Trade]:
    return run()


def by_instrument(trades: list[Trade]) -> dict[str, list[Trade]]:
    out: dict[str, list[Trade]] = defaultdict(list)
    for trade in trades:
        out[trade.inst_id].append(trade)
    return out


def test_same_seed_same_trades_other_seed_other_trades(trades: list[Trade]) -> None:
    assert run() == trades
    assert run(seed=8) != trades


def test_async_batches_give_the_same_trades_as_the_iterator(trades: list[Trade]) -> None:
    async def collect() -> list[Trade]:
        source = SimulatedSource(seed=7, trades=len(trades), start_ms=T0)
        return [item async for batch in source.batches() for item in batch if isinstance(item, Trade)]

    got = asyncio.run(collect())
    assert all(t.received_at > 0 for t in got)
    assert [msgspec.structs.replace(t, received_at=0) for t in got] == trades


def test_every_default_instrument_trades_and_event_time_never_goes_back(trades: list[Trade]) -> None:
    assert set(by_instrument(trades)) == set(DEFAULT_INSTRUMENTS)
    assert all(a.ts <= b.ts for a, b in zip(trades, trades[1:], strict=False))
    assert trades[0].ts >= T0
    assert all(t.origin == "sim" for t in trades)


def test_ids_ascend_per_instrument_and_jump_by_count(trades: list[Trade]) -> None:
    for series in by_instrument(trades).values():
        for previous, trade in zip(series, series[1:], strict=False):
            assert trade.trade_id - previous.trade_id == trade.count  # tradeId is the LAST id
            assert trade.seq_id is not None and previous.seq_id is not None
            assert trade.seq_id > previous.seq_id
    assert any(t.count > 1 for t in trades)
    assert any(t.source == 1 for t in trades)


def test_same_millisecond_trades_at_different_prices_exist(trades: list[Trade]) -> None:
    prices: dict[tuple[str, int], set[str]] = defaultdict(set)
    for trade in trades:
        prices[(trade.inst_id, trade.ts)].add(trade.px)
    assert any(len(p) > 1 for p in prices.values())


def test_prices_on_tick_sizes_on_lot_and_above_minimum(trades: list[Trade]) -> None:
    for trade in trades:
        spec = INSTRUMENT_SPECS[trade.inst_id]
        assert Decimal(trade.px) % Decimal(spec.tick_sz) == 0, trade
        assert Decimal(trade.sz) % Decimal(spec.lot_sz) == 0, trade
        assert Decimal(trade.sz) >= Decimal(spec.min_sz), trade
        assert "e" not in trade.px.lower() and "e" not in trade.sz.lower()


def test_prices_stay_plausible(trades: list[Trade]) -> None:
    for inst_id, series in by_instrument(trades).items():
        start = Decimal(INSTRUMENT_SPECS[inst_id].start_px)
        for trade in series:
            assert start * Decimal("0.8") < trade.price < start * Decimal("1.2"), trade
    pepe = by_instrument(trades)["PEPE-USDT"]
    assert all(len(t.px.split(".")[1]) <= 8 for t in pepe)
    assert all(Decimal("0.000008") < t.price < Decimal("0.000012") for t in pepe)


def test_every_trade_passes_validation(trades: list[Trade]) -> None:
    for trade in trades:
        assert decode_trade(encode(trade)) == trade


def test_other_instruments_get_a_generic_spec() -> None:
    got = run(trades=500, instruments=("XRP-USDT", "BTC-USDT-SWAP"))
    assert {t.inst_id for t in got} == {"XRP-USDT", "BTC-USDT-SWAP"}
    assert spec_for("XRP-USDT") == spec_for("XRP-USDT")
    for trade in got:
        assert decode_trade(encode(trade)) == trade
        assert Decimal(trade.px) % Decimal(spec_for(trade.inst_id).tick_sz) == 0


def test_trades_and_end_ms_bound_the_run() -> None:
    assert len(run(trades=123)) == 123
    bounded = list(SimulatedSource(seed=1, start_ms=T0, end_ms=T0 + 60_000).iter_trades())
    assert bounded
    assert all(t.ts < T0 + 60_000 for t in bounded)
    # About DEFAULT_EVENT_RATE (20) pushes a second: a minute gives hundreds, not tens of thousands.
    assert 200 < len(bounded) < 5_000


def test_rate_paces_the_source_and_follows_the_wall_clock() -> None:
    async def collect(source: SimulatedSource) -> tuple[list[Trade], float]:
        started = time.monotonic()
        got = [item async for batch in source.batches() for item in batch if isinstance(item, Trade)]
        return got, time.monotonic() - started

    paced, paced_s = asyncio.run(collect(SimulatedSource(seed=3, trades=300, rate=2000)))
    fast, fast_s = asyncio.run(collect(SimulatedSource(seed=3, trades=300, start_ms=T0)))
    assert len(paced) == len(fast) == 300
    assert paced_s > fast_s
    assert 0.02 < paced_s < 10  # ~0.15 s expected; bursts make it vary
    now = int(time.time() * 1000)
    assert abs(paced[0].ts - now) < 60_000  # start_ms defaults to now: event time is live


@given(st.integers(min_value=0, max_value=10**30), st.integers(min_value=0, max_value=18))
def test_format_units_is_exact_plain_notation(units: int, scale: int) -> None:
    text = format_units(units, scale)
    assert Fraction(Decimal(text)) == Fraction(units, 10**scale)  # exact, whatever the digits
    assert "e" not in text.lower() and not text.startswith(".")
    if "." in text:
        assert not text.endswith("0") and not text.endswith(".")


def test_format_units_examples() -> None:
    assert format_units(602199, 1) == "60219.9"
    assert format_units(602190, 1) == "60219"
    assert format_units(12, 8) == "0.00000012"
    assert format_units(1001, 8) == "0.00001001"
    assert format_units(0, 3) == "0"


def test_written_frames_replay_to_the_same_trades(tmp_path: Path, trades: list[Trade]) -> None:
    for name in ("run.jsonl", "run.jsonl.gz"):
        path = tmp_path / name
        written = write_frames(path, trades, instruments=DEFAULT_INSTRUMENTS, resubscribe_every=5_000)
        assert written == len(trades)
        source = ReplaySource(path)
        replayed = [item for batch in source.iter_batches() for item in batch]
        assert all(isinstance(t, Trade) and t.origin == "replay" for t in replayed)
        as_sim = [msgspec.structs.replace(t, origin="sim", received_at=0) for t in replayed]
        assert as_sim == trades
        assert source.stats.skipped == {"subscribed": len(DEFAULT_INSTRUMENTS) * (1 + len(trades) // 5_000)}


def test_written_frames_have_okx_shape(tmp_path: Path) -> None:
    path = tmp_path / "few.jsonl"
    write_simulated(path, seed=1, start_ms=T0, trades=50, instruments=("BTC-USDT",))
    lines = path.read_text().splitlines()
    assert msgspec.json.decode(lines[0]) == {
        "event": "subscribe",
        "arg": {"channel": "trades", "instId": "BTC-USDT"},
    }
    push = msgspec.json.decode(lines[1])
    assert push["arg"] == {"channel": "trades", "instId": "BTC-USDT"}
    (item,) = push["data"]
    assert set(item) == {"instId", "tradeId", "px", "sz", "side", "ts", "count", "source", "seqId"}
    assert all(isinstance(item[k], str) for k in ("tradeId", "px", "sz", "ts", "count", "source"))
    assert isinstance(item["seqId"], int)
    with pytest.raises(ValueError):
        write_simulated(path, start_ms=T0)


def test_the_bundled_sample_is_what_the_documented_command_makes(tmp_path: Path) -> None:
    again = tmp_path / "again.jsonl.gz"
    # The command written in connectors/simulate.py's docstring, with another output file.
    doc = simulate.__doc__ or ""
    command = doc[doc.index("python -m connectors.simulate") :].split("\n\n")[0].replace("\\\n", " ")
    args = shlex.split(command)[3:]
    assert args[0] == "tcp/data/sample-trades.jsonl.gz"
    assert main([str(again), *args[1:]]) == 0
    assert gzip.decompress(again.read_bytes()) == gzip.decompress(SAMPLE.read_bytes())
    assert SAMPLE.stat().st_size < 2_000_000


def test_the_bundled_sample_replays_cleanly() -> None:
    source = ReplaySource(SAMPLE)
    items = [item for batch in source.iter_batches() for item in batch]
    trades = [t for t in items if isinstance(t, Trade)]
    assert len(trades) == len(items) > 50_000
    assert {t.inst_id for t in trades} == set(DEFAULT_INSTRUMENTS)
    assert trades[0].ts >= T0 and trades[-1].ts < T0 + 2 * 3_600_000
    assert trades[-1].ts - trades[0].ts > 1.9 * 3_600_000
