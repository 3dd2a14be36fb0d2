"""The Data health page: are the services up, is data flowing, is anything piling up?

Every 3 s, on a worker thread: the services' status (tcp.services), the Prometheus figures every
running service of this home announces (tcp.observe: trades in per instrument, dead letters,
late trades, OKX reconnects and backfilled trades, consumer lag per partition), and the age of
the last archived trade per instrument (PostgreSQL ``trades``, one index probe per instrument).
Trades/s is the change of ``tcp_trades_in_total`` (the candle dataflow's count of valid trades)
between two refreshes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource
from bokeh.models.widgets import DataTable, Div, TableColumn

from bokeh_app.context import AppContext, in_background
from tcp import observe, services

__all__ = ["HealthPage", "Snapshot", "instrument_rows", "snapshot"]


@dataclass
class Snapshot:
    """One look at the platform."""

    at: float
    services: list[tuple[str, str, bool, str]]  # service, mode, up, address
    processes: list[tuple[str, int, str]]  # service, pid, problem ("" when its metrics answered)
    trades_in: dict[str, float] = field(default_factory=dict)  # by instrument (candle dataflow)
    totals: dict[str, float] = field(default_factory=dict)  # dead letters, late, reconnects, backfilled
    lag: dict[tuple[str, str], float] = field(default_factory=dict)  # (topic, partition) -> messages
    last_trade: dict[str, datetime | None] = field(default_factory=dict)


_TOTALS = {
    "tcp_dead_letters_total": "dead letters",
    "tcp_late_trades_total": "late trades",
    "tcp_duplicates_total": "duplicates (ingest)",
    "tcp_reconnects_total": "OKX reconnects",
    "tcp_backfilled_trades_total": "backfilled trades",
    "tcp_backfill_failures_total": "backfill gaps left",
}


def snapshot(ctx: AppContext, instruments: list[str]) -> Snapshot:
    """Blocking: read everything the page shows."""
    settings = ctx.settings
    snap = Snapshot(
        time.monotonic(), [(s.service, s.mode, s.up, s.address) for s in services.status(settings)], []
    )
    for endpoint in observe.endpoints(settings):
        try:
            found = observe.samples(endpoint)
        except OSError as exc:
            snap.processes.append((endpoint.service, endpoint.pid, str(exc)))
            continue
        snap.processes.append((endpoint.service, endpoint.pid, ""))
        for name, labels, value in found:
            if name == "tcp_trades_in_total" and endpoint.service == "candles":
                snap.trades_in[labels["inst_id"]] = snap.trades_in.get(labels["inst_id"], 0.0) + value
            elif name in _TOTALS:
                snap.totals[_TOTALS[name]] = snap.totals.get(_TOTALS[name], 0.0) + value
            elif name == "tcp_consumer_lag":
                snap.lag[(labels["topic"], labels["partition"])] = value
    known = sorted(set(instruments) | set(settings.instruments) | set(snap.trades_in))
    with psycopg.connect(ctx.dsn, connect_timeout=5) as conn:
        for inst_id in known:
            found_row = conn.execute("SELECT max(ts) FROM trades WHERE inst_id = %s", (inst_id,)).fetchone()
            snap.last_trade[inst_id] = None if found_row is None else found_row[0]
    return snap


def instrument_rows(before: Snapshot | None, snap: Snapshot, now: datetime) -> dict[str, list[Any]]:
    """The per-instrument table: trades/s since the previous look (None on the first), and the
    age of the last archived trade in seconds (None when there is none)."""
    elapsed = None if before is None else snap.at - before.at
    names = sorted(snap.last_trade)
    rates: list[float | None] = []
    for inst_id in names:
        if before is None or not elapsed or inst_id not in snap.trades_in:
            rates.append(None)
        else:
            rates.append(round((snap.trades_in[inst_id] - before.trades_in.get(inst_id, 0.0)) / elapsed, 1))
    ages = []
    for inst_id in names:
        last = snap.last_trade[inst_id]
        ages.append(None if last is None else round((now - last) / timedelta(seconds=1), 1))
    return {"inst_id": names, "trades_per_s": rates, "last_trade_age_s": ages}


class HealthPage:
    """One session's Data health page (``layout``)."""

    def __init__(self, ctx: AppContext, doc: Document, *, instruments: list[str]) -> None:
        self.ctx, self.doc, self.instruments = ctx, doc, instruments
        self.previous: Snapshot | None = None
        self.services = Div(text="", name="health-services")
        self.totals = Div(text="")
        self.per_instrument = ColumnDataSource({"inst_id": [], "trades_per_s": [], "last_trade_age_s": []})
        self.lag = ColumnDataSource({"topic": [], "partition": [], "lag": []})
        self.layout = column(
            Div(text="<h3>Data health</h3>"), self.services, self.totals,
            row(DataTable(source=self.per_instrument, width=420, height=260, name="health-instruments",
                          columns=[TableColumn(field=k, title=k.replace("_", " ")) for k in self.per_instrument.data]),
                DataTable(source=self.lag, width=420, height=260,
                          columns=[TableColumn(field=k, title=k) for k in self.lag.data])),
            sizing_mode="stretch_width",
        )  # fmt: skip
        self._periodic = doc.add_periodic_callback(self.refresh, 3000)

    def refresh(self) -> None:
        instruments = list(self.instruments)
        ctx = self.ctx
        in_background(ctx, self.doc, lambda: ctx.shared("health", 2.5, lambda: snapshot(ctx, instruments)), self.show,
                      self._failed)  # fmt: skip

    def _failed(self, error: Exception) -> None:
        self.services.text = f"<b>error:</b> {type(error).__name__}: {error}"

    def show(self, snap: Snapshot) -> None:
        if self.previous is not None and snap.at == self.previous.at:
            return  # the same shared look as last time (AppContext.shared)
        lines = [
            f"<b>{name}</b> <span style='color:{'#2e7d32' if up else '#c62828'}'>{'up' if up else 'DOWN'}</span> "
            f"{mode} {address}"  # tcp.services redacts passwords
            for name, mode, up, address in snap.services
        ]
        procs = [
            f"{svc} (pid {pid})" + (f": <b>{problem}</b>" if problem else "")
            for svc, pid, problem in snap.processes
        ]
        self.services.text = (
            "<br>".join(lines) + "<br>running: " + (", ".join(procs) or "no service announced metrics")
        )
        self.totals.text = " &nbsp; ".join(f"{k}: <b>{v:,.0f}</b>" for k, v in sorted(snap.totals.items()))
        self.per_instrument.data = instrument_rows(self.previous, snap, datetime.now(tz=UTC))
        keys = sorted(snap.lag)
        self.lag.data = {"topic": [k[0] for k in keys], "partition": [k[1] for k in keys],
                         "lag": [snap.lag[k] for k in keys]}  # fmt: skip
        self.previous = snap
