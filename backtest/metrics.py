"""Performance metrics of a backtest: from its equity curve and its fills.

The curve ``E_0, E_1, ..., E_n``: ``E_0`` is the initial cash (before the first candle, at its
open time ``ts_close[0] - period``), ``E_i`` the equity at the close of candle ``i``. Ratios are
floats (computed from the exact equity, converted once); money is exact decimal strings.

* ``total_return = E_n / E_0 - 1``, exactly (``MONEY``), then a float.
* ``cagr = (E_n / E_0) ** (1 / years) - 1`` with ``years = (ts_close[n-1] - ts_open[0]) /
  365 days``; ``-1.0`` when everything was lost, ``None`` when the float overflows (a short span
  compounded to a year).
* Per-candle simple returns ``r_i = E_i / E_{i-1} - 1``, ``i = 1..n`` (``0`` after an equity
  of 0). Risk-free rate 0. ``sharpe = mean(r) / std(r) * sqrt(periods_per_year)`` with the sample
  standard deviation (``ddof=1``); ``None`` with fewer than 2 returns or ``std(r) == 0``.
  ``sortino = mean(r) / dd * sqrt(periods_per_year)`` with the downside deviation
  ``dd = sqrt(mean(min(r_i, 0) ** 2))`` over all returns; ``None`` when ``dd == 0`` (no losing
  candle). ``periods_per_year = 365 days / period`` (525,600 for 1m, 365 for 1d: crypto trades
  every day of the year).
* ``max_drawdown = max_i (peak_i - E_i) / peak_i`` with ``peak_i = max(E_0..E_i)``: a fraction
  (``0.23`` = 23 %). Its duration runs from the last point at that peak before the deepest
  trough to the first point back at or above the peak, or to the last point when it never
  recovers (``max_drawdown_recovered``); in ms and in candles. 0 (and durations 0) when the curve
  never falls.
* A round trip is a buy and the sell that closes it (bots are long-only and hold one position;
  a position still open at the end is not a round trip). ``win_rate`` = share of round trips with
  ``realized_pnl > 0`` (``None`` without round trips). ``profit_factor = gross profit / gross
  loss`` over the round trips' realized P&L; ``None`` when the gross loss is 0 (no losing round
  trip: read ``gross_profit`` to tell "only winners" from "no round trips").
* ``num_trades`` = fills; ``round_trips`` = closing sells; ``exposure`` = share of candles
  closed holding a position; ``fees_paid``, ``realized_pnl``, ``gross_profit``, ``gross_loss``
  (positive), ``final_equity``, ``net_profit`` as exact decimal strings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

import msgspec
import numpy as np
import numpy.typing as npt

from bots.portfolio import MONEY, Fill, fmt

__all__ = [
    "LOWER_IS_BETTER",
    "METRIC_NAMES",
    "YEAR_MS",
    "Drawdown",
    "Metrics",
    "compute_metrics",
    "max_drawdown",
    "periods_per_year",
    "simple_returns",
    "sharpe_ratio",
    "sortino_ratio",
]

#: The year of the annualisation: 365 days (crypto markets never close).
YEAR_MS = 365 * 86_400_000

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class Metrics(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The numbers of ``metrics.json`` (see the module docstring for the definitions)."""

    candles: int
    period_ms: int
    periods_per_year: float
    risk_free_rate: float
    total_return: float
    cagr: float | None
    sharpe: float | None
    sortino: float | None
    max_drawdown: float
    max_drawdown_duration_ms: int
    max_drawdown_duration_candles: int
    max_drawdown_recovered: bool
    win_rate: float | None
    profit_factor: float | None
    num_trades: int
    round_trips: int
    exposure: float
    initial_cash: str
    final_equity: str
    net_profit: str
    realized_pnl: str
    gross_profit: str
    gross_loss: str
    fees_paid: str


#: The numeric metrics a sweep can rank by (``--metric``).
METRIC_NAMES: tuple[str, ...] = (
    "total_return",
    "cagr",
    "sharpe",
    "sortino",
    "max_drawdown",
    "max_drawdown_duration_ms",
    "max_drawdown_duration_candles",
    "win_rate",
    "profit_factor",
    "num_trades",
    "round_trips",
    "exposure",
)
#: Metrics where smaller is better (a sweep's heatmap picks the minimum over other params).
LOWER_IS_BETTER = frozenset({"max_drawdown", "max_drawdown_duration_ms", "max_drawdown_duration_candles"})


@dataclass(frozen=True, slots=True)
class Drawdown:
    """The deepest drawdown of a curve: ``depth`` (a fraction), the indices of its ``peak``,
    ``trough`` and ``end`` (the recovery, or the last index when ``recovered`` is false) and its
    duration (``end - peak``) in points and in ms."""

    depth: float
    peak: int
    trough: int
    end: int
    recovered: bool
    duration_candles: int
    duration_ms: int


def periods_per_year(period_ms: int) -> float:
    """Candles per 365-day year: 525,600 for 1m, 8,760 for 1h, 365 for 1d."""
    if period_ms <= 0:
        msg = f"the candle period must be positive, got {period_ms} ms"
        raise ValueError(msg)
    return YEAR_MS / period_ms


def simple_returns(curve: FloatArray) -> FloatArray:
    """``r_i = E_i / E_{i-1} - 1`` for ``i = 1..n`` (0 where ``E_{i-1}`` is 0)."""
    prev, cur = curve[:-1], curve[1:]
    out = np.zeros(len(cur), dtype=np.float64)
    np.divide(cur - prev, prev, out=out, where=prev != 0)
    return out


def sharpe_ratio(returns: FloatArray, *, periods: float) -> float | None:
    """``mean / sample std * sqrt(periods)`` (risk-free 0); ``None`` if undefined."""
    if len(returns) < 2:
        return None
    std = float(np.std(returns, ddof=1))
    if std == 0.0 or not math.isfinite(std):
        return None
    return float(np.mean(returns)) / std * math.sqrt(periods)


def sortino_ratio(returns: FloatArray, *, periods: float) -> float | None:
    """``mean / downside deviation * sqrt(periods)``, downside deviation
    ``sqrt(mean(min(r, 0)^2))``; ``None`` without a negative return."""
    if len(returns) == 0:
        return None
    downside = math.sqrt(float(np.mean(np.minimum(returns, 0.0) ** 2)))
    if downside == 0.0:
        return None
    return float(np.mean(returns)) / downside * math.sqrt(periods)


def max_drawdown(curve: FloatArray, ts: IntArray) -> Drawdown:
    """The deepest drawdown of ``curve`` (times ``ts`` in ms, same length, at least 1 point)."""
    if len(curve) == 0 or len(curve) != len(ts):
        msg = f"max_drawdown needs a non-empty curve and as many times, got {len(curve)} and {len(ts)}"
        raise ValueError(msg)
    peaks = np.maximum.accumulate(curve)
    drops = np.zeros(len(curve), dtype=np.float64)
    np.divide(peaks - curve, peaks, out=drops, where=peaks > 0)  # (peak - E) / peak: 11/110 == 0.1
    trough = int(np.argmax(drops))
    depth = float(drops[trough])
    if depth <= 0.0:
        return Drawdown(0.0, 0, 0, 0, True, 0, 0)
    level = peaks[trough]
    peak = int(np.flatnonzero(curve[: trough + 1] == level)[-1])
    back = np.flatnonzero(curve[trough + 1 :] >= level)
    recovered = len(back) > 0
    end = trough + 1 + int(back[0]) if recovered else len(curve) - 1
    return Drawdown(depth, peak, trough, end, recovered, end - peak, int(ts[end] - ts[peak]))


def _cagr(ratio: Decimal, span_ms: int) -> float | None:
    if span_ms <= 0:
        return None
    if ratio <= 0:
        return -1.0
    try:
        return float(ratio) ** (YEAR_MS / span_ms) - 1.0
    except OverflowError:
        return None


def _total(values: Iterable[Decimal]) -> Decimal:
    """The exact sum (in ``MONEY``, like the portfolio's own totals)."""
    total = Decimal(0)
    for value in values:
        total = MONEY.add(total, value)
    return total


def compute_metrics(
    *,
    ts_close: Sequence[int] | IntArray,
    equity: Sequence[float] | FloatArray,
    in_position: Sequence[bool] | npt.NDArray[np.bool_],
    fills: Sequence[Fill],
    initial_cash: Decimal,
    final_equity: Decimal,
    period_ms: int,
) -> Metrics:
    """The metrics of one run.

    ``ts_close``, ``equity`` (floats) and ``in_position`` have one entry per candle (at least
    one), in time order; ``fills`` are the run's fills in order; ``final_equity`` is the exact
    equity at the last close (``equity[-1]`` as a float). ``ValueError`` on an empty or ragged
    curve.
    """
    n = len(equity)
    if n == 0 or len(ts_close) != n or len(in_position) != n:
        msg = (
            f"compute_metrics needs one ts_close, equity and in_position per candle (at least one), "
            f"got {len(ts_close)}, {n} and {len(in_position)}"
        )
        raise ValueError(msg)
    if initial_cash <= 0:
        msg = f"initial_cash must be positive, got {initial_cash}"
        raise ValueError(msg)
    periods = periods_per_year(period_ms)
    ts = np.asarray(ts_close, dtype=np.int64)
    curve = np.concatenate(([float(initial_cash)], np.asarray(equity, dtype=np.float64)))
    times = np.concatenate(([ts[0] - period_ms], ts))
    returns = simple_returns(curve)
    drawdown = max_drawdown(curve, times)

    sells = [Decimal(f.realized_pnl) for f in fills if f.side == "sell"]
    wins = [p for p in sells if p > 0]
    gross_profit = _total(wins)
    gross_loss = MONEY.minus(_total(p for p in sells if p < 0))
    net = MONEY.subtract(final_equity, initial_cash)
    return Metrics(
        candles=n,
        period_ms=period_ms,
        periods_per_year=periods,
        risk_free_rate=0.0,
        total_return=float(MONEY.divide(net, initial_cash)),
        cagr=_cagr(MONEY.divide(final_equity, initial_cash), int(times[-1] - times[0])),
        sharpe=sharpe_ratio(returns, periods=periods),
        sortino=sortino_ratio(returns, periods=periods),
        max_drawdown=drawdown.depth,
        max_drawdown_duration_ms=drawdown.duration_ms,
        max_drawdown_duration_candles=drawdown.duration_candles,
        max_drawdown_recovered=drawdown.recovered,
        win_rate=len(wins) / len(sells) if sells else None,
        profit_factor=float(MONEY.divide(gross_profit, gross_loss)) if gross_loss > 0 else None,
        num_trades=len(fills),
        round_trips=len(sells),
        exposure=float(np.count_nonzero(np.asarray(in_position, dtype=bool))) / n,
        initial_cash=fmt(initial_cash),
        final_equity=fmt(final_equity),
        net_profit=fmt(net),
        realized_pnl=fmt(_total(sells)),
        gross_profit=fmt(gross_profit),
        gross_loss=fmt(gross_loss),
        fees_paid=fmt(_total(Decimal(f.fee) for f in fills)),
    )
