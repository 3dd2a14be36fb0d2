"""backtest.engine, report, sweep and the ``tcp backtest`` command: the live classes over stored
candles (no services needed)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backtest.commands import register_backtest
from backtest.engine import (
    BacktestError,
    CandleSet,
    CandleSourceError,
    NoCandlesError,
    StrategyFailedError,
    backtest,
    backtest_config,
    load_candles,
    run_backtest,
)
from backtest.sweep import ProgressBar, check_grid, combinations, progress_line, run_sweep
from bots.bot import Bot
from bots.config import FractionSizing, ParamValue, Sizing
from bots.lifecycle import Command
from bots.portfolio import Portfolio
from dataflows.build import write_parquet
from dataflows.candle_core import Candle
from strategies.ema_crossover import EmaCrossover
from strategies.registry import make_strategy
from tests.test_strategies import STRATEGY_PARAMS, make_candles, random_closes

PARAMS = {"fast": 4, "slow": 11}
N = 3000


@pytest.fixture(scope="module")
def candles() -> list[Candle]:
    return make_candles(random_closes(N, seed=17, scale=40_000.0, vol=0.004))


@pytest.fixture(scope="module")
def candles_file(candles: list[Candle], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BTC 1m candles, with ETH 1m and BTC 5m candles in the same file (filtered out)."""
    path = tmp_path_factory.mktemp("candles") / "candles.parquet"
    eth = make_candles(random_closes(50, seed=3), inst_id="ETH-USDT")
    five = make_candles(random_closes(50, seed=4), timeframe="5m")
    write_parquet([*candles, *eth, *five], path)
    return path


def live_bot(
    strategy: str, params: dict[str, ParamValue], *, sizing: Sizing, fee: Decimal, slippage_bps: Decimal
) -> Bot:
    config = backtest_config(strategy=strategy, params=params, inst_id="BTC-USDT", timeframe="1m", sizing=sizing,
                             fee=fee, slippage_bps=slippage_bps)  # fmt: skip
    bot = Bot.create(config)
    assert bot.on_command(Command(id="s", action="start", bot=bot.name, at=1), at=1).ok
    return bot


# --------------------------------------------------------------------------------------------
# The engine is the live classes


def test_signals_and_fills_equal_a_plain_loop_with_the_strategy_and_the_fill_rule(
    candles: list[Candle], candles_file: Path
) -> None:
    result = run_backtest(
        candles_file, strategy="ema_crossover", params=PARAMS, inst_id="BTC-USDT", timeframe="1m"
    )
    config = result.config
    strategy = make_strategy("ema_crossover", PARAMS)
    portfolio = Portfolio.for_config(config)
    signals, fills = [], []
    for candle in candles:
        signal = strategy.on_candle(candle)
        if signal is not None:
            signals.append(signal)
            fill = portfolio.apply(signal.action, candle.close, candle.ts_close, fee=Decimal("0.001"),
                                   slippage_bps=Decimal(5))  # fmt: skip
            if fill is not None:
                fills.append(fill)
    assert result.candles == N and len(fills) >= 100
    assert result.signals == signals and result.fills == fills


@pytest.mark.parametrize(("name", "params"), STRATEGY_PARAMS, ids=[name for name, _ in STRATEGY_PARAMS])
def test_the_equity_curve_equals_the_bots_own_marks_string_for_string(
    name: str, params: dict[str, ParamValue], candles: list[Candle]
) -> None:
    """mark=False plus the curve computed afterwards == Bot.on_candle(mark=True), candle by candle
    (a fraction sizing, so the bot holds cash and a position at once)."""
    sizing = FractionSizing(fraction=Decimal("0.7"))
    bot = live_bot(name, params, sizing=sizing, fee=Decimal("0.00075"), slippage_bps=Decimal(3))
    marks = [mark for candle in candles if (mark := bot.on_candle(candle).mark) is not None]
    result = backtest(CandleSet.from_candles(candles), bot.config)
    assert len(marks) == N and len(result.fills) >= 20
    assert result.equity.equity.to_pylist() == [m.equity for m in marks]
    assert result.equity.cash_texts() == [m.cash for m in marks]
    assert result.equity.position_texts() == [m.position for m in marks]
    assert result.metrics.fees_paid == marks[-1].fees_paid and result.metrics.final_equity == marks[-1].equity


def test_candles_read_back_exactly_whatever_the_column_type(tmp_path: Path) -> None:
    """decimal128 columns print tiny values and 0 in scientific notation: they come back canonical."""
    base = make_candles([0.00000123, 0.0000001, 5e-18, 1234567.5, 0.00000123])
    candles = [
        msgspec.structs.replace(c, volume="0", trade_count=0)
        if i % 2
        else msgspec.structs.replace(c, vwap=c.low)
        for i, c in enumerate(base)
    ]
    for decimals in ("decimal", "string"):
        write_parquet(candles, tmp_path / f"{decimals}.parquet", decimals=decimals)
        loaded = load_candles(tmp_path / f"{decimals}.parquet", inst_id="BTC-USDT", timeframe="1m")
        assert list(loaded.candles()) == candles, decimals


def test_a_strategy_that_raises_stops_the_backtest_with_its_reason(
    candles: list[Candle], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = EmaCrossover.on_new_candle

    def flaky(self: EmaCrossover, candle: Candle) -> object:
        if candle.ts_close == candles[100].ts_close:
            raise ZeroDivisionError("boom")
        return original(self, candle)

    monkeypatch.setattr(EmaCrossover, "on_new_candle", flaky)
    config = backtest_config(strategy="ema_crossover", params=PARAMS, inst_id="BTC-USDT", timeframe="1m")
    with pytest.raises(StrategyFailedError, match="ZeroDivisionError: boom"):
        backtest(CandleSet.from_candles(candles), config)


# --------------------------------------------------------------------------------------------
# Inputs and outputs


def test_outputs_are_byte_identical_for_the_same_inputs(candles_file: Path, tmp_path: Path) -> None:
    runs = [
        run_backtest(
            candles_file,
            strategy="macd_cross",
            params={"fast": 5, "slow": 13, "signal": 4},
            inst_id="BTC-USDT",
            timeframe="1m",
            out=tmp_path / run,
        )  # fmt: skip
        for run in ("a", "b")
    ]
    for name in ("signals.parquet", "trades.parquet", "equity.parquet", "metrics.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    trades = pq.read_table(tmp_path / "a" / "trades.parquet")
    assert trades.column_names == ["seq", "ts", "side", "price", "size", "fee", "notional", "cash_after",
                                   "position_after", "realized_pnl"]  # fmt: skip
    assert trades.column("price").to_pylist() == [f.price for f in runs[0].fills]
    assert trades.column("ts").type == pa.timestamp("ms", tz="UTC")
    signals = pq.read_table(tmp_path / "a" / "signals.parquet").to_pylist()
    assert [(s["action"], s["price"], json.loads(s["indicators"])) for s in signals] == [
        (s.action, s.price, s.indicators) for s in runs[0].signals
    ]
    equity = pq.read_table(tmp_path / "a" / "equity.parquet")
    assert equity.column_names == ["ts_close", "close", "equity", "cash", "position"]
    assert equity.column("equity").to_pylist() == runs[0].equity.equity.to_pylist()
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["backtest"]["params"] == {"fast": 5, "slow": 13, "signal": 4}
    assert metrics["metrics"] == msgspec.to_builtins(runs[0].metrics)
    assert metrics["metrics"]["periods_per_year"] == 525_600


def test_start_end_filter_on_close_time(candles: list[Candle], candles_file: Path) -> None:
    start, end = candles[100].ts_close, candles[200].ts_close
    window = load_candles(candles_file, inst_id="BTC-USDT", timeframe="1m", start=start, end=end)
    assert window.ts_close.tolist() == [c.ts_close for c in candles[100:200]]
    as_datetimes = load_candles(candles_file, inst_id="BTC-USDT", timeframe="1m",
                                start=datetime.fromtimestamp(start / 1000, tz=UTC),
                                end=datetime.fromtimestamp(end / 1000, tz=UTC))  # fmt: skip
    assert as_datetimes.ts_close.tolist() == window.ts_close.tolist()
    assert (
        list(load_candles(candles_file, inst_id="BTC-USDT", timeframe="1m", end=end).candles())
        == candles[:200]
    )
    with pytest.raises(BacktestError, match="must be before end"):
        load_candles(candles_file, inst_id="BTC-USDT", timeframe="1m", start=end, end=start)
    with pytest.raises(NoCandlesError, match="no BTC-USDT 1h candles"):
        load_candles(candles_file, inst_id="BTC-USDT", timeframe="1h")


def test_a_lake_directory_with_partitions_and_a_revised_duplicate(
    candles: list[Candle], tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    half = len(candles) // 2
    parts = {"2024-03-10": candles[half:], "2024-03-09": candles[:half]}  # written out of order
    for date, part in parts.items():
        directory = lake / "candles" / "inst_id=BTC-USDT" / f"date={date}"
        directory.mkdir(parents=True)
        write_parquet(part, directory / "part-0.parquet")
    revised = msgspec.structs.replace(candles[10], close="1", low="1", revision=1)
    write_parquet([revised], lake / "candles" / "inst_id=BTC-USDT" / "date=2024-03-09" / "part-1.parquet")
    eth = lake / "candles" / "inst_id=ETH-USDT" / "date=2024-03-09"
    eth.mkdir(parents=True)
    eth_candles = make_candles(random_closes(20, seed=1), inst_id="ETH-USDT")
    table = write_parquet(eth_candles, tmp_path / "eth.parquet")
    pq.write_table(table.drop(["inst_id"]), eth / "part-0.parquet")  # the instrument only in the path
    want = [*candles[:10], revised, *candles[11:]]
    for root in (lake, lake / "candles"):  # the lake root or its candles directory
        loaded = load_candles(root, inst_id="BTC-USDT", timeframe="1m")
        assert list(loaded.candles()) == want
    assert list(load_candles(lake, inst_id="ETH-USDT", timeframe="1m").candles()) == eth_candles
    result = run_backtest(lake, strategy="ema_crossover", params=PARAMS, inst_id="BTC-USDT", timeframe="1m")
    assert result.candles == N and result.equity.close[10].as_py() == "1"


def test_the_report_holds_the_bokeh_plot_and_the_metrics(candles_file: Path, tmp_path: Path) -> None:
    result = run_backtest(candles_file, strategy="ema_crossover", params=PARAMS, inst_id="BTC-USDT",
                          timeframe="1m", out=tmp_path)  # fmt: skip
    html = (tmp_path / "report.html").read_text()
    assert "Bokeh" in html and "<script" in html and "cdn.bokeh.org" not in html  # inline, works offline
    for name in ("price, signals and fills", "equity (quote currency)", "drawdown (%)"):
        assert name in html
    m = result.metrics
    for text in (m.fees_paid, m.final_equity, repr(m.max_drawdown), repr(m.sharpe), "num_trades"):
        assert text in html, text


def test_unusable_sources_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(CandleSourceError, match="does not exist"):
        load_candles(tmp_path / "missing.parquet", inst_id="BTC-USDT", timeframe="1m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CandleSourceError, match="no Parquet files"):
        load_candles(tmp_path / "empty", inst_id="BTC-USDT", timeframe="1m")
    floats = pa.table({"inst_id": ["BTC-USDT"], "timeframe": ["1m"], "ts_close": [60_000], "open": [1.0],
                       "high": [1.0], "low": [1.0], "close": [1.0], "volume": [1.0], "quote_volume": [1.0],
                       "trade_count": [1]})  # fmt: skip
    pq.write_table(floats, tmp_path / "floats.parquet")
    with pytest.raises(CandleSourceError, match="open is DOUBLE.*must be exact"):
        load_candles(tmp_path / "floats.parquet", inst_id="BTC-USDT", timeframe="1m")
    pq.write_table(floats.drop(["volume"]), tmp_path / "short.parquet")
    with pytest.raises(CandleSourceError, match="no column volume"):
        load_candles(tmp_path / "short.parquet", inst_id="BTC-USDT", timeframe="1m")


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(BacktestError, match="unknown strategy 'nope'; available: .*ema_crossover"):
        backtest_config(strategy="nope", inst_id="BTC-USDT", timeframe="1m")
    with pytest.raises(BacktestError, match=r"fast \(30\) must be smaller than slow \(11\)"):
        backtest_config(
            strategy="ema_crossover", params={"fast": 30, "slow": 11}, inst_id="BTC-USDT", timeframe="1m"
        )
    with pytest.raises(BacktestError, match="fee: Input should be less than 0.1"):
        backtest_config(strategy="ema_crossover", inst_id="BTC-USDT", timeframe="1m", fee=Decimal("0.5"))
    with pytest.raises(BacktestError, match="invalid timeframe"):
        backtest_config(strategy="ema_crossover", inst_id="BTC-USDT", timeframe="7m")


# --------------------------------------------------------------------------------------------
# Sweeps

GRID = {"fast": [3, 5, 8], "slow": [5, 8, 13]}


def test_a_sweep_in_two_processes_gives_the_single_runs_metrics(candles_file: Path, tmp_path: Path) -> None:
    ticks: list[tuple[int, int]] = []
    sweep = run_sweep(candles_file, strategy="ema_crossover", grid=GRID, inst_id="BTC-USDT", timeframe="1m",
                      metric="total_return", workers=2, out=tmp_path, progress=lambda d, t: ticks.append((d, t)))  # fmt: skip
    series = load_candles(candles_file, inst_id="BTC-USDT", timeframe="1m")
    assert [row.params for row in sweep.rows] == [
        {"fast": f, "slow": s} for f in GRID["fast"] for s in GRID["slow"]
    ]
    invalid = {(row.params["fast"], row.params["slow"]): row.error for row in sweep.rows if row.error}
    assert set(invalid) == {(5, 5), (8, 5), (8, 8)}
    assert (
        invalid[(8, 5)]
        == "invalid params for strategy 'ema_crossover': fast (8) must be smaller than slow (5)"
    )
    for row in sweep.rows:
        if row.error is None:
            config = backtest_config(
                strategy="ema_crossover", params=row.params, inst_id="BTC-USDT", timeframe="1m"
            )
            assert row.metrics == backtest(series, config).metrics, row.params
        else:
            assert row.metrics is None
    assert ticks[0] == (0, 6) and ticks[-1] == (6, 6)

    table = pq.read_table(tmp_path / "sweep.parquet")
    assert table.num_rows == 9 and table.column_names[:4] == ["combination", "fast", "slow", "error"]
    assert table.schema.field("fast").type == pa.int64() and table.schema.field("sharpe").type == pa.float64()
    rows = table.to_pylist()
    assert [r["total_return"] for r in rows] == [
        None if r.metrics is None else r.metrics.total_return for r in sweep.rows
    ]
    html = (tmp_path / "report.html").read_text()
    assert "total_return over fast x slow" in html and "invalid" in html
    best = sweep.best()
    assert best is not None and best.metrics is not None
    assert best.metrics.total_return == max(
        r.metrics.total_return for r in sweep.rows if r.metrics is not None
    )


def test_grids_are_checked_and_combinations_validated_by_the_strategy() -> None:
    with pytest.raises(BacktestError, match="non-empty list"):
        check_grid({"fast": []})
    with pytest.raises(BacktestError, match="lists 3 twice"):
        check_grid({"fast": [3, 3]})
    with pytest.raises(BacktestError, match="must be finite numbers, strings or booleans"):
        check_grid({"fast": [[1]]})
    combos = combinations("ema_crossover", {"fast": [3, 9], "slow": [8]})
    assert [(c.params, c.error is None) for c in combos] == [
        ({"fast": 3, "slow": 8}, True),
        ({"fast": 9, "slow": 8}, False),
    ]
    assert (
        progress_line(3, 6, elapsed=3.0, width=10)
        == "sweep [#####.....] 3/6 combinations, 3.0 s, about 3.0 s left"
    )


def test_the_progress_bar_writes_a_line_per_tenth_off_a_terminal(tmp_path: Path) -> None:
    with (tmp_path / "log").open("w") as stream:
        bar = ProgressBar(stream=stream)
        for done in range(101):
            bar(done, 100)
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("sweep [" + "#" * 30 + "] 100/100")


# --------------------------------------------------------------------------------------------
# The command


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tcp")
    register_backtest(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_tcp_backtest_run_and_sweep(
    candles_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--candles", str(candles_file), "--inst-id", "BTC-USDT", "--timeframe", "1m"]
    args = parse(["backtest", "run", "--strategy", "ema_crossover", "--params", '{"fast": 4, "slow": 11}', *common,
                  "--fee", "0.002", "--start", "2024-03-10T01:00:00Z", "--out", str(tmp_path / "run")])  # fmt: skip
    assert args.func(args, None) == 0
    out = capsys.readouterr().out
    assert "2,941 candles" in out  # ts_close >= 01:00: candles 59.. and "written to" in out
    assert {p.name for p in (tmp_path / "run").iterdir()} == {
        "signals.parquet", "trades.parquet", "equity.parquet", "metrics.json", "report.html",
    }  # fmt: skip
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["backtest"]["fee"] == "0.002"

    args = parse(["backtest", "sweep", "--strategy", "ema_crossover", "--grid", '{"fast": [3, 9], "slow": [8]}',
                  *common, "--workers", "1", "--metric", "win_rate", "--out", str(tmp_path / "sweep")])  # fmt: skip
    assert args.func(args, None) == 0
    captured = capsys.readouterr()
    assert "2 combinations (1 run, 1 invalid)" in captured.out and "best win_rate" in captured.out
    assert "skipped" in captured.out and "fast (9) must be smaller than slow (8)" in captured.out
    assert "sweep [" in captured.err and "1/1 combinations" in captured.err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--params": "{fast: 4}"}, "--params: invalid JSON at line 1 column 2"),
        ({"--params": "[4, 11]"}, "--params must be a JSON object"),
        (
            {"--params": '{"fast": 30, "slow": 11}'},
            "invalid params for strategy 'ema_crossover': fast (30) must be",
        ),
        ({"--strategy": "nope"}, "unknown strategy 'nope'; available: bollinger_breakout, ema_crossover"),
        (
            {"--candles": "/nonexistent/candles.parquet"},
            "candles: /nonexistent/candles.parquet does not exist",
        ),
        ({"--timeframe": "1h"}, "no BTC-USDT 1h candles"),
        ({"--inst-id": "btc"}, "inst_id: 'btc' is not an instrument id"),
    ],
)
def test_tcp_backtest_run_refuses_bad_input_with_exit_2(
    change: dict[str, str],
    message: str,
    candles_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = {"--strategy": "ema_crossover", "--params": "{}", "--candles": str(candles_file),
               "--inst-id": "BTC-USDT", "--timeframe": "1m", "--out": str(tmp_path)} | change  # fmt: skip
    args = parse(["backtest", "run", *(item for pair in options.items() for item in pair)])
    assert args.func(args, None) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_bad_options_and_a_bad_grid_exit_2(
    candles_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["backtest", "run", "--strategy", "ema_crossover", "--candles", str(candles_file), "--inst-id", "BTC-USDT",
            "--timeframe", "1m", "--out", str(tmp_path)]  # fmt: skip
    for extra, message in ((["--fee", "abc"], "expected a decimal number, got 'abc'"),
                           (["--start", "yesterday"], "expected an ISO-8601 time")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            parse([*base, *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    sweep = ["backtest", "sweep", *base[2:], "--grid"]
    for grid, message in (('{"fast": 3}', "'fast' must be a non-empty list"),
                          ('{"fast": [20], "slow": [8]}', "no valid combination in the grid: invalid params")):  # fmt: skip
        args = parse([*sweep, grid])
        assert args.func(args, None) == 2
        assert message in capsys.readouterr().err
