"""The Backtests page: a backtest or a parameter sweep, run in a background PROCESS, with progress.

The form (strategy, params or a grid, instrument, timeframe, range, fee, slippage, cash) is
checked first (the strategy's own config model; ``backtest.sweep.check_grid``); then, on a
worker thread, the stream's candles are exported from PostgreSQL to
``<home>/backtests/<run>/candles.parquet`` and ``tcp backtest run`` (or ``sweep``) runs as a
child process writing into that directory. Its progress lines (the sweep's bar) drive the page's
progress bar. A finished run opens on the Performance page; a finished sweep shows its best
combinations. Running needs a login (checked on the server).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource
from bokeh.models.widgets import Button, DataTable, Div, Select, TableColumn, TextInput

from bokeh_app import data
from bokeh_app.context import AppContext, choices, in_background
from strategies.registry import available

__all__ = ["BacktestRequest", "BacktestsPage", "check_request"]

_PROGRESS = re.compile(r"(\d+)/(\d+) combinations")


@dataclass(frozen=True)
class BacktestRequest:
    """A checked form: what to run."""

    strategy: str
    params: dict[str, Any] | None  # a single run ...
    grid: dict[str, list[Any]] | None  # ... or a sweep
    inst_id: str
    timeframe: str
    start: str | None
    end: str | None
    fee: str
    slippage_bps: str
    initial_cash: str

    def args(self, candles: Path, out: Path) -> list[str]:
        """The ``tcp backtest`` command line of this request."""
        common = ["--strategy", self.strategy, "--candles", str(candles), "--inst-id", self.inst_id,
                  "--timeframe", self.timeframe, "--fee", self.fee, "--slippage-bps", self.slippage_bps,
                  "--initial-cash", self.initial_cash, "--out", str(out),
                  *(["--start", self.start] if self.start else []), *(["--end", self.end] if self.end else [])]  # fmt: skip
        if self.grid is not None:
            return ["backtest", "sweep", *common, "--grid", json.dumps(self.grid), "--workers", "2"]
        return ["backtest", "run", *common, "--params", json.dumps(self.params or {})]


def check_request(values: dict[str, str], *, sweep: bool) -> tuple[BacktestRequest | None, dict[str, str]]:
    """The form's values -> a request, or the problems by field."""
    from decimal import Decimal, InvalidOperation

    from backtest.engine import BacktestError, backtest_config
    from backtest.export import parse_time
    from backtest.sweep import check_grid, combinations

    errors: dict[str, str] = {}
    strategy = values.get("strategy", "")
    if strategy not in available():
        errors["strategy"] = f"unknown strategy {strategy!r}"
    try:
        data.check_stream(values.get("inst_id", ""), values.get("timeframe", ""))
    except ValueError as exc:
        errors["inst_id"] = str(exc)
    for key in ("start", "end"):
        if values.get(key):
            try:
                parse_time(values[key])
            except ValueError as exc:
                errors[key] = str(exc)
    for key in ("fee", "slippage_bps", "initial_cash"):
        try:
            Decimal(values.get(key, ""))
        except InvalidOperation:
            errors[key] = f"not a number: {values.get(key)!r}"
    params: dict[str, Any] | None = None
    grid: dict[str, list[Any]] | None = None
    try:
        parsed = json.loads(values.get("params") or "{}")
    except json.JSONDecodeError as exc:
        errors["params"] = f"not JSON: {exc.msg}"
        parsed = None
    if parsed is not None and not errors.get("strategy"):
        try:
            if sweep:
                grid = {k: list(v) for k, v in check_grid(parsed).items()}
                if not any(c.error is None for c in combinations(strategy, check_grid(parsed))):
                    errors["params"] = "no valid combination in the grid"
            else:
                if not isinstance(parsed, dict):
                    raise BacktestError("params must be a JSON object")  # noqa: EM101
                backtest_config(strategy=strategy, params=parsed, inst_id=values.get("inst_id", "BTC-USDT"),
                                timeframe=values.get("timeframe", "1m"))  # fmt: skip
                params = parsed
        except (BacktestError, TypeError) as exc:
            errors["params"] = str(exc)
    if errors:
        return None, errors
    return BacktestRequest(strategy, params, grid, values["inst_id"], values["timeframe"], values.get("start") or None,
                           values.get("end") or None, values["fee"], values["slippage_bps"],
                           values["initial_cash"]), {}  # fmt: skip


class BacktestsPage:
    """One session's Backtests page (``layout``). ``open_result(name)`` shows a finished run."""

    def __init__(
        self, ctx: AppContext, doc: Document, *, user: str | None, open_result: Callable[[str], None]
    ) -> None:
        self.ctx, self.doc, self.user, self._open = ctx, doc, user, open_result
        self.root = ctx.settings.home.resolve() / "backtests"
        strategies = sorted(available())
        first = strategies[0] if strategies else ""
        self.inputs: dict[str, TextInput | Select] = {
            "strategy": Select(title="strategy", value=first, options=choices(strategies), width=170),
            "params": TextInput(title="params (JSON) or grid for a sweep", value="{}", width=320),
            "inst_id": TextInput(title="instrument", value="BTC-USDT", width=120),
            "timeframe": Select(title="timeframe", value=ctx.settings.timeframes[0],
                                options=choices(ctx.settings.timeframes), width=90),
            "start": TextInput(title="from (ISO-8601, optional)", value="", width=170),
            "end": TextInput(title="to (optional)", value="", width=170),
            "fee": TextInput(title="fee", value="0.001", width=80),
            "slippage_bps": TextInput(title="slippage bps", value="5", width=90),
            "initial_cash": TextInput(title="initial cash", value="10000", width=100),
        }  # fmt: skip
        self.errors = {
            k: Div(text="", styles={"color": "#c62828"}, width=w.width) for k, w in self.inputs.items()
        }
        self.run_button = Button(
            label="run backtest", button_type="primary", name="backtest-run", disabled=user is None
        )
        self.sweep_button = Button(label="run sweep (grid)", name="backtest-sweep", disabled=user is None)
        self.progress = Div(text="", name="backtest-progress", width=600)
        self.message = Div(text="" if user else "Read-only: <a href='/login'>log in</a> to run backtests.")
        self.best = ColumnDataSource({"params": [], "sharpe": [], "total_return": [], "max_drawdown": []})
        self.best_table = DataTable(source=self.best, height=200, width=700,
                                    columns=[TableColumn(field=k, title=k) for k in self.best.data])  # fmt: skip
        self.run_button.on_click(lambda: self.submit(sweep=False))
        self.sweep_button.on_click(lambda: self.submit(sweep=True))
        keys = list(self.inputs)
        self.layout = column(
            Div(text="<h3>Backtests</h3>"), row(*(column(self.inputs[k], self.errors[k]) for k in keys[:5])),
            row(*(column(self.inputs[k], self.errors[k]) for k in keys[5:])),
            row(self.run_button, self.sweep_button), self.progress, self.message, self.best_table,
            sizing_mode="stretch_width",
        )  # fmt: skip
        self.running: subprocess.Popen[str] | None = None

    def _bar(self, done: int, total: int, text: str) -> None:
        share = 0 if total == 0 else int(100 * done / total)
        self.progress.text = (
            f"<div style='width:400px;border:1px solid #999'><div style='width:{share}%;background:#43a047;"
            f"height:14px'></div></div>{text}"
        )

    def submit(self, *, sweep: bool) -> None:
        if self.user is None:
            self.message.text = (
                "<b>refused:</b> running backtests needs a login (<a href='/login'>log in</a>)."
            )
            return
        if self.running is not None and self.running.poll() is None:
            self.message.text = "A backtest is running: wait for it."
            return
        values = {k: str(w.value) for k, w in self.inputs.items()}
        request, errors = check_request(values, sweep=sweep)
        for field, div in self.errors.items():
            div.text = errors.get(field, "")
        if request is None:
            self.message.text = "Fix the fields marked in red."
            return
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{request.strategy}-{request.inst_id}-{request.timeframe}"
        self._bar(0, 1, "exporting the candles ...")
        in_background(self.ctx, self.doc, lambda: self._run(request, name), lambda code: self._done(request, name, code),
                      self._failed)  # fmt: skip

    def _run(self, request: BacktestRequest, name: str) -> int:
        """On a worker thread: export the candles, then run ``tcp backtest`` as a child process."""
        from backtest.export import export_table

        out = self.root / name
        out.mkdir(parents=True, exist_ok=True)
        candles = out / "candles.parquet"
        rows = export_table(
            self.ctx.dsn, "candles", candles, inst_id=request.inst_id, timeframe=request.timeframe
        )
        if rows == 0:
            msg = f"no {request.inst_id} {request.timeframe} candles in PostgreSQL"
            raise ValueError(msg)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TCP_")} | self.ctx.settings.as_env()
        self.running = subprocess.Popen([sys.executable, "-m", "tcp.cli", *request.args(candles, out)], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        assert self.running.stdout is not None
        lines = []
        for line in self.running.stdout:
            lines.append(line.rstrip())
            found = _PROGRESS.search(line)
            text = line.strip()[:120]
            done, total = (int(found.group(1)), int(found.group(2))) if found else (0, 1)
            self.doc.add_next_tick_callback(partial(self._bar, done, total, text))
        code = self.running.wait()
        (out / "output.txt").write_text("\n".join(lines) + "\n")
        return code

    def _failed(self, error: Exception) -> None:
        self.progress.text = ""
        self.message.text = f"<b>error:</b> {error}"

    def _done(self, request: BacktestRequest, name: str, code: int) -> None:
        out = self.root / name
        if code != 0:
            tail = (out / "output.txt").read_text().strip().splitlines()[-3:]
            self.message.text = f"<b>the backtest failed</b> (exit {code}): " + " / ".join(tail).replace(
                "<", "&lt;"
            )
            return
        self._bar(1, 1, f"done: {out}")
        if request.grid is None:
            self.message.text = f"done: opening {name} on the Performance page"
            self._open(name)
            return
        import pyarrow.parquet as pq

        rows = pq.read_table(out / "sweep.parquet").to_pylist()
        ran = [r for r in rows if r.get("error") is None]
        ranked = sorted(ran, key=lambda r: (r["sharpe"] is None, -(r["sharpe"] or 0.0)))[
            :10
        ]  # undefined last
        keys = list(request.grid)

        def num(value: float | None, digits: int) -> float | None:
            return None if value is None else round(value, digits)

        self.best.data = {
            "params": [json.dumps({k: r[k] for k in keys}) for r in ranked],
            "sharpe": [num(r["sharpe"], 3) for r in ranked],
            "total_return": [num(r["total_return"], 4) for r in ranked],
            "max_drawdown": [num(r["max_drawdown"], 4) for r in ranked],
        }
        self.message.text = (
            f"sweep done: {len(rows)} combinations; the best by Sharpe below; heatmap in {out}/report.html"
        )
