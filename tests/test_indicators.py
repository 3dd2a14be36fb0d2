"""Streaming indicators against TA-Lib (and numpy for the rolling VWAP).

After warm-up every output must equal the oracle to 1e-9 relative on long random walks at
PEPE-like (1e-8), unit and BTC-like (40000) price scales; the first ready update must be at
TA-Lib's first non-NaN index; pickling or deep-copying mid-stream must not change what follows.
"""

from __future__ import annotations

import copy
import pickle
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import pytest
import talib
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from strategies.indicators import (
    ATR,
    EMA,
    MACD,
    RSI,
    SMA,
    BollingerBands,
    BollingerValue,
    MACDValue,
    RollingVWAP,
    typical_price,
)

RTOL = 1e-9
SCALES = [1e-8, 1.0, 40_000.0]
N = 4_000

Array = np.ndarray


class Indicator(Protocol):
    """What every indicator has (``update`` signatures differ)."""

    @property
    def ready(self) -> bool: ...

    @property
    def value(self) -> object: ...


def random_walk(n: int, *, scale: float, seed: int, vol: float = 0.01) -> Array:
    """Geometric random walk starting at ``scale``."""
    rng = np.random.default_rng(seed)
    return scale * np.exp(np.cumsum(rng.normal(0.0, vol, n)))


def random_hlc(n: int, *, scale: float, seed: int) -> tuple[Array, Array, Array]:
    """High/low/close arrays with ``low <= close <= high`` and gaps between candles."""
    rng = np.random.default_rng(seed + 1)
    close = random_walk(n, scale=scale, seed=seed)
    high = close * (1.0 + np.abs(rng.normal(0.0, 0.006, n)))
    low = close * (1.0 - np.abs(rng.normal(0.0, 0.006, n)))
    return high, low, close


def to_array(values: Sequence[float | None]) -> Array:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def first_defined(values: Array) -> int:
    defined = np.flatnonzero(~np.isnan(values))
    assert defined.size, "the oracle never produced a value"
    return int(defined[0])


def assert_matches(
    actual: Array, expected: Array, *, rtol: float = RTOL, atol: float = 0.0, allow_empty: bool = False
) -> None:
    """Same NaN (warm-up) positions, and equal to ``rtol`` wherever the oracle is defined."""
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg="warm-up differs")
    defined = ~np.isnan(expected)
    assert allow_empty or defined.any(), "nothing to compare: the series is shorter than the warm-up"
    np.testing.assert_allclose(actual[defined], expected[defined], rtol=rtol, atol=atol)


def run_macd(ind: MACD, xs: Sequence[float]) -> tuple[Array, Array, Array]:
    line, signal, hist = [], [], []
    for x in xs:
        ready = ind.update(x)
        assert ready is ind.ready
        line.append(ind.line if ready else None)
        signal.append(ind.signal if ready else None)
        hist.append(ind.hist if ready else None)
    return to_array(line), to_array(signal), to_array(hist)


def run_bands(ind: BollingerBands, xs: Sequence[float]) -> tuple[Array, Array, Array]:
    upper, middle, lower = [], [], []
    for x in xs:
        ready = ind.update(x)
        assert ready is ind.ready
        upper.append(ind.upper if ready else None)
        middle.append(ind.middle if ready else None)
        lower.append(ind.lower if ready else None)
    return to_array(upper), to_array(middle), to_array(lower)


def numpy_vwap(price: Array, volume: Array, period: int) -> Array:
    """Each window summed on its own (no running sums): the drift-free oracle."""
    pv = sliding_window_view(price * volume, period).sum(axis=1)
    v = sliding_window_view(volume, period).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(v > 0.0, pv / v, np.nan)
    return np.concatenate([np.full(period - 1, np.nan), out])


# --------------------------------------------------------------------------------------------
# Against TA-Lib, several scales and periods
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("period", [2, 20, 200])
def test_sma_matches_talib(scale: float, period: int) -> None:
    x = random_walk(N, scale=scale, seed=period)
    ind = SMA(period)
    assert_matches(to_array([ind.update(v) for v in x.tolist()]), talib.SMA(x, period))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("period", [2, 12, 50])
def test_ema_matches_talib(scale: float, period: int) -> None:
    x = random_walk(N, scale=scale, seed=period + 1)
    ind = EMA(period)
    assert_matches(to_array([ind.update(v) for v in x.tolist()]), talib.EMA(x, period))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("period", [2, 14, 30])
def test_rsi_matches_talib(scale: float, period: int) -> None:
    x = random_walk(N, scale=scale, seed=period + 2)
    ind = RSI(period)
    assert_matches(to_array([ind.update(v) for v in x.tolist()]), talib.RSI(x, period))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("period", [1, 14, 30])
def test_atr_matches_talib(scale: float, period: int) -> None:
    high, low, close = random_hlc(N, scale=scale, seed=period + 3)
    ind = ATR(period)
    out = [ind.update(h, lo, c) for h, lo, c in zip(high.tolist(), low.tolist(), close.tolist(), strict=True)]
    assert_matches(to_array(out), talib.ATR(high, low, close, period))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("fast", "slow", "signal"), [(12, 26, 9), (5, 35, 5), (2, 3, 2)])
def test_macd_matches_talib(scale: float, fast: int, slow: int, signal: int) -> None:
    x = random_walk(N, scale=scale, seed=fast * slow + signal)
    line, sig, hist = run_macd(MACD(fast, slow, signal), x.tolist())
    t_line, t_signal, t_hist = talib.MACD(x, fast, slow, signal)
    # TA-Lib NaNs the line until the signal starts; the indicator turns ready at that index too.
    assert first_defined(t_line) == first_defined(t_signal) == slow + signal - 2
    assert_matches(line, t_line)
    assert_matches(sig, t_signal)
    assert_matches(hist, t_hist)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("period", "k"), [(5, 1.5), (20, 2.0), (50, 3.0)])
def test_bollinger_matches_talib(scale: float, period: int, k: float) -> None:
    x = random_walk(N, scale=scale, seed=period + 4)
    upper, middle, lower = run_bands(BollingerBands(period, k=k), x.tolist())
    t_upper, t_middle, t_lower = talib.BBANDS(x, period, k, k, talib.MA_Type.SMA)
    assert_matches(upper, t_upper)
    assert_matches(middle, t_middle)
    assert_matches(lower, t_lower)


def test_bollinger_stddev_is_population() -> None:
    x = random_walk(500, scale=100.0, seed=5)
    ind = BollingerBands(20, k=2.0)
    for v in x.tolist():
        ind.update(v)
    assert ind.stddev == pytest.approx(float(np.std(x[-20:], ddof=0)), rel=1e-9)
    assert ind.value == BollingerValue(ind.middle, ind.upper, ind.lower)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("period", [1, 20, 100])
def test_vwap_matches_numpy(scale: float, period: int) -> None:
    high, low, close = random_hlc(N, scale=scale, seed=period + 6)
    volume = np.random.default_rng(period).lognormal(0.0, 1.0, N)
    price = (high + low + close) / 3.0
    ind = RollingVWAP(period)
    out = [
        ind.update(typical_price(h, lo, c), v)
        for h, lo, c, v in zip(high.tolist(), low.tolist(), close.tolist(), volume.tolist(), strict=True)
    ]
    assert_matches(to_array(out), numpy_vwap(price, volume, period))


def test_vwap_zero_volume_window_has_no_value() -> None:
    period = 3
    prices = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0]
    volumes = [1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 4.0, 1.0]
    ind = RollingVWAP(period)
    out = [ind.update(p, v) for p, v in zip(prices, volumes, strict=True)]
    expected = numpy_vwap(np.array(prices), np.array(volumes), period)
    assert out[:2] == [None, None]
    assert out[2] == pytest.approx(expected[2], rel=1e-12)  # (10 + 22) / 3
    assert out[3] == pytest.approx(11.0)
    assert out[4] is None and out[5] is None  # three candles without volume
    assert ind.ready  # warmed up, just no volume in the window
    assert out[6] == pytest.approx(16.0) and out[7] == pytest.approx((64.0 + 17.0) / 5.0)
    with pytest.raises(ValueError, match="volume must be >= 0"):
        ind.update(1.0, -1.0)


# --------------------------------------------------------------------------------------------
# Warm-up: ready exactly at TA-Lib's first non-NaN index
# --------------------------------------------------------------------------------------------


def _ready_index(make: Callable[[], Indicator], feed: Callable[[Any, int], object]) -> int:
    """The 0-based update index at which ``ready`` first turns true (value None before)."""
    ind = make()
    for i in range(1_000):
        assert not ind.ready
        assert ind.value is None
        feed(ind, i)
        if ind.ready:
            assert ind.value is not None
            return i
    raise AssertionError("never ready")


WARMUP_X = random_walk(1_000, scale=50.0, seed=99)
WARMUP_H, WARMUP_L, WARMUP_C = random_hlc(1_000, scale=50.0, seed=99)


@pytest.mark.parametrize("period", [1, 2, 3, 14, 50])
def test_ready_indices(period: int) -> None:
    x = WARMUP_X.tolist()

    def scalar(ind: Any, i: int) -> None:
        ind.update(x[i])

    def hlc(ind: Any, i: int) -> None:
        ind.update(WARMUP_H[i], WARMUP_L[i], WARMUP_C[i])

    def vwap(ind: Any, i: int) -> None:
        ind.update(x[i], 1.0)

    assert _ready_index(lambda: SMA(period), scalar) == period - 1
    assert _ready_index(lambda: EMA(period), scalar) == period - 1
    assert _ready_index(lambda: RSI(period), scalar) == period
    assert _ready_index(lambda: ATR(period), hlc) == period
    assert _ready_index(lambda: BollingerBands(period), scalar) == period - 1
    assert _ready_index(lambda: RollingVWAP(period), vwap) == period - 1
    if period >= 2:  # TA-Lib's range for these
        assert _ready_index(lambda: SMA(period), scalar) == first_defined(talib.SMA(WARMUP_X, period))
        assert _ready_index(lambda: EMA(period), scalar) == first_defined(talib.EMA(WARMUP_X, period))
        assert _ready_index(lambda: RSI(period), scalar) == first_defined(talib.RSI(WARMUP_X, period))
        bands = talib.BBANDS(WARMUP_X, period, 2.0, 2.0, talib.MA_Type.SMA)[0]
        assert _ready_index(lambda: BollingerBands(period), scalar) == first_defined(bands)
    atr = talib.ATR(WARMUP_H, WARMUP_L, WARMUP_C, period)
    assert _ready_index(lambda: ATR(period), hlc) == first_defined(atr)


@pytest.mark.parametrize(("fast", "slow", "signal"), [(2, 3, 2), (12, 26, 9), (3, 40, 7)])
def test_macd_ready_index(fast: int, slow: int, signal: int) -> None:
    x = WARMUP_X.tolist()

    def feed(ind: Any, i: int) -> None:
        ind.update(x[i])

    index = _ready_index(lambda: MACD(fast, slow, signal), feed)
    assert index == slow + signal - 2 == first_defined(talib.MACD(WARMUP_X, fast, slow, signal)[1])


def test_macd_value_tuple() -> None:
    ind = MACD(3, 6, 4)
    assert ind.value is None
    for v in WARMUP_X[:50].tolist():
        ind.update(v)
    assert ind.value == MACDValue(ind.line, ind.signal, ind.hist)
    assert ind.hist == ind.line - ind.signal


# --------------------------------------------------------------------------------------------
# Long series: no float drift in the rolling sums
# --------------------------------------------------------------------------------------------


def test_rolling_sums_do_not_drift_over_long_series() -> None:
    """150k points trending from 40000 down to ~1e-3 and back: a running sum without resync
    would keep the rounding error of the large values and lose 1e-9 on the small ones."""
    n = 150_000
    trend = np.concatenate([np.linspace(0.0, -17.0, n // 2), np.linspace(-17.0, 0.0, n - n // 2)])
    rng = np.random.default_rng(7)
    x = 40_000.0 * np.exp(trend + np.cumsum(rng.normal(0.0, 0.002, n)))
    volume = rng.lognormal(0.0, 1.0, n)
    xs = x.tolist()

    sma = SMA(50)
    windows = sliding_window_view(x, 50)
    expected_sma = np.concatenate([np.full(49, np.nan), windows.mean(axis=1)])
    assert_matches(to_array([sma.update(v) for v in xs]), expected_sma)

    upper, middle, lower = run_bands(BollingerBands(20, k=2.0), xs)
    w20 = sliding_window_view(x, 20)
    mean20 = np.concatenate([np.full(19, np.nan), w20.mean(axis=1)])
    std20 = np.concatenate([np.full(19, np.nan), w20.std(axis=1, ddof=0)])
    assert_matches(middle, mean20)
    assert_matches(upper, mean20 + 2.0 * std20)
    assert_matches(lower, mean20 - 2.0 * std20)

    vwap = RollingVWAP(30)
    out = [vwap.update(p, v) for p, v in zip(xs, volume.tolist(), strict=True)]
    assert_matches(to_array(out), numpy_vwap(x, volume, 30))


# --------------------------------------------------------------------------------------------
# Pickle / deepcopy mid-stream
# --------------------------------------------------------------------------------------------


def _readings(ind: Indicator) -> tuple[str, ...]:
    """Everything observable about an indicator after an update."""
    names = ("ready", "value", "line", "signal", "hist", "upper", "middle", "lower", "stddev")
    return tuple(repr(getattr(ind, name)) for name in names if hasattr(ind, name))


def _feeders() -> list[tuple[str, Callable[[], Indicator], Callable[[Any, int], object]]]:
    x = WARMUP_X.tolist()
    h, lo, c = WARMUP_H.tolist(), WARMUP_L.tolist(), WARMUP_C.tolist()

    def one(ind: Any, i: int) -> object:
        return ind.update(x[i])

    def hlc(ind: Any, i: int) -> object:
        return ind.update(h[i], lo[i], c[i])

    def pv(ind: Any, i: int) -> object:
        return ind.update(x[i], float(i % 5))

    return [
        ("sma", lambda: SMA(7), one),
        ("ema", lambda: EMA(7), one),
        ("rsi", lambda: RSI(7), one),
        ("atr", lambda: ATR(7), hlc),
        ("macd", lambda: MACD(3, 8, 4), one),
        ("bbands", lambda: BollingerBands(7, k=2.5), one),
        ("vwap", lambda: RollingVWAP(7), pv),
    ]


FEEDERS = _feeders()


@pytest.mark.parametrize(("name", "make", "feed"), FEEDERS, ids=[f[0] for f in FEEDERS])
@given(cut=st.integers(min_value=0, max_value=300))
@settings(max_examples=25, deadline=None)
def test_copy_mid_stream_continues_identically(
    name: str, make: Callable[[], Indicator], feed: Callable[[Any, int], object], cut: int
) -> None:
    original = make()
    for i in range(cut):
        feed(original, i)
    copies = [pickle.loads(pickle.dumps(original)), copy.deepcopy(original)]
    for i in range(cut, 400):
        expected = feed(original, i)
        for clone in copies:
            assert repr(feed(clone, i)) == repr(expected), (name, i)
            assert _readings(clone) == _readings(original)
    assert original.ready


# --------------------------------------------------------------------------------------------
# Property tests on arbitrary (bounded) inputs
# --------------------------------------------------------------------------------------------

prices = st.lists(st.floats(min_value=1.0, max_value=1_000.0), min_size=1, max_size=120)


@given(xs=prices, period=st.integers(min_value=2, max_value=30))
@settings(max_examples=60, deadline=None)
def test_property_against_talib(xs: list[float], period: int) -> None:
    x = np.array(xs)
    sma, ema, rsi, bands = SMA(period), EMA(period), RSI(period), BollingerBands(period, k=2.0)
    assert_matches(to_array([sma.update(v) for v in xs]), talib.SMA(x, period), allow_empty=True)
    assert_matches(to_array([ema.update(v) for v in xs]), talib.EMA(x, period), allow_empty=True)
    assert_matches(to_array([rsi.update(v) for v in xs]), talib.RSI(x, period), allow_empty=True)
    upper, middle, lower = run_bands(bands, xs)
    # TA-Lib's band width comes from E[x^2] - mean^2 (cancellation); compare on the price scale.
    t_upper, t_middle, t_lower = talib.BBANDS(x, period, 2.0, 2.0, talib.MA_Type.SMA)
    atol = 1e-9 * float(x.max())
    assert_matches(middle, t_middle, allow_empty=True)
    assert_matches(upper, t_upper, atol=atol, allow_empty=True)
    assert_matches(lower, t_lower, atol=atol, allow_empty=True)
    assert sma.ready is (len(xs) >= period) is bands.ready


LEVELS = [1e-3, 0.5, 1.0, 126.0352965570388, 40_000.0, 1e5]
VOLUMES = [0.0, 1e-4, 1.0, 1e6]

# A series of segments: each at a price level, of some length, either flat or noisy, with a
# volume level. Jumps between levels followed by flat stretches are the hard case for rolling
# sums (the residue of the large values that left the window).
segments = st.lists(
    st.tuples(st.sampled_from(LEVELS), st.integers(1, 25), st.booleans(), st.sampled_from(VOLUMES)),
    min_size=1,
    max_size=12,
)


def build_series(
    parts: list[tuple[float, int, bool, float]], rng: random.Random
) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    vs: list[float] = []
    for level, length, noisy, volume in parts:
        for _ in range(length):
            xs.append(level * (1.0 + rng.uniform(-0.01, 0.01)) if noisy else level)
            vs.append(volume * rng.uniform(0.5, 1.5) if noisy else volume)
    return xs, vs


def window_oracle(x: Array, period: int) -> tuple[Array, Array, Array]:
    """Per-window mean, population stddev and largest |value| (NaN-padded during warm-up)."""
    w = sliding_window_view(x, period)

    def padded(values: Array) -> Array:
        return np.concatenate([np.full(period - 1, np.nan), values])

    return padded(w.mean(axis=1)), padded(w.std(axis=1, ddof=0)), padded(np.abs(w).max(axis=1))


@given(parts=segments, period=st.integers(min_value=1, max_value=12), rng=st.randoms(use_true_random=False))
@settings(max_examples=120, deadline=None)
def test_property_rolling_windows_against_numpy(
    parts: list[tuple[float, int, bool, float]], period: int, rng: random.Random
) -> None:
    xs, vs = build_series(parts, rng)
    assume(len(xs) >= period)
    x, v = np.array(xs), np.array(vs)
    mean, std, scale = window_oracle(x, period)
    sma = SMA(period)
    assert_matches(to_array([sma.update(p) for p in xs]), mean)
    upper, middle, lower = run_bands(BollingerBands(period, k=2.0), xs)
    assert_matches(middle, mean)
    # Band widths are exact to 1e-9 of the window's price scale (not of the width itself).
    defined = ~np.isnan(mean)
    assert np.all(np.abs(upper - (mean + 2.0 * std))[defined] <= 1e-9 * scale[defined])
    assert np.all(np.abs(lower - (mean - 2.0 * std))[defined] <= 1e-9 * scale[defined])
    vwap = RollingVWAP(period)
    assert_matches(
        to_array([vwap.update(p, q) for p, q in zip(xs, vs, strict=True)]),
        numpy_vwap(x, v, period),
        allow_empty=True,
    )


def test_bands_collapse_when_the_window_goes_flat() -> None:
    """After a jump, a flat window has a zero width exactly (not the residue of the jump)."""
    bands = BollingerBands(2, k=2.0)
    for value in [1.0, 149.0, 126.0352965570388, 126.0352965570388]:
        bands.update(value)
    assert bands.stddev == 0.0
    assert bands.upper == bands.middle == bands.lower == 126.0352965570388
    walk = random_walk(300, scale=40_000.0, seed=8, vol=0.05).tolist()
    bands = BollingerBands(20, k=2.0)
    for value in walk + [walk[-1]] * 20:
        bands.update(value)
    assert bands.stddev <= 1e-12 * walk[-1]
    assert bands.middle == pytest.approx(walk[-1], rel=1e-15)


@given(xs=st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=80))
@settings(max_examples=60, deadline=None)
def test_property_rsi_bounds_and_flat(xs: list[float]) -> None:
    rsi = RSI(3)
    for v in xs:
        out = rsi.update(v)
        assert out is None or 0.0 <= out <= 100.0
    flat = RSI(3)
    assert [flat.update(5.0) for _ in range(6)] == [None, None, None, 0.0, 0.0, 0.0]  # TA-Lib: 0


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SMA, EMA, RSI, ATR, BollingerBands, RollingVWAP])
def test_bad_periods(cls: type) -> None:
    with pytest.raises(ValueError, match=r"period must be >= 1, got 0"):
        cls(0)
    with pytest.raises(TypeError, match=r"period must be an int, got 2\.5"):
        cls(2.5)
    with pytest.raises(TypeError, match=r"period must be an int, got True"):
        cls(True)


def test_bad_macd_and_bands_options() -> None:
    with pytest.raises(ValueError, match=r"fast period \(26\) must be smaller than the slow period \(12\)"):
        MACD(26, 12, 9)
    with pytest.raises(ValueError, match=r"MACD signal period must be >= 1, got 0"):
        MACD(12, 26, 0)
    with pytest.raises(ValueError, match=r"Bollinger k must be > 0, got 0"):
        BollingerBands(20, k=0)
