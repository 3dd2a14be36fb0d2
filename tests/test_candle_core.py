"""The candle core, streaming: every rule of docs/candles.md, against the reference aggregation."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterable, Sequence
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from itertools import groupby

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataflows.build import build_candles
from dataflows.candle_core import (
    Candle,
    CandleBook,
    Emitted,
    InstrumentCandles,
    LateTrade,
    decode_candle,
    decode_late_trade,
    encode_candle,
    parse_timeframes,
)
from tcp.schemas import Trade
from tests.reference_candles import Arrival, generate_arrivals, plain, reference_candles

ALL = ["1m", "5m", "15m", "1h", "4h", "1d"]
T0 = 1_704_067_200_000  # 2024-01-01 00:00:00 UTC
MIN = 60_000
Key = tuple[str, str, int]


def trade(
    trade_id: int, at: int, px: str = "100", sz: str = "1", inst: str = "BTC-USDT", count: int = 1
) -> Trade:
    """A trade ``at`` ms after T0."""
    return Trade(inst, trade_id, px, sz, "buy", T0 + at, "sim", count=count)


def key(c: Candle) -> Key:
    return (c.inst_id, c.timeframe, c.ts_close)


def latest(candles: Iterable[Candle]) -> dict[Key, Candle]:
    """The last revision of every candle."""
    result: dict[Key, Candle] = {}
    for c in candles:
        have = result.get(key(c))
        assert have is None or c.revision > have.revision, f"revision did not grow: {have} -> {c}"
        result[key(c)] = c
    return result


def run_stream(
    arrivals: Sequence[Arrival],
    timeframes: Sequence[str],
    *,
    window_ms: int = 100,
    tick_every: int = 7,
    pickle_at: int | None = None,
    **options: object,
) -> tuple[Emitted, CandleBook]:
    """Feed arrivals in 100 ms windows (``now`` = end of window), tick idle instruments, close.

    Checks on the way that no candle is emitted before its instrument's watermark passed it.
    """
    book = CandleBook(timeframes, **options)  # type: ignore[arg-type]
    for inst in sorted({a.trade.inst_id for a in arrivals}):
        book.state(inst)
    out = Emitted()

    def take(emitted: Emitted) -> None:
        for c in emitted.candles:
            assert c.ts_close <= book.states[c.inst_id].watermark, f"emitted before final: {c}"
        out.extend(emitted)

    for k, (window, group) in enumerate(groupby(arrivals, key=lambda a: a.at // window_ms)):
        now = (window + 1) * window_ms - 1
        take(book.on_trades([a.trade for a in group], now))
        if k % tick_every == 0:
            take(book.on_tick(now))
        if pickle_at == k:
            book = pickle.loads(pickle.dumps(book))
    take(book.close_all())
    return out, book


def assert_matches(got: dict[Key, Candle], expected: list[Candle], *, revised: bool = False) -> None:
    """Field-by-field equality; extra candles are allowed only as trailing flat candles.

    ``revised``: compare everything but the revision number (late trades were merged in).
    """
    if revised:
        got = {k: msgspec.structs.replace(c, revision=0) for k, c in got.items()}
    want = {key(c): c for c in expected}
    last_close: dict[tuple[str, str], Candle] = {}
    for c in expected:
        last_close[(c.inst_id, c.timeframe)] = c
    for k, c in want.items():
        assert got.get(k) == c, f"{k}: got {got.get(k)}\nwant {c}"
    for k, c in got.items():
        if k not in want:
            last = last_close[(c.inst_id, c.timeframe)]
            assert c.ts_close > last.ts_close and c.is_flat and c.close == last.close, c


# ---- the big one: streaming == reference ----------------------------------------------------


@pytest.fixture(scope="module")
def arrivals() -> list[Arrival]:
    return generate_arrivals(200_000, seed=7)


def test_stream_matches_reference_on_200k_trades(arrivals: list[Arrival]) -> None:
    out, book = run_stream(arrivals, ALL)
    assert out.late == []  # every trade arrived within the allowed lateness
    assert all(c.revision == 0 for c in out.candles)
    got = latest(out.candles)
    assert len(got) == len(out.candles), "a candle was emitted twice"
    expected = reference_candles((a.trade for a in arrivals), ALL)
    assert_matches(got, expected)
    stats = book.stats
    assert stats.trades == len(arrivals)
    assert stats.duplicates == len(arrivals) - len({(a.trade.inst_id, a.trade.trade_id) for a in arrivals})
    assert stats.duplicates > 1000
    # the awkward cases really are in the data
    trades = [a.trade for a in arrivals]
    assert any(t.ts % MIN == 0 for t in trades)
    assert any(t.ts % 86_400_000 == 0 for t in trades)
    assert any(c.timeframe == "1d" and c.inst_id == "BTC-USDT" for c in out.candles)
    assert any(t.px.startswith("0.000001") for t in trades)
    assert any(c.is_flat and c.timeframe == "1h" for c in out.candles)


def test_stream_skip_policy_matches_reference(arrivals: list[Arrival]) -> None:
    part = arrivals[:40_000]
    out, _ = run_stream(part, ["1m", "15m", "1h"], empty="skip")
    got = latest(out.candles)
    assert not any(c.is_flat for c in got.values())
    assert_matches(got, reference_candles((a.trade for a in part), ["1m", "15m", "1h"], empty="skip"))


def test_snapshot_mid_stream_gives_identical_output(arrivals: list[Arrival]) -> None:
    part = arrivals[:30_000]
    plain_run, _ = run_stream(part, ALL)
    restored_run, _ = run_stream(part, ALL, pickle_at=5_000)
    assert restored_run.candles == plain_run.candles
    assert restored_run.late == plain_run.late


def test_snapshot_and_restore_methods() -> None:
    state = InstrumentCandles("BTC-USDT", ["1m"])
    state.on_trades([trade(1, 1_000), trade(2, 2_000)], 0)
    restored = InstrumentCandles.restore(state.snapshot())
    deep = copy.deepcopy(state)  # what a Bytewax snapshot may do instead of pickling
    more = [trade(3, 61_000, "105"), trade(4, 125_000, "99"), trade(2, 2_000)]
    want = state.on_trades(more, 0)
    assert want.candles and restored.on_trades(more, 0) == want == deep.on_trades(more, 0)
    want = state.close_all()
    assert restored.close_all() == want == deep.close_all()
    with pytest.raises(TypeError):
        InstrumentCandles.restore(pickle.dumps({"not": "a state"}))


# ---- candle contents ------------------------------------------------------------------------


def test_close_time_labels_and_boundaries() -> None:
    state = InstrumentCandles("BTC-USDT", ["1m", "1d"], lateness_ms=None)
    state.on_trades([trade(1, 0), trade(2, MIN - 1, "101"), trade(3, MIN, "102")], 0)
    candles = state.close_all().candles
    one_minute = [c for c in candles if c.timeframe == "1m"]
    assert [(c.ts_close, c.open, c.close) for c in one_minute] == [
        (T0 + MIN, "100", "101"),
        (T0 + 2 * MIN, "102", "102"),
    ]
    assert one_minute[0].ts_open == T0
    (day,) = [c for c in candles if c.timeframe == "1d"]
    assert day.ts_close == T0 + 86_400_000  # the day of 2024-01-01, aligned to UTC midnight
    assert (day.open, day.close, day.trade_count) == ("100", "102", 3)


def test_event_order_not_arrival_order_decides_open_and_close() -> None:
    trades = [
        trade(12, 5_000, "103"),
        trade(10, 5_000, "101"),  # same millisecond, smaller id: first in event order
        trade(11, 5_000, "102"),
        trade(9, 7_000, "104"),  # later ts wins over a smaller id
        trade(13, 1_000, "100"),
    ]
    state = InstrumentCandles("BTC-USDT", ["1m"])
    state.on_trades(trades, 0)
    (c,) = state.close_all().candles
    assert (c.open, c.close, c.first_trade_id, c.last_trade_id) == ("100", "104", 13, 9)
    assert (c.high, c.low, c.trade_count) == ("104", "100", 5)


def test_fields_are_exact_and_canonical() -> None:
    trades = [
        trade(1, 1_000, "0.00000123", "12345678.9", inst="PEPE-USDT", count=3),
        trade(2, 2_000, "0.00000125", "1000", inst="PEPE-USDT"),
        trade(3, 3_000, "0.00000120", "0.1", inst="PEPE-USDT"),  # trailing zero in the input
    ]
    (c,) = build_candles(trades, ["1m"])
    assert (c.open, c.high, c.low, c.close) == ("0.00000123", "0.00000125", "0.0000012", "0.0000012")
    assert c.volume == "12346679"
    assert c.quote_volume == plain(
        Decimal("0.00000123") * Decimal("12345678.9") + Decimal("0.00125") + Decimal("0.00000012")
    )
    assert c.trade_count == 5
    with localcontext() as ctx:
        ctx.prec = 100
        vwap = (Decimal(c.quote_volume) / Decimal(c.volume)).quantize(Decimal("1e-18"), ROUND_HALF_EVEN)
    assert c.vwap == plain(vwap)
    assert "e" not in c.quote_volume.lower() and "e" not in (c.vwap or "").lower()


def test_vwap_rounds_half_even_to_18_decimals() -> None:
    (b,) = build_candles([trade(1, 0, "2", "1"), trade(2, 1, "1", "2")], ["1m"])  # 4 / 3
    assert b.vwap == "1.333333333333333333"
    (c,) = build_candles([trade(1, 0, "2", "1"), trade(2, 1, "1", "1"), trade(3, 2, "1", "1")], ["1m"])
    assert c.vwap == "1.333333333333333333"
    cases = {
        "0.0000000000000000005": "0",  # a tie: rounds to the even neighbour, 0
        "0.0000000000000000015": "0.000000000000000002",  # tie -> 2e-18
        "0.0000000000000000025": "0.000000000000000002",  # tie -> 2e-18
        "0.00000000000000000251": "0.000000000000000003",
    }
    for px, want in cases.items():
        (d,) = build_candles([trade(1, 0, px, "1")], ["1m"])
        assert d.vwap == want, px


def test_duplicates_count_once() -> None:
    t1, t2 = trade(1, 1_000, "100", "2"), trade(2, 2_000, "101", "3")
    state = InstrumentCandles("BTC-USDT", ["1m"])
    state.on_trades([t1, t2, t1], 0)
    state.on_trades([t2], 0)
    (c,) = state.close_all().candles
    assert (c.volume, c.trade_count) == ("5", 2)
    assert state.stats.duplicates == 2
    # a duplicate of a trade already folded into the forming aggregate (forming(), compact())
    state = InstrumentCandles("BTC-USDT", ["1m"])
    state.on_trades([t1], 0)
    state.forming()
    state.on_trades([t2, t1], 0)
    state.compact()
    state.on_trades([t2], 0)
    (c,) = state.close_all().candles
    assert (c.volume, c.trade_count, state.stats.duplicates) == ("5", 2, 2)
    # remembered ids as a run (range) and as a set, folded chunk by chunk
    state = InstrumentCandles("BTC-USDT", ["1m"])
    for ids in ([1, 2, 3], [4, 5], [2], [9, 7], [5, 7, 8], [8, 10]):
        state.on_trades([trade(i, i * 100) for i in ids], 0)
        state.compact()
    (c,) = state.close_all().candles
    assert (c.trade_count, c.first_trade_id, c.last_trade_id, state.stats.duplicates) == (9, 1, 10, 4)


def test_flat_and_skip_policies() -> None:
    trades = [trade(1, 10_000, "100"), trade(2, 4 * MIN + 1, "105")]
    flat = build_candles(trades, ["1m"], empty="flat")
    assert [(c.ts_close - T0) // MIN for c in flat] == [1, 2, 3, 4, 5]
    middle = flat[1]
    assert (middle.open, middle.high, middle.low, middle.close) == ("100",) * 4
    assert (middle.volume, middle.quote_volume, middle.trade_count, middle.vwap) == ("0", "0", 0, None)
    assert (middle.first_trade_id, middle.last_trade_id) == (None, None)
    skip = build_candles(trades, ["1m"], empty="skip")
    assert [(c.ts_close - T0) // MIN for c in skip] == [1, 5]


def test_flat_candles_start_at_the_first_candle_and_follow_the_watermark() -> None:
    state = InstrumentCandles("BTC-USDT", ["1m", "5m"])
    out = state.on_trades([trade(1, 3 * MIN + 5, "100")], 0)
    assert out.candles == []  # nothing before the instrument's first candle
    out = state.on_trades([trade(2, 9 * MIN + 2_500, "101")], 0)  # wm = 9m + 0.5s
    assert [(c.timeframe, (c.ts_close - T0) // MIN, c.is_flat) for c in out.candles] == [
        ("1m", 4, False),
        ("1m", 5, True),
        ("5m", 5, False),
        ("1m", 6, True),
        ("1m", 7, True),
        ("1m", 8, True),
        ("1m", 9, True),
    ]


# ---- watermark ------------------------------------------------------------------------------


def test_candle_final_only_after_lateness() -> None:
    state = InstrumentCandles("BTC-USDT", ["1m"], lateness_ms=2_000)
    assert state.on_trades([trade(1, 30_000)], 0).candles == []
    assert state.on_trades([trade(2, MIN + 1_999)], 0).candles == []  # wm = 59.999 s
    out = state.on_trades([trade(3, MIN + 2_000)], 0)  # wm = 60 s: the candle [0, 60 s) is final
    assert [c.ts_close for c in out.candles] == [T0 + MIN]


def test_idle_watermark_advances_with_wall_clock() -> None:
    now = 1_900_000_000_000  # "today": far from the event times, must not matter
    state = InstrumentCandles("BTC-USDT", ["1m"], lateness_ms=2_000)
    state.on_trades([trade(1, 10_000)], now)
    assert state.watermark == T0 + 8_000
    assert state.notify_at() == now + 52_000  # wm reaches 60 s after 52 s of silence
    assert state.on_tick(now + 51_999).candles == []
    (c,) = state.on_tick(now + 52_000).candles
    assert c.ts_close == T0 + MIN
    assert state.notify_at() == now + 112_000  # next: the flat candle at 2 min
    (flat,) = state.on_tick(now + 112_000).candles
    assert flat.is_flat and flat.ts_close == T0 + 2 * MIN
    # the wall clock going back does not move the watermark back
    assert state.on_tick(now).candles == []
    assert state.watermark == T0 + 2 * MIN


def test_fast_replay_of_old_data_uses_event_time_only() -> None:
    now = 1_900_000_000_000
    trades = [trade(i, i * 7_000) for i in range(1, 60)]
    fast = InstrumentCandles("BTC-USDT", ALL)
    out = fast.on_trades(trades, now)
    out.extend(fast.close_all())
    batch = build_candles(trades, ALL)
    assert sorted(out.candles, key=lambda c: (c.timeframe, c.ts_close)) == sorted(
        batch, key=lambda c: (c.timeframe, c.ts_close)
    )


def test_notify_at_is_none_without_data_or_lateness() -> None:
    assert InstrumentCandles("BTC-USDT", ["1m"]).notify_at() is None
    batch = InstrumentCandles("BTC-USDT", ["1m"], lateness_ms=None)
    batch.on_trades([trade(1, 0)], 0)
    assert batch.notify_at() is None
    assert batch.on_tick(10**13).candles == []


# ---- late trades ----------------------------------------------------------------------------


def _started(**options: object) -> tuple[InstrumentCandles, Emitted]:
    state = InstrumentCandles("BTC-USDT", ["1m", "5m"], **options)  # type: ignore[arg-type]
    out = state.on_trades([trade(1, 10_000, "100"), trade(2, 30_000, "101")], 0)
    out.extend(state.on_trades([trade(3, 65_000, "102")], 0))  # wm 63 s: 1m@60s final
    return state, out


def test_late_trade_revises_candle() -> None:
    state, out = _started()
    assert [c.ts_close for c in out.candles] == [T0 + MIN]
    late = trade(4, 20_000, "99", "2")
    got = state.on_trades([late], 0)
    assert got.late == [LateTrade(late, "1m", T0 + MIN, T0 + 63_000, "revised")]
    (revised,) = got.candles
    assert (revised.revision, revised.low, revised.close, revised.volume, revised.trade_count) == (
        1,
        "99",
        "101",
        "4",
        3,
    )
    # the 5m candle was still forming: it simply includes the trade, revision 0
    five = [c for c in state.close_all().candles if c.timeframe == "5m"]
    assert [(c.low, c.volume, c.revision) for c in five] == [("99", "5", 0)]
    assert state.stats.late == 1 and state.stats.revised == 1


def test_late_trade_reprices_following_flat_candles() -> None:
    state = InstrumentCandles("BTC-USDT", ["1m", "5m"])
    state.on_trades([trade(1, 10_000, "100")], 0)
    out = state.on_tick(5 * MIN)  # idle: wm = 5 min 8 s -> 1m@1 data, @2..@5 flat, 5m@5
    assert [c.is_flat for c in out.candles if c.timeframe == "1m"] == [False, True, True, True, True]
    got = state.on_trades([trade(3, 59_000, "90")], 5 * MIN)  # new close of 1m@1 and of 5m@5
    revised = {(c.timeframe, (c.ts_close - T0) // MIN): c for c in got.candles}
    assert revised[("1m", 1)].close == "90" and revised[("1m", 1)].revision == 1
    assert [revised[("1m", m)].close for m in range(2, 6)] == ["90"] * 4
    assert all(revised[("1m", m)].is_flat and revised[("1m", m)].revision == 1 for m in range(2, 6))
    assert revised[("5m", 5)].close == "90" and revised[("5m", 5)].revision == 1
    assert len(got.candles) == 6
    # the next flat candle takes the new close too
    (nxt,) = state.on_tick(6 * MIN).candles
    assert (nxt.timeframe, nxt.ts_close, nxt.close, nxt.is_flat) == ("1m", T0 + 6 * MIN, "90", True)


def test_late_trade_with_drop_policy_is_only_reported() -> None:
    state, _ = _started(late="drop-to-late-topic-only")
    late = trade(4, 20_000, "99")
    got = state.on_trades([late], 0)
    assert got.candles == []
    assert [(lt.trade, lt.action) for lt in got.late] == [(late, "reported")]
    five = [c for c in state.close_all().candles if c.timeframe == "5m"]
    assert five[0].low == "100"  # not counted anywhere


def test_late_trade_beyond_retention_is_reported_as_expired() -> None:
    state, _ = _started(retention_ms=MIN)
    state.on_trades([trade(5, 10 * MIN)], 0)  # wm ~ 10 min: 1m@1 is far behind
    late = trade(4, 20_000, "99")
    got = state.on_trades([late], 0)
    assert got.candles == []
    assert [lt.action for lt in got.late] == ["expired"]
    assert state.stats.expired == 1


def test_late_duplicate_is_not_counted_twice() -> None:
    state, _ = _started()
    got = state.on_trades([trade(1, 10_000, "100")], 0)  # trade 1 again, after its candle closed
    assert got == Emitted()
    assert state.stats.duplicates == 1 and state.stats.late == 0


def test_late_trade_into_an_empty_interval() -> None:
    skip = InstrumentCandles("BTC-USDT", ["1m"], empty="skip")
    skip.on_trades([trade(1, 10_000), trade(2, 5 * MIN)], 0)
    skip.on_trades([trade(3, 7 * MIN)], 0)  # 1m@1 and 1m@6 final, nothing in between
    (c,) = skip.on_trades([trade(4, 2 * MIN + 1, "98")], 0).candles
    assert (c.ts_close, c.close, c.revision) == (T0 + 3 * MIN, "98", 1)
    flat = InstrumentCandles("BTC-USDT", ["1m"])
    flat.on_trades([trade(1, 3 * MIN + 10)], 0)
    flat.on_trades([trade(2, 5 * MIN + 3_000)], 0)  # 1m@4 data, 1m@5 flat
    got = flat.on_trades([trade(3, MIN + 5, "97")], 0)  # before the first candle
    assert [((c.ts_close - T0) // MIN, c.close, c.is_flat, c.revision) for c in got.candles] == [
        (2, "97", False, 1),
        (3, "97", True, 1),  # a new flat candle between it and the old first candle
    ]


def test_late_trades_at_random_revise_to_the_reference() -> None:
    # up to 10 s delays with 2 s lateness: many trades are late, all within retention
    arrivals = generate_arrivals(40_000, seed=11, max_delay_ms=10_000)
    out, book = run_stream(arrivals, ALL)
    assert len(out.late) > 500 and {lt.action for lt in out.late} == {"revised"}
    assert any(c.revision > 0 for c in out.candles)
    assert_matches(latest(out.candles), reference_candles((a.trade for a in arrivals), ALL), revised=True)
    assert book.stats.late == len(out.late)


def test_late_trades_dropped_are_exactly_the_reported_ones() -> None:
    arrivals = generate_arrivals(20_000, seed=12, max_delay_ms=10_000)
    out, _ = run_stream(arrivals, ["1m", "1h"], late="drop-to-late-topic-only")
    assert out.late and all(c.revision == 0 for c in out.candles)
    late_ids = {(lt.trade.inst_id, lt.trade.trade_id) for lt in out.late}
    kept = [a.trade for a in arrivals if (a.trade.inst_id, a.trade.trade_id) not in late_ids]
    assert_matches(latest(out.candles), reference_candles(kept, ["1m", "1h"]))


# ---- forming candles, output format, options ------------------------------------------------


def test_forming_candles_are_what_will_be_final() -> None:
    state = InstrumentCandles("BTC-USDT", ["1m", "5m"])
    state.on_trades([trade(1, 10_000, "100"), trade(2, 70_000, "103")], 0)
    state.on_trades([trade(3, 80_000, "101"), trade(3, 80_000, "101")], 0)
    forming = {key(c): c for c in state.forming()}
    assert set(forming) == {("BTC-USDT", "1m", T0 + 2 * MIN), ("BTC-USDT", "5m", T0 + 5 * MIN)}
    final = {key(c): c for c in state.close_all().candles}
    for k, c in forming.items():
        assert final[k] == c


def test_candle_json_round_trip_and_key() -> None:
    (c,) = build_candles([trade(1, 0, "67000.1", "0.5")], ["1m"])
    data = encode_candle(c)
    assert decode_candle(data) == c
    assert b"revision" not in data and b" " not in data  # compact: defaults left out
    assert c.key == b"BTC-USDT|1m"
    flat = Candle("BTC-USDT", "1m", T0, "1", "1", "1", "1", "0", "0", 0)
    assert decode_candle(encode_candle(flat)) == flat
    late = LateTrade(trade(2, 0), "1m", T0 + MIN, T0, "expired")
    assert decode_late_trade(encode_candle(late)) == late


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="empty policy"):
        InstrumentCandles("X-Y", ["1m"], empty="zero")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="late policy"):
        CandleBook(["1m"], late="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lateness"):
        InstrumentCandles("X-Y", ["1m"], lateness_ms=-1)
    with pytest.raises(ValueError, match="same length"):
        parse_timeframes("1h,60m")
    with pytest.raises(ValueError, match="invalid timeframe"):
        parse_timeframes(["7m"])
    assert parse_timeframes("1H, 1m") == [("1m", 60_000), ("1h", 3_600_000)]


def test_timeframes_finer_than_each_other_share_no_base() -> None:
    # 90 s and 1 m: the finest interval is 30 s, internal and never emitted
    trades = [trade(i, i * 11_000, str(100 + i % 7)) for i in range(1, 80)]
    got = build_candles(trades, ["90s", "1m", "3m"])
    assert {c.timeframe for c in got} == {"90s", "1m", "3m"}
    assert got == sorted(got, key=lambda c: ({"1m": 0, "90s": 1, "3m": 2}[c.timeframe], c.ts_close))
    want = reference_candles(trades, ["1m", "90s", "3m"])
    assert got == want


# ---- properties -----------------------------------------------------------------------------


def _combine(parts: list[Candle], previous_close: str | None) -> dict[str, object]:
    data = [c for c in parts if not c.is_flat]
    if not data:
        px = parts[-1].close if parts else previous_close
        return {"open": px, "high": px, "low": px, "close": px, "volume": "0", "trade_count": 0}
    return {
        "open": data[0].open,
        "high": plain(max(Decimal(c.high) for c in data)),
        "low": plain(min(Decimal(c.low) for c in data)),
        "close": data[-1].close,
        "volume": plain(sum((Decimal(c.volume) for c in data), Decimal(0))),
        "quote_volume": plain(sum((Decimal(c.quote_volume) for c in data), Decimal(0))),
        "trade_count": sum(c.trade_count for c in data),
        "first_trade_id": data[0].first_trade_id,
        "last_trade_id": data[-1].last_trade_id,
    }


_trades_strategy = st.lists(
    st.tuples(
        st.integers(0, 3 * 3_600_000),  # ts offset
        st.integers(1, 40),  # price ticks
        st.integers(1, 500),  # size units
        st.integers(1, 3),  # count
    ),
    min_size=1,
    max_size=60,
)


def _to_trades(rows: list[tuple[int, int, int, int]]) -> list[Trade]:
    return [
        trade(i + 1, at, plain(Decimal(px) / 4), plain(Decimal(sz) / 1000), count=n)
        for i, (at, px, sz, n) in enumerate(rows)
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trades_strategy, st.sampled_from(["flat", "skip"]))
def test_higher_timeframes_are_aggregates_of_lower_ones(
    rows: list[tuple[int, int, int, int]], empty: str
) -> None:
    candles = build_candles(_to_trades(rows), ["1m", "5m", "15m", "1h"], empty=empty)  # type: ignore[arg-type]
    by_tf: dict[str, list[Candle]] = {}
    for c in candles:
        by_tf.setdefault(c.timeframe, []).append(c)
    for low, high, ms in (
        ("1m", "5m", 5 * MIN),
        ("5m", "15m", 15 * MIN),
        ("15m", "1h", 60 * MIN),
        ("1m", "1h", 60 * MIN),
    ):
        previous: str | None = None
        for c in by_tf[high]:
            parts = [p for p in by_tf[low] if c.ts_close - ms < p.ts_close <= c.ts_close]
            assert parts or (empty == "flat" and c.is_flat), c
            combined = _combine(parts, previous)
            assert {k: getattr(c, k) for k in combined} == combined, (c, parts)
            previous = c.close


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trades_strategy, st.randoms(use_true_random=False), st.integers(1, 12))
def test_stream_in_any_batches_equals_batch_mode(
    rows: list[tuple[int, int, int, int]], rnd: object, batches: int
) -> None:
    trades = _to_trades(rows)
    trades = trades + trades[: len(trades) // 5]  # some duplicates
    rng = rnd  # a random.Random
    jittered = sorted(trades, key=lambda t: t.ts + rng.randint(0, 1_500))  # type: ignore[attr-defined]
    cuts = sorted(rng.randint(0, len(jittered)) for _ in range(batches))  # type: ignore[attr-defined]
    state = InstrumentCandles("BTC-USDT", ["1m", "5m", "1h"])
    out = Emitted()
    for a, b in zip([0, *cuts], [*cuts, len(jittered)], strict=True):
        part = jittered[a:b]
        out.extend(state.on_trades(part, 0))
    out.extend(state.close_all())
    assert out.late == []
    assert_matches(latest(out.candles), build_candles(trades, ["1m", "5m", "1h"]))
