"""Parameter sweeps: one backtest per combination of a grid of strategy params, in parallel.

    tcp backtest sweep --strategy ema_crossover --grid '{"fast": [5, 8, 12], "slow": [20, 26, 50]}' \\
        --candles candles.parquet --inst-id BTC-USDT --timeframe 1m --metric sharpe --workers 2 --out DIR

Every combination of the grid (the cartesian product, in the grid's key and value order) is
checked by the strategy's own config first: an invalid one (``fast >= slow``) is not run and its
row says why. The valid ones run :func:`backtest.engine.backtest` exactly as a single run does
(so a sweep row's metrics equal ``tcp backtest run``'s for the same params), in ``workers``
processes (``concurrent.futures.ProcessPoolExecutor``, ``spawn``: no fork of a process holding
DuckDB or Arrow threads). Each worker process reads the candles ONCE, when it starts, and
builds their ``Candle`` structs once (up to ``CACHE_CANDLES``; beyond, per run), then runs as many
combinations as it is given. With one worker everything runs in this process.

Writes ``sweep.parquet`` (one row per combination, in grid order: ``combination``, the params,
``error``, then every metric of ``metrics.json``, null for invalid rows) and ``report.html``
(a heatmap of ``metric`` over the first two grid parameters; backtest.report).
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TextIO

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from backtest.engine import (
    BacktestError,
    CandleSet,
    TimeBound,
    backtest,
    backtest_config,
    count_candles,
    epoch_ms,
    load_candles,
)
from backtest.metrics import LOWER_IS_BETTER, METRIC_NAMES, Metrics
from bots.config import BotConfig, ParamValue, Sizing, with_params
from strategies.registry import InvalidStrategyParams, UnknownStrategyError, make_strategy

__all__ = [
    "CACHE_CANDLES",
    "Combination",
    "Grid",
    "ProgressBar",
    "SweepResult",
    "SweepRow",
    "check_grid",
    "combinations",
    "parse_grid",
    "progress_line",
    "run_sweep",
    "write_sweep",
]

#: A worker keeps the Candle structs of at most this many candles (~150 bytes each) between runs.
CACHE_CANDLES = 2_000_000

#: A grid: each parameter name with the values to try (in order).
Grid = dict[str, list[ParamValue]]


def check_grid(grid: Mapping[str, Sequence[object]]) -> Grid:
    """``grid`` as a :data:`Grid`: at least one parameter, each with a non-empty list of distinct
    scalars (numbers, strings, booleans); ``BacktestError`` says which entry is wrong."""
    if not isinstance(grid, Mapping) or not grid:
        msg = 'the grid must be a JSON object of parameter -> list of values, e.g. {"fast": [5, 8], "slow": [20]}'
        raise BacktestError(msg)
    out: Grid = {}
    for name, values in grid.items():
        if not isinstance(values, list | tuple) or not values:
            msg = f"grid: {name!r} must be a non-empty list of values, got {values!r}"
            raise BacktestError(msg)
        seen: list[ParamValue] = []
        for value in values:
            if not isinstance(value, bool | int | float | str) or (
                isinstance(value, float) and not math.isfinite(value)
            ):
                msg = f"grid: {name!r} holds {value!r}: values must be finite numbers, strings or booleans"
                raise BacktestError(msg)
            if any(type(value) is type(other) and value == other for other in seen):
                msg = f"grid: {name!r} lists {value!r} twice"
                raise BacktestError(msg)
            seen.append(value)
        out[str(name)] = seen
    return out


def parse_grid(text: str) -> Grid:
    """A grid from JSON text (see :func:`check_grid`); ``BacktestError`` on bad JSON."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"--grid: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise BacktestError(msg) from None
    if not isinstance(data, dict):
        msg = f"--grid must be a JSON object of parameter -> list of values, got {text!r}"
        raise BacktestError(msg)
    return check_grid(data)


@dataclass(frozen=True, slots=True)
class Combination:
    """One point of the grid: its position in grid order, its params, and why it cannot run
    (the strategy config's message) or ``None``."""

    index: int
    params: dict[str, ParamValue]
    error: str | None = None


def combinations(strategy: str, grid: Grid) -> list[Combination]:
    """Every combination of ``grid`` in order, each validated by the strategy's config.
    ``BacktestError`` for an unknown strategy (the message lists the available ones)."""
    names = list(grid)
    out = []
    for index, values in enumerate(itertools.product(*(grid[name] for name in names))):
        params = dict(zip(names, values, strict=True))
        try:
            make_strategy(strategy, params)
        except UnknownStrategyError as exc:
            raise BacktestError(str(exc.args[0])) from None
        except InvalidStrategyParams as exc:
            out.append(Combination(index, params, str(exc.args[0])))
            continue
        out.append(Combination(index, params))
    return out


@dataclass(frozen=True, slots=True)
class SweepRow:
    """One combination's outcome: its metrics, or the error that kept it from running."""

    index: int
    params: dict[str, ParamValue]
    error: str | None
    metrics: Metrics | None


@dataclass(frozen=True, slots=True)
class SweepResult:
    """All rows of a sweep, in grid order, with what was swept."""

    strategy: str
    grid: Grid
    metric: str
    inst_id: str
    timeframe: str
    candles: int
    rows: list[SweepRow]
    elapsed_s: float = field(default=0.0, compare=False)

    @property
    def lower_is_better(self) -> frozenset[str]:
        return LOWER_IS_BETTER

    def _score(self, row: SweepRow) -> float | None:
        if row.metrics is None:
            return None
        value = getattr(row.metrics, self.metric)
        return None if value is None else float(value)

    def best(self) -> SweepRow | None:
        """The valid row with the best ``metric`` (largest; smallest for drawdowns), the first
        in grid order on ties; ``None`` when no row has a value."""
        scored = [(score, row) for row in self.rows if (score := self._score(row)) is not None]
        if not scored:
            return None
        sign = -1.0 if self.metric in LOWER_IS_BETTER else 1.0
        return max(scored, key=lambda item: (sign * item[0], -item[1].index))[1]

    def best_cells(self) -> dict[tuple[ParamValue, ParamValue | None], tuple[float | None, str]]:
        """For each value pair of the first two grid parameters: the best ``metric`` over the
        other parameters and a description (the params of that row, ``invalid: why``, or
        ``undefined``)."""
        names = list(self.grid)
        x_name, y_name = names[0], names[1] if len(names) > 1 else None
        y_values: list[ParamValue | None] = list(self.grid[y_name]) if y_name else [None]
        sign = -1.0 if self.metric in LOWER_IS_BETTER else 1.0
        cells: dict[tuple[ParamValue, ParamValue | None], tuple[float | None, str]] = {}
        for x in self.grid[x_name]:
            for y in y_values:
                rows = [
                    r
                    for r in self.rows
                    if _same(r.params[x_name], x) and (y_name is None or _same(r.params[y_name], y))
                ]
                scored = [(s, r) for r in rows if (s := self._score(r)) is not None]
                if scored:
                    score, row = max(scored, key=lambda item: (sign * item[0], -item[1].index))
                    cells[(x, y)] = (score, json.dumps(row.params))
                elif all(r.error is not None for r in rows):
                    cells[(x, y)] = (None, f"invalid: {rows[0].error}")
                else:
                    cells[(x, y)] = (None, "undefined")
        return cells

    def table(self) -> pa.Table:
        """``sweep.parquet``: combination, the params (typed), error, every metric."""
        columns: dict[str, pa.Array] = {"combination": pa.array([r.index for r in self.rows], pa.int64())}
        for name, values in self.grid.items():
            kind = _param_type(values)
            column = [r.params[name] for r in self.rows]
            columns[name] = pa.array(column if kind != pa.string() else [_text(v) for v in column], kind)
        columns["error"] = pa.array([r.error for r in self.rows], pa.string())
        for info in msgspec.structs.fields(Metrics):
            metric = [None if r.metrics is None else getattr(r.metrics, info.name) for r in self.rows]
            columns[info.name] = pa.array(metric, _metric_type(info.type))
        return pa.table(columns)


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _param_type(values: Sequence[ParamValue]) -> pa.DataType:
    kinds = {type(v) for v in values}
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    return pa.string()


def _metric_type(annotation: object) -> pa.DataType:
    text = str(annotation)
    for name, kind in (
        ("bool", pa.bool_()),
        ("float", pa.float64()),
        ("int", pa.int64()),
        ("str", pa.string()),
    ):
        if name in text:
            return kind
    msg = f"no Parquet type for metrics of type {annotation!r}"
    raise TypeError(msg)


# --------------------------------------------------------------------------------------------
# Progress


def progress_line(done: int, total: int, *, elapsed: float, width: int = 30) -> str:
    """``sweep [#########.....] 5/9 combinations, 3.2 s, about 2.6 s left``."""
    filled = width * done // total if total else width
    left = f", about {elapsed / done * (total - done):.1f} s left" if 0 < done < total else ""
    return (
        f"sweep [{'#' * filled}{'.' * (width - filled)}] {done}/{total} combinations, {elapsed:.1f} s{left}"
    )


class ProgressBar:
    """A progress bar on ``stream`` (stderr by default): redrawn in place on a terminal;
    otherwise a line at every tenth of the way. Call it with ``(done, total)``; ``done == total``
    ends the line."""

    def __init__(self, *, stream: TextIO | None = None) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._tty = self._stream.isatty()
        self._started = time.monotonic()
        self._last_tenth = -1

    def __call__(self, done: int, total: int) -> None:
        line = progress_line(done, total, elapsed=time.monotonic() - self._started)
        if self._tty:
            self._stream.write("\r\x1b[2K" + line + ("\n" if done >= total else ""))
        else:
            tenth = 10 * done // max(total, 1)
            if tenth == self._last_tenth and done < total:
                return
            self._last_tenth = tenth
            self._stream.write(line + "\n")
        self._stream.flush()


# --------------------------------------------------------------------------------------------
# Workers

_SERIES: CandleSet | None = None


def _keep(series: CandleSet) -> CandleSet:
    return series.cached() if len(series) <= CACHE_CANDLES else series


def _init_worker(source: str, inst_id: str, timeframe: str, start: int | None, end: int | None) -> None:
    """A worker process starts: read the candles once."""
    global _SERIES
    _SERIES = _keep(load_candles(Path(source), inst_id=inst_id, timeframe=timeframe, start=start, end=end))


def _run_one(index: int, config: BotConfig) -> tuple[int, Metrics]:
    """One combination, in a worker."""
    if _SERIES is None:  # pragma: no cover - the initializer always ran
        msg = "the sweep worker has no candles"
        raise RuntimeError(msg)
    return index, backtest(_SERIES, config).metrics


def run_sweep(
    candles: Path | str,
    *,
    strategy: str,
    grid: Mapping[str, Sequence[object]],
    inst_id: str,
    timeframe: str,
    start: TimeBound | None = None,
    end: TimeBound | None = None,
    fee: Decimal = Decimal("0.001"),
    slippage_bps: Decimal = Decimal(5),
    initial_cash: Decimal = Decimal(10000),
    sizing: Sizing = "all-in",
    metric: str = "sharpe",
    workers: int | None = None,
    out: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Run every valid combination of ``grid`` (module docstring); with ``out``, write
    ``sweep.parquet`` and ``report.html`` there. ``workers`` defaults to the number of CPUs
    (never more than the valid combinations). ``progress(done, total)`` is called as
    combinations finish.

    Raises ``BacktestError`` (a bad grid, metric, option or strategy; no valid combination),
    ``CandleSourceError`` or ``NoCandlesError`` before anything runs, and
    ``StrategyFailedError`` if a strategy raises.
    """
    if metric not in METRIC_NAMES:
        msg = f"unknown metric {metric!r}; choose from {', '.join(METRIC_NAMES)}"
        raise BacktestError(msg)
    if workers is not None and workers < 1:
        msg = f"workers must be at least 1, got {workers}"
        raise BacktestError(msg)
    checked = check_grid(grid)
    combos = combinations(strategy, checked)
    valid = [c for c in combos if c.error is None]
    if not valid:
        msg = f"no valid combination in the grid: {combos[0].error}"
        raise BacktestError(msg)
    base = backtest_config(strategy=strategy, params=valid[0].params, inst_id=inst_id, timeframe=timeframe,
                           fee=fee, slippage_bps=slippage_bps, initial_cash=initial_cash,
                           sizing=sizing)  # fmt: skip
    configs = {c.index: with_params(base, c.params) for c in valid}
    lo = None if start is None else epoch_ms(start, what="start")
    hi = None if end is None else epoch_ms(end, what="end")
    n = count_candles(candles, inst_id=base.inst_id, timeframe=base.timeframe, start=lo, end=hi)
    started = time.monotonic()
    metrics: dict[int, Metrics] = {}
    report = progress or (lambda done, total: None)
    report(0, len(valid))
    count = min(workers or os.cpu_count() or 1, len(valid))
    if count == 1:
        series = _keep(
            load_candles(candles, inst_id=base.inst_id, timeframe=base.timeframe, start=lo, end=hi)
        )
        for index, config in configs.items():
            metrics[index] = backtest(series, config).metrics
            report(len(metrics), len(valid))
    else:
        context = multiprocessing.get_context("spawn")
        initargs = (str(candles), base.inst_id, base.timeframe, lo, hi)
        with ProcessPoolExecutor(
            count, mp_context=context, initializer=_init_worker, initargs=initargs
        ) as pool:
            futures = [pool.submit(_run_one, index, config) for index, config in configs.items()]
            try:
                for future in as_completed(futures):
                    index, outcome = future.result()
                    metrics[index] = outcome
                    report(len(metrics), len(valid))
            except BaseException:  # a strategy raised, or Ctrl-C: do not run the rest
                for future in futures:
                    future.cancel()
                raise
    rows = [SweepRow(c.index, c.params, c.error, metrics.get(c.index)) for c in combos]
    result = SweepResult(strategy, checked, metric, base.inst_id, base.timeframe, n, rows,
                         time.monotonic() - started)  # fmt: skip
    if out is not None:
        write_sweep(result, out)
    return result


def write_sweep(result: SweepResult, out: Path) -> list[Path]:
    """Write ``sweep.parquet`` and ``report.html`` to the directory ``out``; returns their paths."""
    from backtest.report import write_sweep_report

    out.mkdir(parents=True, exist_ok=True)
    table_path, report_path = out / "sweep.parquet", out / "report.html"
    pq.write_table(result.table(), str(table_path), compression="zstd")
    write_sweep_report(result, report_path)
    return [table_path, report_path]
