"""backtest.metrics against independent computations on hand-made equity curves."""

from __future__ import annotations

import math
import statistics
from decimal import Decimal

import numpy as np
import pytest

from backtest.metrics import compute_metrics, max_drawdown, periods_per_year
from bots.portfolio import Fill

DAY = 86_400_000


def fill(seq: int, side: str, realized: str = "0", fee: str = "0.1") -> Fill:
    """A fill where only side, fee and realized P&L matter to the metrics."""
    return Fill(bot="t", seq=seq, ts=seq * DAY, side=side, price="100", size="1", notional="100",  # type: ignore[arg-type]
                fee=fee, cash_after="0", position_after="0", realized_pnl=realized)  # fmt: skip


def round_trips(*realized: str) -> list[Fill]:
    fills = []
    for i, pnl in enumerate(realized):
        fills += [fill(2 * i + 1, "buy"), fill(2 * i + 2, "sell", pnl)]
    return fills


def test_periods_per_year_is_365_days_of_candles() -> None:
    assert periods_per_year(60_000) == 525_600
    assert periods_per_year(3_600_000) == 8_760
    assert periods_per_year(DAY) == 365
    with pytest.raises(ValueError, match="positive"):
        periods_per_year(0)


def test_max_drawdown_100_110_99_120_is_exactly_a_tenth_and_recovers() -> None:
    curve = np.array([100.0, 110.0, 99.0, 120.0])
    ts = np.array([0, 10, 20, 30])
    dd = max_drawdown(curve, ts)
    assert dd.depth == 0.1  # (110 - 99) / 110, exactly
    assert (dd.peak, dd.trough, dd.end, dd.recovered) == (1, 2, 3, True)
    assert (dd.duration_candles, dd.duration_ms) == (2, 20)


def test_max_drawdown_without_recovery_runs_to_the_end_and_picks_the_deepest() -> None:
    # two drawdowns: 100 -> 95 (5 %, recovered) and 120 -> 90 (25 %, never recovered)
    curve = np.array([100.0, 95.0, 120.0, 90.0, 100.0, 110.0])
    dd = max_drawdown(curve, np.arange(6) * 60_000)
    assert dd.depth == 0.25 and (dd.peak, dd.trough, dd.end, dd.recovered) == (2, 3, 5, False)
    assert (dd.duration_candles, dd.duration_ms) == (3, 180_000)


def test_max_drawdown_starts_at_the_last_point_of_a_plateau_and_ends_back_at_the_peak() -> None:
    dd = max_drawdown(np.array([100.0, 110.0, 110.0, 88.0, 110.0]), np.arange(5))
    assert dd.depth == 0.2 and (dd.peak, dd.end, dd.recovered, dd.duration_candles) == (2, 4, True, 2)
    rising = max_drawdown(np.array([1.0, 2.0, 3.0]), np.arange(3))
    assert (rising.depth, rising.duration_candles, rising.recovered) == (0.0, 0, True)


def test_every_metric_of_a_hand_made_run() -> None:
    """Daily candles; the curve starts at the initial cash (100) before the first close."""
    ts = [DAY * (i + 1) for i in range(5)]
    equity = [110.0, 99.0, 104.5, 120.0, 108.0]
    fills = round_trips("4", "-2", "6")  # 6 fills, fees 0.1 each
    m = compute_metrics(ts_close=ts, equity=equity, in_position=[True, True, False, True, False], fills=fills,
                        initial_cash=Decimal(100), final_equity=Decimal(108), period_ms=DAY)  # fmt: skip
    curve = [100.0, *equity]
    returns = [curve[i] / curve[i - 1] - 1 for i in range(1, len(curve))]
    assert m.total_return == 0.08  # 108 / 100 - 1, from the exact decimals
    assert m.candles == 5 and m.period_ms == DAY and m.periods_per_year == 365 and m.risk_free_rate == 0
    assert m.cagr == pytest.approx(1.08 ** (365 / 5) - 1)  # 5 days: from the first open to the last close
    assert m.sharpe == pytest.approx(statistics.mean(returns) / statistics.stdev(returns) * math.sqrt(365))
    downside = math.sqrt(sum(min(r, 0.0) ** 2 for r in returns) / len(returns))
    assert m.sortino == pytest.approx(statistics.mean(returns) / downside * math.sqrt(365))
    assert m.max_drawdown == 0.1  # 110 -> 99
    assert (m.max_drawdown_duration_candles, m.max_drawdown_duration_ms, m.max_drawdown_recovered) == (
        3,
        3 * DAY,
        True,
    )
    assert m.win_rate == 2 / 3 and m.profit_factor == 5.0  # (4 + 6) / 2
    assert (m.num_trades, m.round_trips, m.exposure) == (6, 3, 0.6)
    assert (m.fees_paid, m.realized_pnl, m.gross_profit, m.gross_loss) == ("0.6", "8", "10", "2")
    assert (m.initial_cash, m.final_equity, m.net_profit) == ("100", "108", "8")


def test_no_trades_and_a_flat_curve() -> None:
    m = compute_metrics(ts_close=[1, 2, 3], equity=[50.0] * 3, in_position=[False] * 3, fills=[],
                        initial_cash=Decimal(50), final_equity=Decimal(50), period_ms=1)  # fmt: skip
    assert (m.total_return, m.max_drawdown, m.max_drawdown_duration_candles, m.sharpe, m.sortino) == (
        0.0, 0.0, 0, None, None,
    )  # fmt: skip
    assert (m.win_rate, m.profit_factor, m.num_trades, m.round_trips, m.exposure) == (None, None, 0, 0, 0.0)
    assert (m.fees_paid, m.gross_profit, m.gross_loss, m.net_profit) == ("0", "0", "0", "0")
    assert m.cagr == 0.0


def test_all_losses_only_wins_and_everything_lost() -> None:
    losing = compute_metrics(ts_close=[DAY, 2 * DAY], equity=[90.0, 80.0], in_position=[True, False],
                             fills=round_trips("-5", "-15"), initial_cash=Decimal(100),
                             final_equity=Decimal(80), period_ms=DAY)  # fmt: skip
    assert (losing.win_rate, losing.profit_factor, losing.gross_profit, losing.gross_loss) == (
        0.0,
        0.0,
        "0",
        "20",
    )
    assert losing.max_drawdown == 0.2 and not losing.max_drawdown_recovered
    assert losing.sortino is not None and losing.sortino < 0
    returns = [-0.1, 80 / 90 - 1]
    assert losing.sharpe == pytest.approx(
        statistics.mean(returns) / statistics.stdev(returns) * math.sqrt(365)
    )

    winning = compute_metrics(ts_close=[DAY], equity=[101.0], in_position=[False], fills=round_trips("1"),
                              initial_cash=Decimal(100), final_equity=Decimal(101), period_ms=DAY)  # fmt: skip
    assert (winning.win_rate, winning.profit_factor, winning.gross_loss) == (
        1.0,
        None,
        "0",
    )  # no loss: undefined
    assert (winning.sharpe, winning.sortino) == (None, None)  # one return: no std; no loss: no downside

    ruined = compute_metrics(ts_close=[DAY, 2 * DAY], equity=[0.0, 0.0], in_position=[False, False],
                             fills=round_trips("-100"), initial_cash=Decimal(100), final_equity=Decimal(0),
                             period_ms=DAY)  # fmt: skip
    assert (ruined.total_return, ruined.cagr, ruined.max_drawdown) == (-1.0, -1.0, 1.0)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        compute_metrics(ts_close=[], equity=[], in_position=[], fills=[], initial_cash=Decimal(1),
                        final_equity=Decimal(1), period_ms=1)  # fmt: skip
    with pytest.raises(ValueError, match="initial_cash must be positive"):
        compute_metrics(ts_close=[1], equity=[1.0], in_position=[False], fills=[], initial_cash=Decimal(0),
                        final_equity=Decimal(1), period_ms=1)  # fmt: skip
