"""The Market page: candles and volume of one stream, overlays, indicator panes, a bot's fills, live.

* History comes from PostgreSQL (the last ``TCP_DASHBOARD_CANDLES`` final candles, on a worker thread).
* Live: the hub hands over ``market:{inst_id}`` messages; a FINAL candle of the shown stream is
  appended with ``ColumnDataSource.stream`` (its indicators updated by the same streaming
  objects, so nothing is recomputed), the FORMING candle is a one-row source updated with
  ``patch``. Nothing is ever redrawn whole by a live update.
* History mode: panning or zooming (or "Load older") stops live updates from moving the view;
  "Follow live" moves it back to the newest candles.
* Export: the visible candles as CSV or JSON with the EXACT stored values (read again from
  PostgreSQL, not the floats drawn), downloaded by the browser.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

import numpy as np
from bokeh import events
from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import (
    ColumnDataSource,
    CustomJS,
    DatetimeAxis,
    Grid,
    HoverTool,
    Range1d,
    VBar,
)
from bokeh.models.widgets import Button, CheckboxGroup, DateRangePicker, Div, Select
from bokeh.plotting import figure
from bokeh.transform import linear_cmap

from bokeh_app import data
from bokeh_app.context import AppContext, choices, in_background

__all__ = ["MarketPage"]

log = logging.getLogger(__name__)

#: Candles in view when following live.
IN_VIEW = 120
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OVERLAYS = ("EMA 12/26", "Bollinger 20/2")
_NO_MARKERS: list[str | tuple[Any, str]] = [("", "none")]


def _color() -> Any:
    """Green when a candle closed at or above its open, red below (from the ``up`` column); one
    per page: a Bokeh model belongs to one document."""
    return linear_cmap("up", ("#ef5350", "#26a69a"), 0.0, 1.0)


_DOWNLOAD = CustomJS(
    code="""
    const d = cb_obj.data;
    if (!d.text || d.text.length === 0) { return; }
    const blob = new Blob([d.text[0]], {type: d.mime[0]});
    const link = document.createElement('a');
    link.href = URL.createObjectURL(blob);
    link.download = d.name[0];
    document.body.appendChild(link);
    link.click();
    link.remove();
    """
)


def _empty() -> dict[str, list[Any]]:
    return {k: [] for k in (*data.CANDLE_FIELDS, "up", *data.INDICATORS)}


def candle_row(values: tuple[Any, ...]) -> dict[str, Any]:
    """(ts, open, high, low, close, volume) -> one row of a candle source (``up``: 1.0 when the
    close is not below the open; the colour map turns it into green or red)."""
    ts, o, h, low, c, v = values
    return {"ts": ts, "open": o, "high": h, "low": low, "close": c, "volume": v, "up": 1.0 if c >= o else 0.0}


@dataclass(frozen=True, slots=True)
class _Columns:
    rows: list[tuple[Any, ...]]
    arrays: dict[str, Any]
    indicators: data.Indicators


#: Streams whose columns a server keeps (bokeh_app.context.AppContext.history), most recent last.
HISTORIES_KEPT = 8


def chart_columns(
    history: dict[tuple[str, str], Any], stream: tuple[str, str], rows: list[tuple[Any, ...]]
) -> tuple[dict[str, Any], data.Indicators]:
    """A stream's rows as the chart's columns, and its indicators after the last row (each session
    continues its own copy with live candles).

    Numbers are numpy arrays: Bokeh sends those as binary buffers, not a JSON number each;
    float32 (7 significant digits, for drawing only) except the times (epoch ms need float64).
    The columns of the last rows of each stream are kept in ``history`` (one dict per server):
    the next session that reads the same rows gets the same arrays (read-only; Bokeh's
    ``stream`` makes new ones) instead of computing them again."""
    kept = history.pop(stream, None)
    if kept is None or kept.rows != rows:
        n = len(rows)
        ts = np.fromiter((data.epoch_ms(r[0]) for r in rows), dtype=np.float64, count=n)
        ohlcv = np.array([r[1:6] for r in rows], dtype=np.float64).reshape(n, 5)
        arrays: dict[str, Any] = {"ts": ts}
        for k, name in enumerate(("open", "high", "low", "close", "volume")):
            arrays[name] = ohlcv[:, k].astype(np.float32)
        arrays["up"] = (ohlcv[:, 3] >= ohlcv[:, 0]).astype(np.float32)
        indicators = data.Indicators()
        values = [indicators.update(close) for close in ohlcv[:, 3].tolist()]
        for name in data.INDICATORS:
            arrays[name] = np.fromiter((v[name] for v in values), dtype=np.float32, count=n)
        for array in arrays.values():
            array.flags.writeable = False
        kept = _Columns(rows, arrays, indicators)
    history[stream] = kept
    while len(history) > HISTORIES_KEPT:
        del history[next(iter(history))]
    return dict(kept.arrays), copy.deepcopy(kept.indicators)


class MarketPage:
    """One session's Market page. ``layout`` is its root; everything else reacts to the widgets
    and to the hub."""

    def __init__(self, ctx: AppContext, doc: Document, *, instruments: list[str]) -> None:
        self.ctx, self.doc = ctx, doc
        self.history = ctx.settings.dashboard_candles  # loaded per stream, and kept at most
        self.following = True
        self.indicators = data.Indicators()
        self.source = ColumnDataSource(_empty())
        self.forming = ColumnDataSource(_empty())
        self.buys = ColumnDataSource({"ts": [], "price": []})
        self.sells = ColumnDataSource({"ts": [], "price": []})
        self.download = ColumnDataSource({"text": [], "mime": [], "name": []})
        self.download.js_on_change("data", _DOWNLOAD)
        timeframes = list(ctx.settings.timeframes)
        first = instruments[0] if instruments else ""
        self.instrument = Select(
            title="Instrument",
            value=first,
            options=choices(instruments or [""]),
            width=150,
            name="instrument",
        )
        self.timeframe = Select(
            title="Timeframe", value=timeframes[0], options=choices(timeframes), width=100, name="timeframe"
        )
        self.overlays = CheckboxGroup(labels=list(_OVERLAYS), active=[0])
        self.markers = Select(
            title="Buy/sell markers", value="", options=_NO_MARKERS, width=220, name="markers"
        )
        self._chosen: data.Markers | None = None
        self._choices_for: tuple[str, str] = ("", "")
        self.follow = Button(label="Follow live", button_type="success", width=110, disabled=True)
        self.older = Button(label="Load older", width=100)
        self.csv = Button(label="Export CSV", width=100)
        self.json = Button(label="Export JSON", width=100)
        # Days, not times: Bokeh 3.9's DatetimeRangePicker value reaches the server cut to its date.
        self.range = DateRangePicker(title="Dates (UTC)", width=200, name="range")
        self._picked: tuple[datetime, datetime] | None = None  # the days picked (start, end), in history mode
        self.status = Div(text="", width=500)
        self._build_figures()
        self.layout = column(
            row(self.instrument, self.timeframe, self.markers, self.overlays, self.range, self.follow, self.older,
                self.csv, self.json),
            self.status, self.price, self.volume, self.rsi, self.macd,
            sizing_mode="stretch_width",
        )  # fmt: skip
        self.instrument.on_change("value", lambda _a, _o, _n: self._reload())
        self.timeframe.on_change("value", lambda _a, _o, _n: self._reload())
        self.markers.on_change("value", lambda _a, _o, _n: self.load_markers())
        self.overlays.on_change("active", lambda _a, _o, _n: self._show_overlays())
        self.range.on_change("value", lambda _a, _o, new: self.pick_range(new))
        self.follow.on_click(self.go_live)
        self.older.on_click(self.load_older)
        self.csv.on_click(lambda: self.export("csv"))
        self.json.on_click(lambda: self.export("json"))
        for plot in (self.price, self.volume, self.rsi, self.macd):
            plot.on_event(events.PanEnd, self._user_moved)
            plot.on_event(events.MouseWheel, self._user_moved)
        stops = [ctx.hub.listen("market:*", self._on_market), ctx.hub.listen("signals:*", self._on_signals)]
        self._stop_listening = lambda: [stop() for stop in stops]
        self._show_overlays()

    # ---- figures ------------------------------------------------------------------------
    def _build_figures(self) -> None:
        self.x_range = Range1d(start=0, end=1)
        # One time axis' ticker and formatter (Bokeh's defaults for a datetime axis, ~16 models)
        # for the four figures.
        axis = DatetimeAxis()
        self._ticker, self._formatter = axis.ticker, axis.formatter
        color = _color()
        self.price = self._figure(title="", name="price", height=380, scroll="xwheel_zoom")
        bodies = []
        for src, alpha, name in ((self.source, 1.0, "candles"), (self.forming, 0.5, "forming")):
            self.price.segment("ts", "high", "ts", "low", color=color, source=src, alpha=alpha)
            bodies.append(self.price.vbar("ts", 48_000, "open", "close", fill_color=color, line_color=color,
                                          source=src, alpha=alpha, name=name))  # fmt: skip
        self.candles = bodies[0]
        self.ema = [
            self.price.line("ts", "ema12", source=self.source, color="#ff9800", legend_label="EMA 12"),
            self.price.line("ts", "ema26", source=self.source, color="#3f51b5", legend_label="EMA 26"),
        ]
        self.bb: list[Any] = []  # drawn the first time they are wanted: 3 lines of every candle
        self.price.scatter("ts", "price", source=self.buys, marker="triangle", size=11, color="#00c853",
                           legend_label="buy", name="buys")  # fmt: skip
        self.price.scatter("ts", "price", source=self.sells, marker="inverted_triangle", size=11, color="#d50000",
                           legend_label="sell", name="sells")  # fmt: skip
        self.price.legend.location = "top_left"
        self.price.add_tools(HoverTool(renderers=[self.candles], tooltips=[("close", "@ts{%F %T}"), ("o", "@open"),
                                       ("h", "@high"), ("l", "@low"), ("c", "@close"), ("v", "@volume")],
                                       formatters={"@ts": "datetime"}))  # fmt: skip
        self.volume = self._figure(title="volume", name="volume")
        self.volume.vbar("ts", 48_000, "volume", 0, source=self.source, color=color, alpha=0.6)
        self.rsi = self._figure(title="RSI 14", name="rsi")
        self.rsi.y_range = Range1d(start=0, end=100)
        self.rsi.line("ts", "rsi", source=self.source, color="#7b1fa2")
        self.macd = self._figure(title="MACD 12/26/9", name="macd")
        self.macd.vbar("ts", 48_000, "macd_hist", 0, source=self.source, color="#90a4ae")
        self.macd.line("ts", "macd", source=self.source, color="#1976d2")
        self.macd.line("ts", "macd_signal", source=self.source, color="#f57c00")

    def _figure(self, *, title: str, name: str, height: int = 130, scroll: str = "auto") -> figure:
        """A figure on the shared time range and time axis (130 px high: the panes below prices)."""
        plot = figure(title=title, name=name, x_axis_type=None, x_range=self.x_range, height=height,
                      tools="xpan,xwheel_zoom,box_zoom,reset,save", active_scroll=scroll,
                      sizing_mode="stretch_width")  # fmt: skip
        plot.add_layout(DatetimeAxis(ticker=self._ticker, formatter=self._formatter), "below")
        plot.add_layout(Grid(dimension=0, ticker=self._ticker))
        return plot

    def _show_overlays(self) -> None:
        for renderer in self.ema:
            renderer.visible = 0 in self.overlays.active
        if 1 in self.overlays.active and not self.bb:
            self.bb = [
                self.price.line("ts", name, source=self.source, color="#9e9e9e", line_dash="dashed",
                                legend_label="Bollinger")
                for name in ("bb_upper", "bb_mid", "bb_lower")
            ]  # fmt: skip
        for renderer in self.bb:
            renderer.visible = 1 in self.overlays.active

    # ---- history ------------------------------------------------------------------------
    def stream(self) -> tuple[str, str]:
        return self.instrument.value, self.timeframe.value

    def _set_widths(self) -> None:
        """Bars 80% as wide as the timeframe (a property of the glyphs, not a column)."""
        width = self._width_ms()
        for plot in (self.price, self.volume, self.macd):
            for glyph in plot.select(type=VBar):
                cast(VBar, glyph).width = width

    def _width_ms(self) -> float:
        from tcp.timeframes import parse_timeframe

        return parse_timeframe(self.timeframe.value) * 0.8

    def load(self, *, start: datetime | None = None, end: datetime | None = None) -> None:
        """Load the stream's last ``dashboard_candles`` candles in ``start <= ts_close < end``
        (default: all), on a worker thread."""
        inst_id, timeframe = self.stream()
        if not inst_id:
            self.status.text = "No candles yet: run the candle dataflow (tcp run, make demo)."
            return
        self.status.text = f"loading {inst_id} {timeframe} ..."
        dsn, limit = self.ctx.dsn, self.history
        in_background(self.ctx, self.doc, lambda: data.candle_rows(dsn, inst_id, timeframe, start=start, end=end,
                                                                   limit=limit),
                      lambda rows: self._loaded((inst_id, timeframe), rows), self._failed)  # fmt: skip

    def _reload(self) -> None:
        """Another stream: the same days picked, if any; else its newest candles."""
        start, end = self._picked or (None, None)
        self.load(start=start, end=end)

    def show(self, rows: list[tuple[Any, ...]]) -> None:
        """Show rows already read for the current stream (a new session's first chart)."""
        self._loaded(self.stream(), rows)

    def _failed(self, error: Exception) -> None:
        self.status.text = f"<b>error:</b> {type(error).__name__}: {error}"

    def _loaded(self, stream: tuple[str, str], rows: list[tuple[Any, ...]]) -> None:
        if stream != self.stream():  # the user picked another stream meanwhile
            return
        self._set_widths()
        arrays, self.indicators = chart_columns(self.ctx.history, stream, rows)
        self.source.data = arrays
        self.forming.data = _empty()
        self.status.text = f"{stream[0]} {stream[1]}: {len(rows):,} final candles" + (
            "" if rows else " (none yet)"
        )
        if self.following:
            self._view_newest()
        elif self._picked is not None:
            self.x_range.start, self.x_range.end = (_ms(t) for t in self._picked)
            if len(rows) == self.history:
                self.status.text += f" (the last {self.history:,} of the range picked)"
        if self._choices_for != stream:
            self.load_marker_choices()
        self.load_markers()

    def load_older(self) -> None:
        """History mode: load the candles before the first one shown."""
        self._history_mode()
        self._picked = None
        ts = self.source.data["ts"]
        if len(ts):
            self.load(end=_EPOCH + timedelta(milliseconds=float(ts[0])))

    def _view_newest(self) -> None:
        ts = self.source.data["ts"]
        if not len(ts):
            return
        step = self._width_ms() / 0.8
        last = _ms(ts[-1])
        self.x_range.start = last - step * IN_VIEW
        self.x_range.end = last + step * 2

    def _user_moved(self, _event: events.Event) -> None:
        self._history_mode()

    def _history_mode(self) -> None:
        if self.following:
            self.following = False
            self.follow.disabled = False
            self.status.text += " | history mode: live updates do not move the view"

    def pick_range(self, value: Any) -> None:
        """History mode on the candles of the picked days (UTC; the last day included)."""
        if not value or value[0] is None or value[1] is None:
            return
        try:
            first, last = sorted(_day(v) for v in value)
        except (TypeError, ValueError) as exc:
            self._failed(exc)
            return
        start, end = first, last + timedelta(days=1)
        self._history_mode()
        self._picked = (start, end)
        self.load(start=start, end=end)

    def go_live(self) -> None:
        self.following = True
        self.follow.disabled = True
        self._picked = None
        self.range.value = None
        self.load()

    # ---- buy/sell markers ---------------------------------------------------------------
    def load_marker_choices(self) -> None:
        """The bots trading the shown stream and the strategies that signalled on it (the bots
        list every session shares, refreshed every few seconds)."""
        ctx, dsn, stream = self.ctx, self.ctx.dsn, self.stream()
        if not stream[0]:
            return

        def work() -> list[data.Markers]:
            bots = ctx.shared("bots", 2.5, lambda: data.bots(dsn))
            return data.marker_choices(dsn, *stream, bots)

        in_background(
            ctx, self.doc, work, lambda found: self._set_marker_choices(stream, found), self._failed
        )

    def _set_marker_choices(self, stream: tuple[str, str], found: list[data.Markers]) -> None:
        if stream != self.stream():
            return
        self._choices_for = stream
        options = [*_NO_MARKERS, *((m.value, m.label) for m in found)]
        self.markers.options = options
        if self.markers.value not in {"", *(m.value for m in found)}:
            self.markers.value = ""  # the chosen bot or strategy is not on this stream

    def load_markers(self) -> None:
        """The chosen bot's fills or strategy's signals over the candles shown (and a day either side)."""
        try:
            self._chosen = data.Markers.parse(self.markers.value)
        except ValueError as exc:  # not one of the options the server made: refused
            self._chosen = None
            self._failed(exc)
        ts, chosen, stream = self.source.data["ts"], self._chosen, self.stream()
        if chosen is None or not len(ts):
            self.buys.data, self.sells.data = {"ts": [], "price": []}, {"ts": [], "price": []}
            return
        first, last = (_EPOCH + timedelta(milliseconds=float(t)) for t in (ts[0], ts[-1]))
        dsn, start, end = self.ctx.dsn, first - timedelta(days=1), last + timedelta(days=1)
        in_background(self.ctx, self.doc, lambda: data.markers(dsn, chosen, *stream, start=start, end=end),
                      lambda rows: self._show_markers(chosen, rows), self._failed)  # fmt: skip

    def _show_markers(self, chosen: data.Markers, rows: list[tuple[datetime, str, float]]) -> None:
        if chosen != self._chosen:  # another choice meanwhile
            return
        for side, source in (("buy", self.buys), ("sell", self.sells)):
            picked = [r for r in rows if r[1] == side]
            source.data = {"ts": [data.epoch_ms(r[0]) for r in picked], "price": [r[2] for r in picked]}

    def _on_signals(self, channel: str, message: bytes) -> None:
        """The hub's thread: a bot's signal or fill (``signals:{bot}``), handed over when markers are shown."""
        if self._chosen is not None:
            self.doc.add_next_tick_callback(lambda: self.apply_marker(channel, message))

    def apply_marker(self, channel: str, message: bytes) -> None:
        """A live fill of the chosen bot, or signal of the chosen strategy on the shown stream, as a marker."""
        chosen, stream = self._chosen, self.stream()
        if chosen is None:
            return
        try:
            parsed = json.loads(message)
            if chosen.kind == "bot" and parsed["kind"] == "fill" and channel == f"signals:{chosen.name}":
                if self._choices_for != stream:  # the bot list is not yet the shown stream's
                    return
                fill = parsed["fill"]
                ts, side, price = float(fill["ts"]), fill["side"], float(fill["price"])
            elif chosen.kind == "strategy" and parsed["kind"] == "signal":
                signal = parsed["signal"]
                if (signal["strategy"], signal["params_hash"], signal["inst_id"], signal["timeframe"]) != (
                    chosen.name, chosen.params_hash, *stream,
                ):  # fmt: skip
                    return
                ts, side, price = float(signal["ts_close"]), signal["action"], float(signal["price"])
            else:
                return
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("dashboard: a signals message that is not a signal or fill: %s", exc)
            return
        source = {"buy": self.buys, "sell": self.sells}.get(side)
        if source is not None and ts not in source.data["ts"]:  # every bot of a strategy sends its signals
            source.stream({"ts": [ts], "price": [price]})

    # ---- live ---------------------------------------------------------------------------
    def _on_market(self, channel: str, message: bytes) -> None:
        """The hub's thread: only hand the message over to the document."""
        inst_id = channel.partition(":")[2]
        if inst_id != self.instrument.value:
            return
        self.doc.add_next_tick_callback(lambda: self.apply(message))

    def apply(self, message: bytes) -> None:
        """One ``market:`` message on the document's thread: stream a final candle, patch the forming one."""
        try:
            parsed = json.loads(message)
            kind, candle = parsed["kind"], parsed["candle"]
            if (candle["inst_id"], candle["timeframe"]) != self.stream():
                return
            ts = float(candle["ts_close"])  # epoch ms: the datetime axis' unit
            values = [float(candle[k]) for k in ("open", "high", "low", "close", "volume")]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("dashboard: a market message that is not a candle: %s", exc)
            return
        new = candle_row((ts, *values))
        if kind == "final":
            shown = self.source.data["ts"]
            if len(shown) and ts <= shown[-1]:
                return  # a revision or a repeat: the chart keeps the first version, as a bot does
            new.update(self.indicators.update(values[3]))
            self.source.stream({k: [v] for k, v in new.items()}, rollover=self.history)
            if len(self.forming.data["ts"]) and self.forming.data["ts"][0] <= ts:
                self.forming.data = _empty()
            if self.following:
                self._view_newest()
        elif kind == "live":
            if not len(self.forming.data["ts"]):
                self.forming.data = {
                    **{k: [math.nan] for k in data.INDICATORS},
                    **{k: [v] for k, v in new.items()},
                }
            else:
                self.forming.patch({k: [(0, v)] for k, v in new.items()})

    # ---- export -------------------------------------------------------------------------
    def export(self, fmt: str) -> None:
        """The candles in view and the buy/sell markers shown on them, exact (as stored), as a
        CSV or JSON download. CSV: one line per candle, with ``marker`` (buy, sell or empty) and
        ``marker_price``; JSON: the candles, and the markers with whose they are."""
        inst_id, timeframe = self.stream()
        if not inst_id or not len(self.source.data["ts"]):
            return
        lo = _EPOCH + timedelta(milliseconds=_ms(self.x_range.start))
        hi = _EPOCH + timedelta(milliseconds=_ms(self.x_range.end))
        dsn, chosen, limit = self.ctx.dsn, self._chosen, self.history * 5

        def work() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            rows = data.candle_rows(dsn, inst_id, timeframe, start=lo, end=hi, limit=limit, exact=True)
            marks = (
                []
                if chosen is None
                else data.markers(dsn, chosen, inst_id, timeframe, start=lo, end=hi, exact=True)
            )
            return rows, marks

        def done(found: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]) -> None:
            rows, marks = found
            fields = data.CANDLE_FIELDS
            records = [dict(zip(fields, (r[0].isoformat(), *r[1:]), strict=True)) for r in rows]
            marked = [{"ts": ts.isoformat(), "side": side, "price": price} for ts, side, price in marks]
            if fmt == "csv":
                at = {m["ts"]: m for m in marked}
                lines = [",".join((*fields, "marker", "marker_price"))]
                for r in records:
                    m = at.get(r["ts"], {})
                    lines.append(
                        ",".join((*(str(r[f]) for f in fields), m.get("side", ""), m.get("price", "")))
                    )
                text, mime = "\n".join(lines) + "\n", "text/csv"
            else:
                body = {"inst_id": inst_id, "timeframe": timeframe, "candles": records,
                        "markers": {"of": "" if chosen is None else chosen.label, "rows": marked}}  # fmt: skip
                text, mime = json.dumps(body), "application/json"
            self.download.data = {"text": [text], "mime": [mime], "name": [f"{inst_id}-{timeframe}.{fmt}"]}
            self.status.text = f"exported {len(records):,} candles and {len(marked):,} markers ({fmt})"

        in_background(self.ctx, self.doc, work, done, self._failed)

    def close(self) -> None:
        self._stop_listening()


def _day(value: Any) -> datetime:
    """A picked day (an ISO date text or a date) as its first instant, UTC."""
    found = date.fromisoformat(value) if isinstance(value, str) else value
    if not isinstance(found, date):
        msg = f"not a date: {value!r}"
        raise TypeError(msg)
    return datetime(found.year, found.month, found.day, tzinfo=UTC)


def _ms(value: Any) -> float:
    if isinstance(value, datetime):
        return (value - _EPOCH) / timedelta(milliseconds=1)
    return float(value)
