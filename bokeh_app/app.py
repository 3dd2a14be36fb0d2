"""One dashboard session: the pages in tabs, the login line, and clean-up when the tab closes."""

from __future__ import annotations

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
from bokeh_app.performance import PerformancePage

__all__ = ["make_document"]


def _cookies(doc: Document) -> dict[str, str] | None:
    context = doc.session_context
    request = getattr(context, "request", None)  # a server session's HTTP request (None in tests)
    return None if request is None else dict(request.cookies)


def make_document(ctx: AppContext, doc: Document) -> None:
    """Build one session's document (Bokeh calls this for every new browser tab)."""
    user = session_user(ctx.credentials, _cookies(doc))
    try:
        instruments = data.instruments(ctx.dsn)  # one quick query, before the page exists
    except Exception as exc:  # the page still opens, and says why it is empty
        instruments = []
        problem = f"PostgreSQL: {type(exc).__name__}: {exc}"
    else:
        problem = ""
    market = MarketPage(ctx, doc, instruments=instruments)
    performance = PerformancePage(ctx, doc)

    def bots_changed(names: list[str]) -> None:
        market.set_bots(names)
        performance.refresh_choices(names)

    bots = BotsPage(ctx, doc, user=user, on_bots=bots_changed)
    health = HealthPage(ctx, doc, instruments=instruments)
    who = (
        f"logged in as <b>{user}</b> (<a href='/logout'>log out</a>)"
        if user
        else "read-only (<a href='/login'>log in</a> for the controls)"
    )
    header = Div(text=f"<b>TCP Dashboard</b> &nbsp; {who} {problem}", sizing_mode="stretch_width")
    pages = [("Market", market.layout), ("Bots", bots.layout), ("Performance", performance.layout)]
    tabs = Tabs(sizing_mode="stretch_width")

    def open_result(name: str) -> None:
        performance.show_backtest(name)
        tabs.active = 2

    backtests = BacktestsPage(ctx, doc, user=user, open_result=open_result)
    pages += [("Backtests", backtests.layout), ("Data health", health.layout)]
    tabs.tabs = [TabPanel(child=layout, title=title) for title, layout in pages]
    doc.add_root(column(header, tabs, sizing_mode="stretch_width"))
    doc.title = "TCP Dashboard"
    market.load()
    bots.refresh()
    health.refresh()
    ctx.pages[doc] = (market, bots, performance, backtests, health)

    def closed(_context: object) -> None:
        market.close()
        bots.close()
        ctx.pages.pop(doc, None)

    doc.on_session_destroyed(closed)
