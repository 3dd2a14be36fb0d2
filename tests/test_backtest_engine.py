"""backtest.engine and backtest.metrics: the live Bot over stored candles (no services needed)."""

from __future__ import annotations

import json
import math
import statistics
from decimal import Decimal
from pathlib import Path

import msgspec
import pyarrow.parquet as pq
import pytest

from backtest.engine import load_candles, run_backtest
from backtest.metrics import compute_metrics, periods_per_year
from bots.bot import Bot
from bots.config import BotConfig
from dataflows.build import write_parquet
from dataflows.candle_core import Candle
from tests.test_strategies import make_candles, random_closes

PARAMS = {"fast": 4, "slow": 11}


@pytest.fixture(scope="module")
def candles() -> list[Candle]:
    return make_candles(random_closes(3000, seed=17, scale=40_000.0, vol=0.004), inst_id="BTC-USDT")


@pytest.fixture(scope="module")
def candles_file(candles: list[Candle], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("candles") / "candles.parquet"
    other = make_candles(random_closes(50, seed=3), inst_id="ETH-USDT")
    write_parquet([*candles, *other], path)
    return path


def test_the_engine_is_the_live_bot_candle_by_candle(
    candles: list[Candle], candles_file: Path, tmp_path: Path
) -> None:
    """Signals, fills and the equity curve equal the same Bot stepped in a plain loop with its
    own marks (mark=True), string for string; the files hold them."""
    result = run_backtest(candles_file, strategy="ema_crossover", params=PARAMS, inst_id="BTC-USDT",
                          timeframe="1m", fee=Decimal("0.001"), slippage_bps=Decimal(5), out=tmp_path)  # fmt: skip
    config = BotConfig(name="backtest", strategy="ema_crossover", params=PARAMS, inst_id="BTC-USDT",
                       timeframe="1m", fee=Decimal("0.001"), slippage_bps=Decimal(5))  # fmt: skip
    bot = Bot.create(config)
    bot.state = "running"
    signals, fills, marks = [], [], []
    for candle in candles:
        step = bot.on_candle(candle)
        if step.signal is not None:
            signals.append(step.signal)
        if step.fill is not None:
            fills.append(step.fill)
        assert step.mark is not None
        marks.append(step.mark)
    assert result.candles == len(candles) and len(fills) >= 20
    assert result.signals == signals and result.fills == fills
    assert result.equity == [m.equity for m in marks]
    assert result.cash == [m.cash for m in marks] and result.position == [m.position for m in marks]

    trades = pq.read_table(tmp_path / "trades.parquet").to_pylist()
    assert [(t["side"], t["price"], t["size"], t["fee"]) for t in trades] == [
        (f.side, f.price, f.size, f.fee) for f in fills
    ]
    equity = pq.read_table(tmp_path / "equity.parquet")
    assert equity.column("equity").to_pylist() == result.equity
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_trades"] == len(fills) and metrics["candles"] == len(candles)
    assert metrics["fees_paid"] == format(sum(Decimal(f.fee) for f in fills).normalize(), "f")


def test_the_same_inputs_give_byte_identical_files(candles_file: Path, tmp_path: Path) -> None:
    for run in ("a", "b"):
        run_backtest(candles_file, strategy="macd_cross", params={"fast": 5, "slow": 13, "signal": 4},
                     inst_id="BTC-USDT", timeframe="1m", out=tmp_path / run)  # fmt: skip
    for name in ("signals.parquet", "trades.parquet", "equity.parquet", "metrics.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_start_end_and_a_directory_of_partitions_with_revisions(
    candles: list[Candle], tmp_path: Path
) -> None:
    lake = tmp_path / "candles"
    half = len(candles) // 2
    for i, part in enumerate((candles[:half], candles[half:])):
        directory = lake / "inst_id=BTC-USDT" / f"date=part{i}"
        directory.mkdir(parents=True)
        write_parquet(part, directory / "part-0.parquet")
    revised = msgspec.structs.replace(candles[10], close="1", revision=1)
    extra = lake / "inst_id=BTC-USDT" / "date=part9"
    extra.mkdir(parents=True)
    write_parquet([revised], extra / "part-0.parquet")
    loaded = load_candles(lake, inst_id="BTC-USDT", timeframe="1m")
    assert len(loaded) == len(candles) and loaded[10] == revised
    assert loaded[:10] == candles[:10] and loaded[11:] == candles[11:]
    start, end = candles[100].ts_close, candles[200].ts_close
    window = load_candles(lake, inst_id="BTC-USDT", timeframe="1m", start=start, end=end)
    assert [c.ts_close for c in window] == [c.ts_close for c in candles[100:200]]
    with pytest.raises(ValueError, match="no BTC-USDT 1h candles"):
        run_backtest(lake, strategy="ema_crossover", params=PARAMS, inst_id="BTC-USDT", timeframe="1h")


def test_metrics_against_hand_computed_curves() -> None:
    minute = 86_400_000  # daily candles (a CAGR from six minutes would overflow a float)
    ts = [i * minute for i in range(6)]
    equity = [100.0, 110.0, 99.0, 104.5, 120.0, 108.0]
    m = compute_metrics(ts_close=ts, equity=equity, positions=[0, 1, 1, 0, 1, 0],
                        realized=[Decimal(4), Decimal(-2), Decimal(6)], fees=[Decimal("0.1")] * 6,
                        period_ms=minute)  # fmt: skip
    assert m.total_return == pytest.approx(0.08)
    assert m.max_drawdown == pytest.approx(0.1)  # 110 -> 99
    assert (m.max_drawdown_duration_candles, m.max_drawdown_recovered) == (3, True)  # back above 110 at 120
    assert m.max_drawdown_duration_ms == 3 * minute
    returns = [equity[i] / equity[i - 1] - 1 for i in range(1, 6)]
    factor = 365.25
    assert m.periods_per_year == pytest.approx(factor) == periods_per_year(minute)
    assert m.sharpe == pytest.approx(
        statistics.fmean(returns) / statistics.pstdev(returns) * math.sqrt(factor)
    )
    downside = math.sqrt(sum(min(r, 0) ** 2 for r in returns) / len(returns))
    assert m.sortino == pytest.approx(statistics.fmean(returns) / downside * math.sqrt(factor))
    assert m.win_rate == pytest.approx(2 / 3) and m.profit_factor == pytest.approx(10 / 2)
    assert (m.num_trades, m.round_trips, m.exposure, m.fees_paid) == (6, 3, 0.5, "0.6")
    years = 6 * minute / (365.25 * 86_400_000)
    assert m.cagr == pytest.approx(1.08 ** (1 / years) - 1)


def test_metrics_edge_cases() -> None:
    flat = compute_metrics(ts_close=[0, 1, 2], equity=[50.0] * 3, positions=[0, 0, 0], realized=[], fees=[],
                           period_ms=1)  # fmt: skip
    assert (flat.total_return, flat.max_drawdown, flat.sharpe, flat.sortino) == (0.0, 0.0, None, None)
    assert (flat.win_rate, flat.profit_factor, flat.num_trades, flat.fees_paid) == (None, None, 0, "0")
    falling = compute_metrics(ts_close=[0, 10, 20], equity=[100.0, 90.0, 80.0], positions=[1, 1, 1],
                              realized=[Decimal(-20)], fees=[Decimal(1), Decimal(1)], period_ms=10)  # fmt: skip
    assert falling.max_drawdown == pytest.approx(0.2) and not falling.max_drawdown_recovered
    assert (falling.max_drawdown_duration_candles, falling.win_rate, falling.profit_factor) == (2, 0.0, 0.0)
    with pytest.raises(ValueError, match="no candles"):
        compute_metrics(ts_close=[], equity=[], positions=[], realized=[], fees=[], period_ms=1)


def test_tcp_backtest_run_writes_the_results_and_refuses_bad_input_clearly(
    candles_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tcp.cli import main

    out = tmp_path / "run"
    args = ["backtest", "run", "--strategy", "ema_crossover", "--params", '{"fast": 4, "slow": 11}',
            "--candles", str(candles_file), "--inst-id", "BTC-USDT", "--timeframe", "1m", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "3,000 candles" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "signals.parquet",
        "trades.parquet",
        "equity.parquet",
        "metrics.json",
    }
    for params, message in (
        ('{"fast": 30, "slow": 11}', "fast (30) must be smaller than slow (11)"),
        ("[1]", "--params must be a JSON object"),
    ):
        assert main([*args[:5], params, *args[6:]]) == 2
        assert message in capsys.readouterr().err
    assert main([*args[:3], "nope", *args[4:]]) == 2
    assert "nope" in capsys.readouterr().err
    assert main([*args[:7], str(tmp_path / "missing.parquet"), *args[8:]]) == 2
    assert "no candles at" in capsys.readouterr().err
