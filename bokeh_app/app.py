"""One dashboard session: the pages in tabs, the login line, and clean-up when the tab closes.

Only the Market page is built when a browser tab opens; every other page is built the first
time its tab is chosen (a document with all five pages took about 1.4 s more to draw 10,000
candles: BENCHMARKS.md). Under ``tcp dashboard`` the first chart's candles are read before the
document is made (:class:`Prefetch`, awaited by the server off its I/O loop), so the browser
gets them with the document and draws the chart once, instead of drawing it empty and again
when the rows arrive. The pages themselves are built just after the HTML page is sent
(:func:`make_document`), while the browser loads BokehJS.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bokeh.application.application import SessionContext
from bokeh.application.handlers.handler import Handler
from bokeh.document import Document
from bokeh.layouts import column
from bokeh.models import TabPanel, Tabs
from bokeh.models.widgets import Div

from bokeh_app import data
from bokeh_app.auth import session_user
from bokeh_app.backtests_page import BacktestsPage
from bokeh_app.bots_page import BotsPage
from bokeh_app.context import AppContext
from bokeh_app.health import HealthPage
from bokeh_app.market import MarketPage
from bokeh_app.page import PAGE
from bokeh_app.performance import PerformancePage

__all__ = ["PAGES", "Prefetch", "Session", "make_document"]

#: The tabs, in order.
PAGES = ("Market", "Bots", "Performance", "Backtests", "Data health")


def _cookies(doc: Document) -> dict[str, str] | None:
    context = doc.session_context
    request = getattr(context, "request", None)  # a server session's HTTP request (None in tests)
    return None if request is None else dict(request.cookies)


@dataclass(frozen=True, slots=True)
class Initial:
    """What a new session shows first: the instruments (or why there are none) and, when read
    ahead, the candles of the first stream."""

    instruments: list[str]
    problem: str = ""
    rows: list[tuple[Any, ...]] | None = None

    @classmethod
    def read(cls, ctx: AppContext, *, candles: bool) -> Initial:
        """Blocking (PostgreSQL): call it off the document's thread where possible."""
        try:
            instruments = data.instruments(ctx.dsn)
            rows = None
            if candles and instruments:
                first = (instruments[0], ctx.settings.timeframes[0])
                rows = data.candle_rows(ctx.dsn, *first, limit=ctx.settings.dashboard_candles)
        except Exception as exc:  # the page still opens, and says why it is empty
            return cls([], f"PostgreSQL: {type(exc).__name__}: {exc}")
        return cls(instruments, "", rows)


class Prefetch(Handler):
    """A server handler that reads a new session's :class:`Initial` on the I/O threads before the
    document is made (Bokeh awaits ``on_session_created`` first); ``make_document`` takes it."""

    def __init__(self, ctx: AppContext) -> None:
        super().__init__()
        self.ctx = ctx

    def modify_document(self, doc: Document) -> None:
        """Nothing: :func:`make_document` builds the document."""

    async def on_session_created(self, session_context: SessionContext) -> None:
        loop = asyncio.get_running_loop()
        initial = await loop.run_in_executor(self.ctx.executor, lambda: Initial.read(self.ctx, candles=True))
        self.ctx.prefetched[session_context.id] = initial


class Session:
    """One browser tab's pages; :meth:`page` builds a page the first time it is wanted (on the
    document's thread: a tab click, or a Bokeh callback)."""

    def __init__(self, ctx: AppContext, doc: Document, user: str | None, instruments: list[str]) -> None:
        self.ctx, self.doc, self.user, self.instruments = ctx, doc, user, instruments
        self.market = MarketPage(ctx, doc, instruments=instruments)
        self.pages: dict[str, Any] = {"Market": self.market}
        # Each tab holds a column whose one child is set when the page is built (BokehJS redraws
        # a changed column; it does not redraw a TabPanel whose child was replaced).
        self.holders = [column(self.market.layout if t == "Market" else Div(text="loading ..."),
                               sizing_mode="stretch_width") for t in PAGES]  # fmt: skip
        self.tabs = Tabs(tabs=[TabPanel(child=h, title=t) for h, t in zip(self.holders, PAGES, strict=True)],
                         sizing_mode="stretch_width")  # fmt: skip
        self.tabs.on_change("active", lambda _a, _o, new: self.page(PAGES[new]))
        builders: dict[str, Callable[[], Any]] = {
            "Bots": lambda: BotsPage(ctx, doc, user=user, on_bots=self._bots_changed),
            "Performance": lambda: PerformancePage(ctx, doc),
            "Backtests": lambda: BacktestsPage(ctx, doc, user=user, open_result=self._open_result),
            "Data health": lambda: HealthPage(ctx, doc, instruments=instruments),
        }
        self._builders = builders

    def page(self, title: str) -> Any:
        """The page of that tab, built now if it was not yet."""
        found = self.pages.get(title)
        if found is None:
            found = self.pages[title] = self._builders[title]()
            self.holders[PAGES.index(title)].children = [found.layout]
            refresh = getattr(found, "refresh", None)
            if refresh is not None:
                refresh()
        return found

    def _bots_changed(self, names: list[str]) -> None:
        self.market.load_marker_choices()
        if "Performance" in self.pages:
            self.pages["Performance"].refresh_choices(names)

    def _open_result(self, name: str) -> None:
        self.page("Performance").show_backtest(name)
        self.tabs.active = PAGES.index("Performance")

    def close(self) -> None:
        for page in self.pages.values():
            closing = getattr(page, "close", None)
            if closing is not None:
                closing()


def make_document(ctx: AppContext, doc: Document) -> None:
    """Make one session's document (Bokeh calls this for every new browser tab).

    On a server the pages are built on the next tick of the I/O loop, after the browser has its
    HTML page: the page's scripts load while the server builds the charts (the browser pulls
    the document once its scripts are loaded, by which time it is complete; were it earlier, the
    pages would reach it as an update). Without a server (``Document()`` in a script) they are
    built at once."""
    user = session_user(ctx.credentials, _cookies(doc))
    context = doc.session_context
    initial = None if context is None else ctx.prefetched.pop(context.id, None)
    if initial is None:  # no Prefetch handler (``bokeh serve bokeh_app``, tests): one quick query
        initial = Initial.read(ctx, candles=False)
    who = (
        f"logged in as <b>{user}</b> (<a href='/logout'>log out</a>)"
        if user
        else "read-only (<a href='/login'>log in</a> for the controls)"
    )
    header = Div(text=f"<b>TCP Dashboard</b> &nbsp; {who} {initial.problem}", sizing_mode="stretch_width")
    root = column(header, sizing_mode="stretch_width")
    doc.add_root(root)
    doc.title = "TCP Dashboard"
    doc.template = PAGE  # Bokeh's page, with the bars outside the view left unpainted

    def build() -> None:
        session = Session(ctx, doc, user, initial.instruments)
        root.children = [header, session.tabs]
        if initial.rows is not None:
            session.market.show(initial.rows)
        else:
            session.market.load()
        ctx.pages[doc] = session

    def closed(_context: object) -> None:
        session = ctx.pages.pop(doc, None)  # none when the tab closed before it was built
        if session is not None:
            session.close()

    doc.on_session_destroyed(closed)
    if context is None:
        build()
    else:
        doc.add_next_tick_callback(build)
