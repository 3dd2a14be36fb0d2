"""Performance metrics of a backtest (or a live bot): from its equity curve and its fills.

Definitions (``equity`` is the portfolio valued at every candle close, in time order):

* ``total_return`` = last / first - 1 (the first value is the equity before any fill acted).
* ``cagr`` = (last / first) ** (1 / years) - 1, years = candles x period / 365.25 days
  (``None`` when that overflows: minutes of data compounded to a year mean nothing).
* per-candle returns r_i = e_i / e_{i-1} - 1; ``sharpe`` = mean(r) / std(r) x sqrt(periods per
  year) (population std, risk-free rate 0); ``sortino`` = mean(r) / downside deviation x the same
  factor, downside deviation = sqrt(mean(min(r, 0)^2)). ``None`` when undefined (no variation).
* ``max_drawdown`` = max over t of 1 - e_t / max(e_0..e_t), a fraction (0.23 = 23 %); its
  ``duration`` runs from the peak before the deepest trough to the recovery above that peak, or
  to the end when it never recovers (``recovered`` says which), in ms and in candles.
* ``win_rate`` = share of round trips (a buy and the sell closing it) with realized P&L > 0;
  ``profit_factor`` = gross profit / gross loss of the round trips (``None`` without losses).
* ``num_trades`` = fills; ``exposure`` = share of candles closed holding a position;
  ``fees_paid`` = sum of fill fees (exact decimal string).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import Decimal

import msgspec

__all__ = ["Metrics", "compute_metrics", "periods_per_year"]

_YEAR_MS = 365.25 * 86_400_000


class Metrics(msgspec.Struct, frozen=True):
    """The numbers of ``metrics.json``."""

    period_ms: int
    periods_per_year: float
    candles: int
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
    fees_paid: str


def periods_per_year(period_ms: int) -> float:
    """Candles per year of 365.25 days (525,960 for 1m)."""
    return _YEAR_MS / period_ms


def compute_metrics(
    *,
    ts_close: Sequence[int],
    equity: Sequence[float],
    positions: Sequence[float],
    realized: Sequence[Decimal],
    fees: Sequence[Decimal],
    period_ms: int,
) -> Metrics:
    """Metrics of an equity curve (one value per candle close, ``ts_close`` in epoch ms),
    the position held at each close, the realized P&L of each closing sell (one per round trip)
    and the fee of every fill."""
    n = len(equity)
    if n == 0:
        msg = "no candles: an empty equity curve has no metrics"
        raise ValueError(msg)
    factor = periods_per_year(period_ms)
    first, last = equity[0], equity[-1]
    total = last / first - 1
    years = n * period_ms / _YEAR_MS
    try:
        cagr = (last / first) ** (1 / years) - 1 if last > 0 and years > 0 else None
    except OverflowError:  # a few minutes of data compounded to a year: not a meaningful figure
        cagr = None
    returns = [equity[i] / equity[i - 1] - 1 for i in range(1, n)]
    sharpe = sortino = None
    if returns:
        mean = math.fsum(returns) / len(returns)
        std = math.sqrt(math.fsum((r - mean) ** 2 for r in returns) / len(returns))
        downside = math.sqrt(math.fsum(min(r, 0.0) ** 2 for r in returns) / len(returns))
        sharpe = mean / std * math.sqrt(factor) if std > 0 else None
        sortino = mean / downside * math.sqrt(factor) if downside > 0 else None
    depth, start, end, recovered = _max_drawdown(equity)
    wins = [r for r in realized if r > 0]
    losses = [r for r in realized if r < 0]
    gross_loss = -sum(losses, Decimal(0))
    return Metrics(
        period_ms=period_ms,
        periods_per_year=factor,
        candles=n,
        total_return=total,
        cagr=cagr,
        sharpe=sharpe,
        sortino=sortino,
        max_drawdown=depth,
        max_drawdown_duration_ms=ts_close[end] - ts_close[start],
        max_drawdown_duration_candles=end - start,
        max_drawdown_recovered=recovered,
        win_rate=len(wins) / len(realized) if realized else None,
        profit_factor=float(sum(wins, Decimal(0)) / gross_loss) if gross_loss > 0 else None,
        num_trades=len(fees),
        round_trips=len(realized),
        exposure=sum(1 for p in positions if p > 0) / n,
        fees_paid=_plain(sum(fees, Decimal(0))),
    )


def _max_drawdown(equity: Sequence[float]) -> tuple[float, int, int, bool]:
    """(depth, index of the peak, index of the recovery or the end, recovered?)."""
    peak_i, depth, best = 0, 0.0, (0, 0)
    for i, value in enumerate(equity):
        if value > equity[peak_i]:
            peak_i = i
        drop = 1 - value / equity[peak_i]
        if drop > depth:
            depth, best = drop, (peak_i, i)
    if depth == 0:
        return 0.0, 0, 0, True
    peak_i, trough = best
    for j in range(trough + 1, len(equity)):
        if equity[j] >= equity[peak_i]:
            return depth, peak_i, j, True
    return depth, peak_i, len(equity) - 1, False


def _plain(value: Decimal) -> str:
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text
