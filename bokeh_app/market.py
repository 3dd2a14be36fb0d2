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
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import numpy as np
from bokeh import events
from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import (
    ColumnDataSource,
    CustomJS,
    DatetimeAxis,
    DatetimeTicker,
    DatetimeTickFormatter,
    Grid,
    HoverTool,
    Range1d,
    VBar,
)
from bokeh.models.widgets import Button, CheckboxGroup, Div, Select
from bokeh.plotting import figure
from bokeh.transform import linear_cmap

from bokeh_app import data
from bokeh_app.context import AppContext, choices, in_background
from strategies.indicators import EMA, MACD, RSI, BollingerBands

__all__ = ["MarketPage"]

log = logging.getLogger(__name__)

#: Candles in view when following live.
IN_VIEW = 120
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INDICATORS = ("ema12", "ema26", "bb_mid", "bb_upper", "bb_lower", "rsi", "macd", "macd_signal", "macd_hist")
_OVERLAYS = ("EMA 12/26", "Bollinger 20/2")


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
    return {k: [] for k in (*data.CANDLE_FIELDS, "up", *_INDICATORS)}


class _Indicators:
    """The streaming indicators of the shown stream, continued candle by candle when live."""

    def __init__(self) -> None:
        self.ema12, self.ema26, self.rsi = EMA(12), EMA(26), RSI(14)
        self.bands, self.macd = BollingerBands(20, k=2.0), MACD(12, 26, 9)

    def update(self, x: float) -> dict[str, float]:
        band = self.bands.value if self.bands.update(x) else None
        m = self.macd.value if self.macd.update(x) else None
        nan = math.nan
        values = {
            "ema12": self.ema12.update(x), "ema26": self.ema26.update(x), "rsi": self.rsi.update(x),
            "bb_mid": band.middle if band else nan, "bb_upper": band.upper if band else nan,
            "bb_lower": band.lower if band else nan, "macd": m.line if m else nan,
            "macd_signal": m.signal if m else nan, "macd_hist": m.hist if m else nan,
        }  # fmt: skip
        return {k: nan if v is None else v for k, v in values.items()}


def candle_row(values: tuple[Any, ...]) -> dict[str, Any]:
    """(ts, open, high, low, close, volume) -> one row of a candle source (``up``: 1.0 when the
    close is not below the open; the colour map turns it into green or red)."""
    ts, o, h, low, c, v = values
    return {"ts": ts, "open": o, "high": h, "low": low, "close": c, "volume": v, "up": 1.0 if c >= o else 0.0}


@dataclass(frozen=True, slots=True)
class _Columns:
    rows: list[tuple[Any, ...]]
    arrays: dict[str, Any]
    indicators: _Indicators


#: Streams whose columns a server keeps (bokeh_app.context.AppContext.history), most recent last.
HISTORIES_KEPT = 8


def chart_columns(
    history: dict[tuple[str, str], Any], stream: tuple[str, str], rows: list[tuple[Any, ...]]
) -> tuple[dict[str, Any], _Indicators]:
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
        indicators = _Indicators()
        values = [indicators.update(close) for close in ohlcv[:, 3].tolist()]
        for name in _INDICATORS:
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
        self.indicators = _Indicators()
        self.source = ColumnDataSource(_empty())
        self.forming = ColumnDataSource(_empty())
        self.buys = ColumnDataSource({"ts": [], "price": []})
        self.sells = ColumnDataSource({"ts": [], "price": []})
        self.download = ColumnDataSource({"text": [], "mime": [], "name": []})
        self.download.js_on_change("data", _DOWNLOAD)
        timeframes = list(ctx.settings.timeframes)
        first = instruments[0] if instruments else ""
        self.instrument = Select(
            title="Instrument", value=first, options=choices(instruments or [""]), width=150
        )
        self.timeframe = Select(
            title="Timeframe", value=timeframes[0], options=choices(timeframes), width=100, name="timeframe"
        )
        self.overlays = CheckboxGroup(labels=list(_OVERLAYS), active=[0])
        self.bot = Select(title="Fills of bot", value="", options=choices([""]), width=160)
        self.follow = Button(label="Follow live", button_type="success", width=110, disabled=True)
        self.older = Button(label="Load older", width=100)
        self.csv = Button(label="Export CSV", width=100)
        self.json = Button(label="Export JSON", width=100)
        self.status = Div(text="", width=500)
        self._build_figures()
        self.layout = column(
            row(self.instrument, self.timeframe, self.bot, self.overlays, self.follow, self.older, self.csv, self.json),
            self.status, self.price, self.volume, self.rsi, self.macd,
            sizing_mode="stretch_width",
        )  # fmt: skip
        self.instrument.on_change("value", lambda _a, _o, _n: self.load())
        self.timeframe.on_change("value", lambda _a, _o, _n: self.load())
        self.bot.on_change("value", lambda _a, _o, _n: self.load_fills())
        self.overlays.on_change("active", lambda _a, _o, _n: self._show_overlays())
        self.follow.on_click(self.go_live)
        self.older.on_click(self.load_older)
        self.csv.on_click(lambda: self.export("csv"))
        self.json.on_click(lambda: self.export("json"))
        for plot in (self.price, self.volume, self.rsi, self.macd):
            plot.on_event(events.PanEnd, self._user_moved)
            plot.on_event(events.MouseWheel, self._user_moved)
        self._stop_listening = ctx.hub.listen("market:*", self._on_market)
        self._show_overlays()

    # ---- figures ------------------------------------------------------------------------
    def _build_figures(self) -> None:
        self.x_range = Range1d(start=0, end=1)
        # One time axis' ticker and formatter for the four figures (each of Bokeh's own is ~16 models).
        self._ticker, self._formatter = DatetimeTicker(), DatetimeTickFormatter()
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

    def load(self, *, end: datetime | None = None) -> None:
        """Load the stream's last ``dashboard_candles`` candles (before ``end``), on a worker thread."""
        inst_id, timeframe = self.stream()
        if not inst_id:
            self.status.text = "No candles yet: run the candle dataflow (tcp run, make demo)."
            return
        self.status.text = f"loading {inst_id} {timeframe} ..."
        dsn = self.ctx.dsn
        in_background(self.ctx, self.doc, lambda: data.candle_rows(dsn, inst_id, timeframe, end=end, limit=self.history),
                      lambda rows: self._loaded((inst_id, timeframe), rows), self._failed)  # fmt: skip

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
        self.load_fills()

    def load_older(self) -> None:
        """History mode: load the candles before the first one shown."""
        self._history_mode()
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

    def go_live(self) -> None:
        self.following = True
        self.follow.disabled = True
        self.load()

    # ---- fills --------------------------------------------------------------------------
    def set_bots(self, names: list[str]) -> None:
        self.bot.options = choices(["", *names])

    def load_bot_names(self) -> None:
        """The bots for "Fills of bot" (the list every session shares, refreshed every few seconds)."""
        ctx, dsn = self.ctx, self.ctx.dsn
        in_background(ctx, self.doc, lambda: [b.name for b in ctx.shared("bots", 2.5, lambda: data.bots(dsn))],
                      self.set_bots, self._failed)  # fmt: skip

    def load_fills(self) -> None:
        bot = self.bot.value
        ts = self.source.data["ts"]
        if not bot or not len(ts):
            self.buys.data, self.sells.data = {"ts": [], "price": []}, {"ts": [], "price": []}
            return
        first, last = (_EPOCH + timedelta(milliseconds=float(t)) for t in (ts[0], ts[-1]))
        dsn, start, end = self.ctx.dsn, first - timedelta(days=1), last + timedelta(days=1)
        in_background(self.ctx, self.doc, lambda: data.fills(dsn, bot, start=start, end=end), self._fills,
                      self._failed)  # fmt: skip

    def _fills(self, rows: list[tuple[datetime, str, float]]) -> None:
        for side, source in (("buy", self.buys), ("sell", self.sells)):
            picked = [r for r in rows if r[1] == side]
            source.data = {"ts": [data.epoch_ms(r[0]) for r in picked], "price": [r[2] for r in picked]}

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
                    **{k: [math.nan] for k in _INDICATORS},
                    **{k: [v] for k, v in new.items()},
                }
            else:
                self.forming.patch({k: [(0, v)] for k, v in new.items()})

    # ---- export -------------------------------------------------------------------------
    def export(self, fmt: str) -> None:
        """The candles in view, exact, as a CSV or JSON download."""
        inst_id, timeframe = self.stream()
        start, end = _ms(self.x_range.start), _ms(self.x_range.end)
        if not inst_id or not len(self.source.data["ts"]):
            return
        lo = _EPOCH + timedelta(milliseconds=start)
        hi = _EPOCH + timedelta(milliseconds=end)
        dsn = self.ctx.dsn

        def work() -> list[tuple[Any, ...]]:
            rows = data.candle_rows(dsn, inst_id, timeframe, end=hi, limit=self.history * 5, exact=True)
            return [r for r in rows if r[0] >= lo]

        def done(rows: list[tuple[Any, ...]]) -> None:
            fields = data.CANDLE_FIELDS
            records = [dict(zip(fields, (r[0].isoformat(), *r[1:]), strict=True)) for r in rows]
            if fmt == "csv":
                text = (
                    ",".join(fields)
                    + "\n"
                    + "".join(",".join(str(r[f]) for f in fields) + "\n" for r in records)
                )
                mime = "text/csv"
            else:
                text, mime = (
                    json.dumps({"inst_id": inst_id, "timeframe": timeframe, "candles": records}),
                    "application/json",
                )
            self.download.data = {"text": [text], "mime": [mime], "name": [f"{inst_id}-{timeframe}.{fmt}"]}
            self.status.text = f"exported {len(records):,} candles ({fmt})"

        in_background(self.ctx, self.doc, work, done, self._failed)

    def close(self) -> None:
        self._stop_listening()


def _ms(value: Any) -> float:
    if isinstance(value, datetime):
        return (value - _EPOCH) / timedelta(milliseconds=1)
    return float(value)
