"""Streaming technical indicators: O(1) per update, float arithmetic, picklable mid-stream.

Every indicator is a plain ``__slots__`` class fed one value (or one candle's numbers) at a time
with ``update(...)``. ``ready`` says whether the warm-up is over; ``value`` is ``None`` until it
is. ``pickle`` and ``copy.deepcopy`` work at any point and the copy continues exactly like the
original (a Bytewax state snapshot relies on this).

After warm-up the outputs follow TA-Lib's default conventions (unstable period 0, default
compatibility), so they equal ``talib.SMA``/``EMA``/``RSI``/``MACD``/``BBANDS(matype=0)``/``ATR``
on the same history up to float rounding. The first ready update is the one at TA-Lib's first
non-NaN index (0-based, counting updates from the first one):

=====================  ==========================  ============================================
indicator              first ready index           seeding
=====================  ==========================  ============================================
``SMA(n)``             ``n - 1``                   mean of the window
``EMA(n)``             ``n - 1``                   SMA of the first ``n`` values, then
                                                   ``ema += (x - ema) * 2 / (n + 1)``
``RSI(n)``             ``n``                       Wilder: mean gain/loss of the first ``n``
                                                   changes, then ``avg = (avg * (n-1) + x) / n``
``ATR(n)``             ``n``                       Wilder, seeded with the mean true range of
                                                   candles ``1..n`` (candle 0 has no previous
                                                   close, so no true range)
``MACD(f, s, g)``      ``s + g - 2``               TA-Lib's alignment: slow EMA seeded on values
                                                   ``0..s-1``, fast EMA on ``s-f..s-1``; the
                                                   signal is ``EMA(g)`` of the MACD line
``BollingerBands(n)``  ``n - 1``                   SMA +/- k population standard deviations
``RollingVWAP(n)``     ``n - 1``                   sum(price * volume) / sum(volume) over the
                                                   last ``n`` updates
=====================  ==========================  ============================================

Rolling sums (SMA, Bollinger, VWAP) are re-computed exactly from the window (``math.fsum``)
every ``max(n, RESYNC_EVERY)`` updates, and also as soon as their magnitude falls below
``COLLAPSE`` times its largest value since the last re-computation (a large value left the
window: its rounding residue would otherwise swamp the small remainder, e.g. the variance of a
window that went flat after a jump). Float drift therefore cannot build up over long series.
"""

from __future__ import annotations

from math import fsum, nan, sqrt
from typing import NamedTuple

__all__ = [
    "ATR",
    "EMA",
    "COLLAPSE",
    "MACD",
    "RESYNC_EVERY",
    "RSI",
    "SMA",
    "BollingerBands",
    "BollingerValue",
    "MACDValue",
    "RollingVWAP",
    "typical_price",
]

#: Rolling window sums are re-computed from the window at least every max(period, RESYNC_EVERY) updates
RESYNC_EVERY = 256
#: and as soon as one falls below this fraction of its peak since the last re-computation.
COLLAPSE = 1e-4


def _check_period(period: int, what: str, *, minimum: int = 1) -> int:
    if isinstance(period, bool) or not isinstance(period, int):
        msg = f"{what} period must be an int, got {period!r}"
        raise TypeError(msg)
    if period < minimum:
        msg = f"{what} period must be >= {minimum}, got {period}"
        raise ValueError(msg)
    return period


def typical_price(high: float, low: float, close: float) -> float:
    """The candle's typical price ``(high + low + close) / 3`` (the usual VWAP input)."""
    return (high + low + close) / 3.0


class SMA:
    """Simple moving average of the last ``period`` values; ready after ``period`` updates."""

    __slots__ = ("_buf", "_i", "_left", "_n", "_peak", "_sum", "_value", "period")

    def __init__(self, period: int) -> None:
        self.period = _check_period(period, "SMA")
        self._buf = [0.0] * period
        self._i = 0  # the ring slot written next (holds the oldest value once full)
        self._n = 0  # values in the window
        self._sum = 0.0
        self._left = max(period, RESYNC_EVERY)  # updates until the next exact re-sum
        self._peak = 0.0  # the largest |sum| since the last exact re-sum
        self._value: float | None = None

    @property
    def ready(self) -> bool:
        return self._value is not None

    @property
    def value(self) -> float | None:
        return self._value

    def update(self, x: float) -> float | None:
        """Add ``x``; return the new average (``None`` during warm-up)."""
        buf = self._buf
        i = self._i
        period = self.period
        if self._n == period:
            total = self._sum + (x - buf[i])
            buf[i] = x
            size = total if total >= 0.0 else -total
            left = self._left - 1
            if left <= 0 or size < self._peak * COLLAPSE:
                total = fsum(buf)
                self._peak = total if total >= 0.0 else -total
                left = max(period, RESYNC_EVERY)
            elif size > self._peak:
                self._peak = size
            self._left = left
            self._sum = total
        else:
            total = self._sum + x
            self._sum = total
            buf[i] = x
            self._n += 1
            if self._n < period:
                self._i = i + 1
                return None
            self._peak = total if total >= 0.0 else -total
        i += 1
        self._i = 0 if i == period else i
        value = total / period
        self._value = value
        return value


class EMA:
    """Exponential moving average, ``alpha = 2 / (period + 1)``, seeded with the SMA of the first
    ``period`` values (TA-Lib's default); ready after ``period`` updates."""

    __slots__ = ("_n", "_seed", "_value", "alpha", "period")

    def __init__(self, period: int) -> None:
        self.period = _check_period(period, "EMA")
        self.alpha = 2.0 / (period + 1)
        self._n = 0
        self._seed = 0.0
        self._value: float | None = None

    @property
    def ready(self) -> bool:
        return self._value is not None

    @property
    def value(self) -> float | None:
        return self._value

    def update(self, x: float) -> float | None:
        """Add ``x``; return the new average (``None`` during warm-up)."""
        value = self._value
        if value is not None:
            value = (x - value) * self.alpha + value
            self._value = value
            return value
        self._seed += x
        self._n += 1
        if self._n < self.period:
            return None
        value = self._seed / self.period
        self._value = value
        return value


class RSI:
    """Wilder's relative strength index (0..100) over ``period`` changes; ready after
    ``period + 1`` updates (the first value has no change). When the average gain and loss are
    both exactly zero (a flat history) the value is 0.0, as in TA-Lib."""

    __slots__ = ("_gain", "_loss", "_n", "_prev", "_value", "period")

    def __init__(self, period: int) -> None:
        self.period = _check_period(period, "RSI")
        self._prev: float | None = None
        self._n = 0  # changes seen during warm-up
        self._gain = 0.0  # average gain once ready; the warm-up sum before
        self._loss = 0.0
        self._value: float | None = None

    @property
    def ready(self) -> bool:
        return self._value is not None

    @property
    def value(self) -> float | None:
        return self._value

    def update(self, x: float) -> float | None:
        """Add ``x``; return the new RSI (``None`` during warm-up)."""
        prev = self._prev
        self._prev = x
        if prev is None:
            return None
        change = x - prev
        period = self.period
        if self._value is not None:
            gain = self._gain * (period - 1)
            loss = self._loss * (period - 1)
            if change < 0.0:
                loss -= change
            else:
                gain += change
            gain /= period
            loss /= period
        else:
            if change < 0.0:
                self._loss -= change
            else:
                self._gain += change
            self._n += 1
            if self._n < period:
                return None
            gain = self._gain / period
            loss = self._loss / period
        self._gain = gain
        self._loss = loss
        total = gain + loss
        value = 100.0 * (gain / total) if total != 0.0 else 0.0
        self._value = value
        return value


class ATR:
    """Wilder's average true range over ``period`` candles; ready after ``period + 1`` updates
    (candle 0 has no previous close). True range: ``max(high - low, |high - prev_close|,
    |low - prev_close|)``."""

    __slots__ = ("_n", "_prev_close", "_sum", "_value", "period")

    def __init__(self, period: int) -> None:
        self.period = _check_period(period, "ATR")
        self._prev_close: float | None = None
        self._n = 0
        self._sum = 0.0
        self._value: float | None = None

    @property
    def ready(self) -> bool:
        return self._value is not None

    @property
    def value(self) -> float | None:
        return self._value

    def update(self, high: float, low: float, close: float) -> float | None:
        """Add one candle; return the new ATR (``None`` during warm-up)."""
        prev = self._prev_close
        self._prev_close = close
        if prev is None:
            return None
        tr = high - low
        up = prev - high if prev > high else high - prev
        if up > tr:
            tr = up
        down = low - prev if low > prev else prev - low
        if down > tr:
            tr = down
        period = self.period
        value = self._value
        if value is not None:
            value = (value * (period - 1) + tr) / period
        else:
            self._sum += tr
            self._n += 1
            if self._n < period:
                return None
            value = self._sum / period
        self._value = value
        return value


class MACDValue(NamedTuple):
    line: float
    signal: float
    hist: float


class MACD:
    """MACD with TA-Lib's alignment: ``line = EMA(fast) - EMA(slow)``, ``signal = EMA(signal)``
    of the line, ``hist = line - signal``; ready after ``slow + signal - 1`` updates.

    As in ``talib.MACD``, both EMAs are seeded at the same update (index ``slow - 1``): the slow
    one with the SMA of values ``0..slow-1``, the fast one with the SMA of values
    ``slow-fast..slow-1`` (so the fast EMA here differs from a standalone ``EMA(fast)`` by a
    transient that decays geometrically). The signal EMA is seeded with the SMA of the first
    ``signal`` line values. ``update`` returns ``ready``; read ``line``, ``signal`` and ``hist``
    (NaN until ready) or ``value``.
    """

    __slots__ = (
        "_fast_v",
        "_k_fast",
        "_k_signal",
        "_k_slow",
        "_n",
        "_ready",
        "_seed_fast",
        "_seed_signal",
        "_seed_slow",
        "_slow_v",
        "fast",
        "hist",
        "line",
        "signal",
        "signal_period",
        "slow",
    )

    def __init__(self, fast: int = 12, slow: int = 26, signal: int = 9) -> None:
        self.fast = _check_period(fast, "MACD fast")
        self.slow = _check_period(slow, "MACD slow")
        self.signal_period = _check_period(signal, "MACD signal")
        if fast >= slow:
            msg = f"MACD fast period ({fast}) must be smaller than the slow period ({slow})"
            raise ValueError(msg)
        self._k_fast = 2.0 / (fast + 1)
        self._k_slow = 2.0 / (slow + 1)
        self._k_signal = 2.0 / (signal + 1)
        self._n = 0  # updates so far, counted only during warm-up
        self._ready = False
        self._seed_slow = 0.0
        self._seed_fast = 0.0
        self._seed_signal = 0.0
        self._slow_v = nan
        self._fast_v = nan
        self.line = nan
        self.signal = nan
        self.hist = nan

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def value(self) -> MACDValue | None:
        if not self._ready:
            return None
        return MACDValue(self.line, self.signal, self.hist)

    def update(self, x: float) -> bool:
        """Add ``x``; return ``ready``."""
        if self._ready:
            slow = self._slow_v
            slow = (x - slow) * self._k_slow + slow
            fast = self._fast_v
            fast = (x - fast) * self._k_fast + fast
            self._slow_v = slow
            self._fast_v = fast
            line = fast - slow
            signal = self.signal
            signal = (line - signal) * self._k_signal + signal
            self.line = line
            self.signal = signal
            self.hist = line - signal
            return True
        return self._warm_up(x)

    def _warm_up(self, x: float) -> bool:
        n = self._n
        self._n = n + 1
        fast_p = self.fast
        slow_p = self.slow
        if n < slow_p - 1:  # seeding the EMAs
            self._seed_slow += x
            if n >= slow_p - fast_p:
                self._seed_fast += x
            return False
        if n == slow_p - 1:
            slow = (self._seed_slow + x) / slow_p
            fast = (self._seed_fast + x) / fast_p
        else:
            slow = self._slow_v
            slow = (x - slow) * self._k_slow + slow
            fast = self._fast_v
            fast = (x - fast) * self._k_fast + fast
        self._slow_v = slow
        self._fast_v = fast
        line = fast - slow
        self._seed_signal += line
        if n < slow_p + self.signal_period - 2:
            return False
        signal = self._seed_signal / self.signal_period
        self.line = line
        self.signal = signal
        self.hist = line - signal
        self._ready = True
        return True


class BollingerValue(NamedTuple):
    middle: float
    upper: float
    lower: float


class BollingerBands:
    """Bollinger bands: ``middle = SMA(period)``, ``upper/lower = middle +/- k * stddev`` with the
    population standard deviation of the window (TA-Lib ``BBANDS`` with ``matype=0`` and
    ``nbdevup = nbdevdn = k``); ready after ``period`` updates.

    Numerics: the window is summed as deviations from a shift ``c`` (a value of the window):
    ``s1 = sum(x - c)``, ``s2 = sum((x - c) ** 2)``, so rounding scales with the spread of the
    window, not with the price. The sums are re-computed exactly from the window (and ``c``
    moved to the newest value) every ``max(period, RESYNC_EVERY)`` updates, when ``s2`` has
    fallen below ``COLLAPSE`` times its peak (a large deviation left the window), and when the
    variance would lose more than about four digits to cancellation (``var < theta * s2 / n``,
    ``theta = min(COLLAPSE, 1 / (4 * period))``). A window of equal values has a width of
    exactly 0. ``update`` returns ``ready``; read ``middle``, ``upper``, ``lower``, ``stddev``
    (NaN until ready) or ``value``.
    """

    __slots__ = (
        "_buf",
        "_c",
        "_i",
        "_left",
        "_n",
        "_peak",
        "_s1",
        "_s2",
        "_theta",
        "k",
        "lower",
        "middle",
        "period",
        "stddev",
        "upper",
    )

    def __init__(self, period: int = 20, *, k: float = 2.0) -> None:
        self.period = _check_period(period, "Bollinger")
        if not k > 0.0:
            msg = f"Bollinger k must be > 0, got {k!r}"
            raise ValueError(msg)
        self.k = float(k)
        self._theta = min(COLLAPSE, 0.25 / period)
        self._buf = [0.0] * period
        self._i = 0
        self._n = 0
        self._c = 0.0  # the shift: the first value, then the newest value at each re-computation
        self._s1 = 0.0  # sum(x - c) over the window
        self._s2 = 0.0  # sum((x - c) ** 2) over the window
        self._peak = 0.0  # the largest s2 since the last re-computation
        self._left = max(period, RESYNC_EVERY)
        self.middle = nan
        self.upper = nan
        self.lower = nan
        self.stddev = nan

    @property
    def ready(self) -> bool:
        return self._n == self.period

    @property
    def value(self) -> BollingerValue | None:
        if self._n != self.period:
            return None
        return BollingerValue(self.middle, self.upper, self.lower)

    def update(self, x: float) -> bool:
        """Add ``x``; return ``ready``."""
        buf = self._buf
        i = self._i
        period = self.period
        c = self._c
        if self._n == period:
            dev_old = buf[i] - c
            buf[i] = x
            dev = x - c
            s1 = self._s1 + (dev - dev_old)
            s2 = self._s2 + (dev * dev - dev_old * dev_old)
            left = self._left - 1
        else:
            buf[i] = x
            if not self._n:
                c = self._c = x
            self._n += 1
            dev = x - c
            s1 = self._s1 + dev
            s2 = self._s2 + dev * dev
            if self._n < period:
                self._i = i + 1
                self._s1 = s1
                self._s2 = s2
                return False
            left = max(period, RESYNC_EVERY)
            self._peak = s2
        i += 1
        self._i = 0 if i == period else i
        shift = s1 / period
        moment = s2 / period
        var = moment - shift * shift
        if left <= 0 or var < self._theta * moment or s2 < self._peak * COLLAPSE:
            self._recompute(x)
            return True
        if s2 > self._peak:
            self._peak = s2
        self._left = left
        self._s1 = s1
        self._s2 = s2
        mean = c + shift
        stddev = sqrt(var) if var > 0.0 else 0.0
        band = self.k * stddev
        self.middle = mean
        self.upper = mean + band
        self.lower = mean - band
        self.stddev = stddev
        return True

    def _recompute(self, newest: float) -> None:
        """Exact mean and variance from the window; re-centre the sums on the newest value."""
        buf = self._buf
        period = self.period
        mean = fsum(buf) / period
        self._set(mean, fsum([(v - mean) * (v - mean) for v in buf]) / period)
        self._c = newest
        self._s1 = fsum([v - newest for v in buf])
        self._s2 = self._peak = fsum([(v - newest) * (v - newest) for v in buf])
        self._left = max(period, RESYNC_EVERY)

    def _set(self, mean: float, var: float) -> None:
        stddev = sqrt(var) if var > 0.0 else 0.0
        band = self.k * stddev
        self.middle = mean
        self.upper = mean + band
        self.lower = mean - band
        self.stddev = stddev


class RollingVWAP:
    """Volume-weighted average price over the last ``period`` updates:
    ``sum(price * volume) / sum(volume)``; ready after ``period`` updates.

    ``price`` is whatever the caller passes: use :func:`typical_price` of the candle (the usual
    choice), its close, or its exact trade VWAP. ``value`` is ``None`` while not ready and also
    when the window's volume is zero (no trades in the last ``period`` candles). Volumes must be
    >= 0.
    """

    __slots__ = (
        "_i",
        "_left",
        "_n",
        "_nonzero",
        "_peak_pv",
        "_peak_v",
        "_pv",
        "_sum_pv",
        "_sum_v",
        "_v",
        "_value",
        "period",
    )

    def __init__(self, period: int) -> None:
        self.period = _check_period(period, "VWAP")
        self._pv = [0.0] * period
        self._v = [0.0] * period
        self._i = 0
        self._n = 0
        self._nonzero = 0  # updates in the window with volume > 0 (exact, unlike the float sum)
        self._sum_pv = 0.0
        self._sum_v = 0.0
        self._left = max(period, RESYNC_EVERY)
        self._peak_pv = 0.0  # the largest sums since the last exact re-sum
        self._peak_v = 0.0
        self._value: float | None = None

    @property
    def ready(self) -> bool:
        return self._n == self.period

    @property
    def value(self) -> float | None:
        return self._value

    def update(self, price: float, volume: float) -> float | None:
        """Add one candle's price and volume; return the new VWAP (``None`` during warm-up or
        when the window has no volume)."""
        if volume < 0.0:
            msg = f"VWAP volume must be >= 0, got {volume!r}"
            raise ValueError(msg)
        pv = price * volume
        pvs = self._pv
        vs = self._v
        i = self._i
        period = self.period
        full = self._n == period
        if full:
            old_v = vs[i]
            sum_pv = self._sum_pv + (pv - pvs[i])
            sum_v = self._sum_v + (volume - old_v)
            if old_v > 0.0:
                self._nonzero -= 1
        else:
            sum_pv = self._sum_pv + pv
            sum_v = self._sum_v + volume
            self._n += 1
        pvs[i] = pv
        vs[i] = volume
        if volume > 0.0:
            self._nonzero += 1
        i += 1
        self._i = 0 if i == period else i
        if full:
            left = self._left - 1
            size_pv = sum_pv if sum_pv >= 0.0 else -sum_pv
            if left <= 0 or sum_v < self._peak_v * COLLAPSE or size_pv < self._peak_pv * COLLAPSE:
                sum_pv = fsum(pvs)
                sum_v = fsum(vs)
                self._peak_pv = sum_pv if sum_pv >= 0.0 else -sum_pv
                self._peak_v = sum_v
                left = max(period, RESYNC_EVERY)
            else:
                if sum_v > self._peak_v:
                    self._peak_v = sum_v
                if size_pv > self._peak_pv:
                    self._peak_pv = size_pv
            self._left = left
        elif self._n == period:
            self._peak_pv = sum_pv if sum_pv >= 0.0 else -sum_pv
            self._peak_v = sum_v
        if not self._nonzero:
            sum_pv = sum_v = self._peak_pv = self._peak_v = 0.0
        self._sum_pv = sum_pv
        self._sum_v = sum_v
        if self._n < period or not self._nonzero:
            self._value = None
            return None
        value = sum_pv / sum_v
        self._value = value
        return value
