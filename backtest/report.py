"""Static HTML reports of backtests and sweeps (Bokeh, with its JavaScript inlined: the file
opens offline, with no server and no CDN).

A backtest's report (:func:`write_report`): metric "cards" (a table of every metric), a
candlestick chart with the signals (triangles: buy up, sell down, on the close) and the fills
(circles at the fill price, hover for size and fee), the equity curve and the drawdown, sharing
the time axis. Long runs are drawn as at most ``MAX_BARS`` bars: each bar aggregates ``k``
consecutive candles (open of the first, close of the last, highest high, lowest low), the
equity is the bar's last value and the drawdown the bar's deepest; the header says so. Markers
are drawn when there are at most ``MAX_MARKERS`` of a kind (the header says when not).

A sweep's report (:func:`write_sweep_report`): a heatmap of one metric over the first two grid
parameters; with more parameters each cell shows the best value over the others (the largest;
the smallest for drawdowns); invalid combinations are grey and say why on hover.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import numpy.typing as npt
from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, FactorRange, HoverTool, LinearColorMapper
from bokeh.models.annotations import ColorBar
from bokeh.models.widgets import Div
from bokeh.palettes import Viridis256
from bokeh.plotting import figure
from bokeh.resources import INLINE

if TYPE_CHECKING:
    from bokeh.model import Model

    from backtest.engine import BacktestResult
    from backtest.sweep import SweepResult

__all__ = ["MAX_BARS", "MAX_MARKERS", "backtest_layout", "metric_cards", "sweep_layout", "write_report",
           "write_sweep_report"]  # fmt: skip

#: At most this many candlestick bars are drawn (candles are aggregated beyond).
MAX_BARS = 2_000
#: Signal and fill markers are drawn when there are at most this many of each.
MAX_MARKERS = 10_000

_F64 = npt.NDArray[np.float64]
_UP, _DOWN = "#26a69a", "#ef5350"
_PERCENT = frozenset({"total_return", "cagr", "max_drawdown", "win_rate", "exposure"})


def _value(name: str, value: object) -> str:
    """A metric as shown in a card: the exact value, and a percentage for fractions."""
    if value is None:
        return "-"
    if isinstance(value, float) and name in _PERCENT:
        return f"{value!r} ({value:.2%})"
    if isinstance(value, float):
        return f"{value!r}"
    return str(value)


def metric_cards(metrics: Mapping[str, object], *, title: str, notes: Sequence[str] = ()) -> str:
    """An HTML block: the title, notes, and one card per metric (name and value, as in metrics.json)."""
    cards = "".join(
        f'<div style="display:inline-block;min-width:11em;margin:4px;padding:6px 10px;border:1px solid #ccc;'
        f'border-radius:6px"><div style="color:#666;font-size:80%">{html.escape(name)}</div>'
        f"<div><b>{html.escape(_value(name, value))}</b></div></div>"
        for name, value in metrics.items()
    )
    lines = "".join(f"<p>{html.escape(note)}</p>" for note in notes)
    return f"<h2>{html.escape(title)}</h2>{lines}<div>{cards}</div>"


def _bar_edges(n: int, *, max_bars: int) -> npt.NDArray[np.intp]:
    step = max(1, math.ceil(n / max_bars))
    return np.arange(0, n, step)


def backtest_layout(
    result: BacktestResult, *, max_bars: int = MAX_BARS, max_markers: int = MAX_MARKERS
) -> Model:
    """The report of one backtest as a Bokeh layout (see the module docstring)."""
    series, curve, config = result.series, result.equity, result.config
    period = series.period_ms
    n = len(series)
    starts = _bar_edges(n, max_bars=max_bars)
    last = np.append(starts[1:], n) - 1
    ts = series.ts_close.astype(np.float64)
    opens = series.floats("open")[starts]
    closes = series.floats("close")[last]
    highs = np.maximum.reduceat(series.floats("high"), starts)
    lows = np.minimum.reduceat(series.floats("low"), starts)
    left, right = ts[starts] - period, ts[last]
    bars = ColumnDataSource(
        {
            "x": (left + right) / 2,
            "width": (right - left) * 0.8,
            "open": opens,
            "close": closes,
            "high": highs,
            "low": lows,
            "color": np.where(closes >= opens, _UP, _DOWN),
        }
    )
    notes = [f"{n:,} candles from {series.source or 'memory'}."]
    if len(starts) < n:
        notes.append(f"Drawn as {len(starts):,} bars of {math.ceil(n / max_bars)} candles each.")

    price = figure(title="price, signals and fills", x_axis_type="datetime", height=380,
                   sizing_mode="stretch_width", tools="xpan,xwheel_zoom,box_zoom,reset,save")  # fmt: skip
    price.segment("x", "high", "x", "low", source=bars, color="color")
    price.vbar("x", "width", "open", "close", source=bars, fill_color="color", line_color="color")
    for action, marker, color in (("buy", "triangle", _UP), ("sell", "inverted_triangle", _DOWN)):
        chosen = [s for s in result.signals if s.action == action]
        if len(chosen) > max_markers:
            notes.append(f"{len(chosen):,} {action} signals: more than {max_markers:,}, not drawn.")
            continue
        source = ColumnDataSource(
            {
                "x": [s.ts_close - period / 2 for s in chosen],
                "y": [float(s.price) for s in chosen],
                "reason": [s.reason for s in chosen],
            }
        )
        price.scatter(
            "x", "y", source=source, marker=marker, size=9, color=color, legend_label=f"{action} signal"
        )
    fills = result.fills
    if len(fills) > max_markers:
        notes.append(f"{len(fills):,} fills: more than {max_markers:,}, not drawn.")
    else:
        source = ColumnDataSource(
            {
                "x": [f.ts - period / 2 for f in fills],
                "y": [float(f.price) for f in fills],
                "side": [f.side for f in fills],
                "price": [f.price for f in fills],
                "size": [f.size for f in fills],
                "fee": [f.fee for f in fills],
            }
        )
        dots = price.scatter("x", "y", source=source, marker="circle", size=6, fill_color="white",
                             line_color="black", legend_label="fill")  # fmt: skip
        price.add_tools(
            HoverTool(renderers=[dots], tooltips=[("fill", "@side @size at @price"), ("fee", "@fee")])
        )
    if price.legend:  # no legend when no marker was drawn
        price.legend.location = "top_left"
        price.legend.click_policy = "hide"

    values = np.concatenate(([float(config.initial_cash)], curve.values))
    peaks = np.maximum.accumulate(values)
    drawdown = np.zeros(len(values))
    np.divide(peaks - values, peaks, out=drawdown, where=peaks > 0)
    equity_source = ColumnDataSource(
        {
            "x": right,
            "equity": curve.values[last],
            "drawdown": -np.maximum.reduceat(drawdown[1:], starts) * 100.0,
        }
    )
    equity = figure(title="equity (quote currency)", x_axis_type="datetime", x_range=price.x_range, height=220,
                    sizing_mode="stretch_width", tools="xpan,xwheel_zoom,box_zoom,reset")  # fmt: skip
    equity.line("x", "equity", source=equity_source, line_width=2)
    dd = figure(title="drawdown (%)", x_axis_type="datetime", x_range=price.x_range, height=160,
                sizing_mode="stretch_width", tools="xpan,xwheel_zoom,box_zoom,reset")  # fmt: skip
    dd.varea("x", "drawdown", 0, source=equity_source, fill_color=_DOWN, fill_alpha=0.5)
    title = (
        f"Backtest: {config.strategy} {msgspec.json.encode(dict(config.params)).decode()} on "
        f"{config.inst_id} {config.timeframe}"
    )
    cards = Div(text=metric_cards(msgspec.to_builtins(result.metrics), title=title, notes=notes),
                sizing_mode="stretch_width")  # fmt: skip
    return column(cards, price, equity, dd, sizing_mode="stretch_width")


def write_report(result: BacktestResult, path: Path) -> None:
    """Write the report of one backtest to ``path`` (self-contained HTML)."""
    title = f"backtest {result.config.strategy} {result.config.inst_id} {result.config.timeframe}"
    path.write_text(file_html(backtest_layout(result), INLINE, title), encoding="utf-8")


def _label(value: object) -> str:
    return msgspec.json.encode(value).decode() if not isinstance(value, str) else value


def sweep_layout(sweep: SweepResult) -> Model:
    """The heatmap of ``sweep.metric`` over the first two grid parameters (see the module docstring)."""
    names = list(sweep.grid)
    x_name = names[0]
    y_name = names[1] if len(names) > 1 else None
    x_labels = [_label(v) for v in sweep.grid[x_name]]
    y_labels = [_label(v) for v in sweep.grid[y_name]] if y_name else ["-"]
    metric = sweep.metric
    cells = sweep.best_cells()
    xs, ys, values, texts, details = [], [], [], [], []
    for (x_value, y_value), (value, detail) in cells.items():
        xs.append(_label(x_value))
        ys.append(_label(y_value) if y_name else "-")
        values.append(math.nan if value is None else value)
        texts.append(
            "invalid" if detail.startswith("invalid") else ("-" if value is None else f"{value:.4g}")
        )
        details.append(detail)
    finite = [v for v in values if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if low == high:
        low, high = low - 1.0, high + 1.0
    palette = list(reversed(Viridis256)) if metric in sweep.lower_is_better else list(Viridis256)
    mapper = LinearColorMapper(palette=palette, low=low, high=high, nan_color="#dddddd")
    source = ColumnDataSource({"x": xs, "y": ys, "value": values, "text": texts, "detail": details})
    plot = figure(title=f"{metric} over {x_name} x {y_name or '-'}", x_range=FactorRange(factors=x_labels),
                  y_range=FactorRange(factors=y_labels), height=max(300, 60 * len(y_labels) + 120),
                  sizing_mode="stretch_width", tools="hover,save",
                  tooltips=[(metric, "@text"), ("", "@detail")])  # fmt: skip
    plot.rect(
        "x", "y", 1, 1, source=source, fill_color={"field": "value", "transform": mapper}, line_color="white"
    )
    plot.text("x", "y", text="text", source=source, text_align="center", text_baseline="middle",
              text_color="black", text_font_size="11px")  # fmt: skip
    plot.xaxis.axis_label = x_name
    plot.yaxis.axis_label = y_name or ""
    plot.add_layout(ColorBar(color_mapper=mapper, title=metric), "right")
    valid = sum(1 for row in sweep.rows if row.error is None)
    notes = [
        f"{len(sweep.rows)} combinations, {valid} valid, over {sweep.candles:,} candles of "
        f"{sweep.inst_id} {sweep.timeframe}.",
    ]
    if len(names) > 2:
        best = "smallest" if metric in sweep.lower_is_better else "largest"
        notes.append(f"Each cell shows the {best} {metric} over {', '.join(names[2:])}.")
    summary = {"strategy": sweep.strategy, "metric": metric, "grid": msgspec.json.encode(sweep.grid).decode()}
    best_row = sweep.best()
    if best_row is not None:
        summary["best params"] = msgspec.json.encode(best_row.params).decode()
        summary[f"best {metric}"] = getattr(best_row.metrics, metric)
    cards = Div(text=metric_cards(summary, title=f"Sweep: {sweep.strategy}", notes=notes),
                sizing_mode="stretch_width")  # fmt: skip
    return column(cards, plot, sizing_mode="stretch_width")


def write_sweep_report(sweep: SweepResult, path: Path) -> None:
    """Write the heatmap report of a sweep to ``path`` (self-contained HTML)."""
    path.write_text(file_html(sweep_layout(sweep), INLINE, f"sweep {sweep.strategy}"), encoding="utf-8")
