"""The ``tcp backtest`` command: ``run`` and ``sweep`` (wired into ``tcp.cli`` with
:func:`register_backtest`). Neither needs a service: DuckDB reads the Parquet.

    tcp backtest run --strategy NAME [--params JSON] --candles FILE_OR_LAKE --inst-id ID
        --timeframe TF [--start T] [--end T] [--fee 0.001] [--slippage-bps 5]
        [--initial-cash 10000] --out DIR
    tcp backtest sweep --strategy NAME --grid JSON --candles FILE_OR_LAKE --inst-id ID
        --timeframe TF [--start T] [--end T] [--fee ...] [--slippage-bps ...]
        [--initial-cash ...] [--metric sharpe] [--workers N] --out DIR

Times are ISO-8601 (no offset means UTC) or epoch milliseconds; the range is
``start <= ts_close < end``. Exit codes: 0 done; 2 for a problem with the input, printed as
``error: ...`` (bad JSON, an unknown strategy (the available ones are listed), params the
strategy rejects (its message), a missing or unusable candles source, no candles in the range,
an option out of range); 1 when the strategy raised during the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING

from backtest.engine import BacktestError, StrategyFailedError, run_backtest
from backtest.metrics import METRIC_NAMES
from backtest.sweep import ProgressBar, parse_grid, run_sweep

if TYPE_CHECKING:
    from bots.config import ParamValue
    from tcp.config import Settings

__all__ = ["cmd_run", "cmd_sweep", "parse_params", "register_backtest", "time_arg"]


def time_arg(text: str) -> datetime:
    """An argparse type: ISO-8601 (no offset = UTC) or epoch ms."""
    from backtest.export import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        msg = f"expected a decimal number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not value.is_finite():
        msg = f"expected a finite decimal number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _sizing(text: str) -> object:
    """``all-in`` or a JSON object; the bot config checks it (a bad one is ``error: ...``)."""
    if text == "all-in":
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f'--sizing: all-in or a JSON object like {{"fraction": 0.5}}, got {text!r} ({exc.msg})'
        raise argparse.ArgumentTypeError(msg) from None


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a whole number of processes >= 1, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _reject_constant(name: str) -> object:
    msg = f"{name} is not a number in JSON"
    raise ValueError(msg)


def parse_params(text: str) -> dict[str, ParamValue]:
    """Strategy params from JSON text: an object of numbers, strings and booleans (the
    strategy's config checks them). ``BacktestError`` names what is wrong."""
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        msg = f"--params: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise BacktestError(msg) from None
    except ValueError as exc:
        msg = f"--params: {exc}"
        raise BacktestError(msg) from None
    if not isinstance(data, dict):
        msg = f'--params must be a JSON object like {{"fast": 12, "slow": 26}}, got {text!r}'
        raise BacktestError(msg)
    return data


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", required=True, help="a registered strategy (a wrong name lists them)")
    p.add_argument("--candles", required=True, type=Path,
                   help="a candles Parquet file (tcp candles build / export) or a lake directory")  # fmt: skip
    p.add_argument("--inst-id", required=True, help="the instrument, e.g. BTC-USDT")
    p.add_argument("--timeframe", required=True, help="the candles' timeframe, e.g. 1m")
    p.add_argument("--start", type=time_arg, help="from this close time, inclusive (ISO-8601 or epoch ms)")
    p.add_argument("--end", type=time_arg, help="until this close time, exclusive (ISO-8601 or epoch ms)")
    p.add_argument("--fee", type=_decimal, default=Decimal("0.001"), help="rate of the notional (0.001)")
    p.add_argument(
        "--slippage-bps", type=_decimal, default=Decimal(5), help="basis points against the bot (5)"
    )
    p.add_argument("--initial-cash", type=_decimal, default=Decimal(10000), help="quote currency (10000)")
    p.add_argument(
        "--sizing",
        type=_sizing,
        default="all-in",
        help='how much a buy spends: all-in (default), {"fraction": 0.5} or {"quote": 1000}',
    )
    p.add_argument("--out", required=True, type=Path, help="the directory for the results")


def register_backtest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``backtest run`` and ``backtest sweep`` to the ``tcp`` subcommands."""
    p = sub.add_parser(
        "backtest",
        help="backtests: the live strategy and bot classes over stored candles",
        description="Run the live strategy and bot classes over candles read from Parquet (no services).",
    )
    actions = p.add_subparsers(dest="backtest_action", required=True, metavar="{run,sweep}")
    run = actions.add_parser(
        "run",
        help="one strategy + bot over the candles of one stream",
        description="Writes signals.parquet, trades.parquet, equity.parquet, metrics.json and report.html.",
    )
    _common(run)
    run.add_argument("--params", default="{}", help='the strategy params, a JSON object ({"fast": 12})')
    run.set_defaults(func=cmd_run)
    sweep = actions.add_parser(
        "sweep",
        help="a backtest per combination of a grid of params, in parallel",
        description="Writes sweep.parquet (params + metrics per combination) and report.html (a heatmap).",
    )
    _common(sweep)
    sweep.add_argument(
        "--grid", required=True, help='params -> values to try, e.g. {"fast": [5, 8], "slow": [20, 26]}'
    )
    sweep.add_argument(
        "--metric", choices=METRIC_NAMES, default="sharpe", help="the heatmap's metric (sharpe)"
    )
    sweep.add_argument("--workers", type=_workers, help="processes (default: the number of CPUs)")
    sweep.set_defaults(func=cmd_sweep)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cmd_run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """``tcp backtest run``: prints a summary and the files written."""
    started = time.perf_counter()
    try:
        result = run_backtest(
            args.candles,
            strategy=args.strategy,
            params=parse_params(args.params),
            inst_id=args.inst_id,
            timeframe=args.timeframe,
            start=args.start,
            end=args.end,
            fee=args.fee,
            slippage_bps=args.slippage_bps,
            initial_cash=args.initial_cash,
            sizing=args.sizing,
            out=args.out,
        )
    except StrategyFailedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BacktestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    m = result.metrics
    print(
        f"{result.candles:,} candles in {elapsed:.2f} s ({result.candles / elapsed:,.0f} candles/s): "
        f"{len(result.signals):,} signals, {m.num_trades:,} fills, {m.round_trips:,} round trips"
    )
    print(
        f"total return {m.total_return:.2%}, max drawdown {m.max_drawdown:.2%}, sharpe {_fmt(m.sharpe, '.2f')}, "
        f"win rate {_fmt(m.win_rate, '.1%')}, fees {m.fees_paid}, final equity {m.final_equity}"
    )
    print(f"written to {args.out}: signals.parquet trades.parquet equity.parquet metrics.json report.html")
    return 0


def cmd_sweep(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """``tcp backtest sweep``: a progress bar on stderr, then the best combination."""
    try:
        result = run_sweep(
            args.candles,
            strategy=args.strategy,
            grid=parse_grid(args.grid),
            inst_id=args.inst_id,
            timeframe=args.timeframe,
            start=args.start,
            end=args.end,
            fee=args.fee,
            slippage_bps=args.slippage_bps,
            initial_cash=args.initial_cash,
            sizing=args.sizing,
            metric=args.metric,
            workers=args.workers,
            out=args.out,
            progress=ProgressBar(),
        )
    except StrategyFailedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BacktestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    invalid = [row for row in result.rows if row.error is not None]
    runs = len(result.rows) - len(invalid)
    print(
        f"{len(result.rows)} combinations ({runs} run, {len(invalid)} invalid) over {result.candles:,} candles "
        f"in {result.elapsed_s:.1f} s ({runs / max(result.elapsed_s, 1e-9):.2f} backtests/s)"
    )
    for row in invalid:
        print(f"  skipped {json.dumps(row.params)}: {row.error}")
    best = result.best()
    if best is not None and best.metrics is not None:
        print(
            f"best {result.metric}: {getattr(best.metrics, result.metric)!r} with {json.dumps(best.params)}"
        )
    print(f"written to {args.out}: sweep.parquet report.html")
    return 0
