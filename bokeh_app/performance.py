"""The Performance page: equity and drawdown of bots and backtest results, compared on one chart,
with their metric cards and the fills of the first one.

Bots come from PostgreSQL (bot_performance, bot_trades; metrics computed with the backtests'
own definitions, backtest/metrics.py); backtest results from their directories under
``<home>/backtests`` (what the Backtests page and ``tcp backtest run --out`` write). Curves are
drawn as returns (equity / initial cash - 1) so that runs of different sizes compare.
"""

from __future__ import annotations

from typing import Any

from bokeh.document import Document
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, NumeralTickFormatter
from bokeh.models.widgets import DataTable, Div, MultiChoice, TableColumn
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from bokeh_app import data
from bokeh_app.context import AppContext, choices, in_background

__all__ = ["CARD_METRICS", "PerformancePage", "cards_html"]

#: The metric cards, in order: (key in metrics.json, label, format).
CARD_METRICS = (
    ("total_return", "total return", "{:.2%}"),
    ("cagr", "CAGR", "{:.2%}"),
    ("sharpe", "Sharpe", "{:.2f}"),
    ("sortino", "Sortino", "{:.2f}"),
    ("max_drawdown", "max drawdown", "{:.2%}"),
    ("win_rate", "win rate", "{:.1%}"),
    ("profit_factor", "profit factor", "{:.2f}"),
    ("num_trades", "fills", "{:,}"),
    ("exposure", "exposure", "{:.1%}"),
    ("fees_paid", "fees", "{}"),
    ("final_equity", "final equity", "{}"),
)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def cards_html(runs: list[data.Run]) -> str:
    """One row of metric cards per run (an HTML table; values escaped by construction: numbers)."""
    head = "".join(f"<th style='padding:4px 10px'>{label}</th>" for _, label, _ in CARD_METRICS)
    rows = []
    for run in runs:
        cells = "".join(
            f"<td style='padding:4px 10px; text-align:right'>{_fmt(run.metrics.get(key), spec)}</td>"
            for key, _, spec in CARD_METRICS
        )
        label = run.label.replace("<", "&lt;")
        rows.append(f"<tr><td style='padding:4px 10px'><b>{label}</b></td>{cells}</tr>")
    return f"<table style='border-collapse:collapse'><tr><th></th>{head}</tr>{''.join(rows)}</table>"


class PerformancePage:
    """One session's Performance page (``layout``)."""

    def __init__(self, ctx: AppContext, doc: Document) -> None:
        self.ctx, self.doc = ctx, doc
        self.results_root = ctx.settings.home.resolve() / "backtests"
        self.pick = MultiChoice(title="Bots and backtests to compare", options=choices([]), width=700)
        self.status = Div(text="")
        self.cards = Div(text="")
        self.equity = figure(title="return", x_axis_type="datetime", height=300, sizing_mode="stretch_width",
                             tools="xpan,xwheel_zoom,box_zoom,reset,save")  # fmt: skip
        self.drawdown = figure(title="drawdown", x_axis_type="datetime", height=180, x_range=self.equity.x_range,
                               sizing_mode="stretch_width", tools="xpan,xwheel_zoom,box_zoom,reset,save")  # fmt: skip
        for plot in (self.equity, self.drawdown):
            plot.yaxis.formatter = NumeralTickFormatter(format="0.0%")
        self.lines: list[ColumnDataSource] = []
        for i in range(len(Category10_10)):
            source = ColumnDataSource({"ts": [], "ret": [], "dd": []})
            color = Category10_10[i]
            self.equity.line("ts", "ret", source=source, color=color, name=f"equity-{i}")
            self.drawdown.line("ts", "dd", source=source, color=color)
            self.lines.append(source)
        self.fills = ColumnDataSource({k: [] for k in ("ts", "side", "price", "size", "fee", "realized_pnl")})
        self.table = DataTable(source=self.fills, height=220, sizing_mode="stretch_width", name="fills-table",
                               columns=[TableColumn(field=k, title=k) for k in self.fills.data])  # fmt: skip
        self.pick.on_change("value", lambda _a, _o, _n: self.load())
        self.layout = column(self.pick, self.status, self.cards, self.equity, self.drawdown,
                             Div(text="<b>fills of the first one</b>"), self.table, sizing_mode="stretch_width")  # fmt: skip

    def refresh(self) -> None:
        """Fill the choices (the bots every session shares, and the results on disk)."""
        ctx, dsn = self.ctx, self.ctx.dsn
        in_background(ctx, self.doc, lambda: [b.name for b in ctx.shared("bots", 2.5, lambda: data.bots(dsn))],
                      self.refresh_choices, self._failed)  # fmt: skip

    def refresh_choices(self, bots: list[str]) -> None:
        """The bots (from the Bots page) and the backtest results on disk."""
        runs = data.backtest_runs(self.results_root)
        self.pick.options = choices([*(f"bot:{b}" for b in bots), *(f"backtest:{r}" for r in runs)])

    def show_backtest(self, name: str) -> None:
        """Open a finished backtest (the Backtests page calls this)."""
        self.refresh_choices(
            [o.removeprefix("bot:") for o in self.pick.options if isinstance(o, str) and o.startswith("bot:")]
        )
        self.pick.value = [f"backtest:{name}"]

    def load(self) -> None:
        picked = list(self.pick.value)[: len(self.lines)]
        dsn, root = self.ctx.dsn, self.results_root

        def work() -> list[data.Run]:
            runs = []
            for item in picked:
                kind, _, name = item.partition(":")
                runs.append(data.bot_run(dsn, name) if kind == "bot" else data.backtest_run(root, name))
            return runs

        self.status.text = "loading ..." if picked else ""
        in_background(self.ctx, self.doc, work, self.show, self._failed)

    def _failed(self, error: Exception) -> None:
        self.status.text = f"<b>error:</b> {error}"

    def show(self, runs: list[data.Run]) -> None:
        for i, source in enumerate(self.lines):
            if i < len(runs):
                source.data = {"ts": runs[i].ts, "ret": runs[i].returns, "dd": runs[i].drawdown}
            elif source.data["ts"]:
                source.data = {"ts": [], "ret": [], "dd": []}
        for i, renderer in enumerate(self.equity.renderers):
            renderer.visible = i < len(runs)
        self.cards.text = cards_html(runs) if runs else ""
        first = runs[0].fills if runs else []
        self.fills.data = {k: [f[k] for f in first] for k in self.fills.data}
        legend = ", ".join(
            f"<span style='color:{Category10_10[i]}'>&#9632;</span> {r.label}" for i, r in enumerate(runs)
        )
        self.status.text = legend
