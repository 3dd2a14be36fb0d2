"""One dashboard session: the pages in tabs, the login line, and clean-up when the tab closes."""

from __future__ import annotations

from bokeh.document import Document
from bokeh.layouts import column
from bokeh.models import TabPanel, Tabs
from bokeh.models.widgets import Div

from bokeh_app import data
from bokeh_app.auth import session_user
from bokeh_app.bots_page import BotsPage
from bokeh_app.context import AppContext
from bokeh_app.market import MarketPage

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
    bots = BotsPage(ctx, doc, user=user, on_bots=market.set_bots)
    who = (
        f"logged in as <b>{user}</b> (<a href='/logout'>log out</a>)"
        if user
        else "read-only (<a href='/login'>log in</a> for the controls)"
    )
    header = Div(text=f"<b>TCP Dashboard</b> &nbsp; {who} {problem}", sizing_mode="stretch_width")
    tabs = Tabs(tabs=[TabPanel(child=market.layout, title="Market"), TabPanel(child=bots.layout, title="Bots")],
                sizing_mode="stretch_width")  # fmt: skip
    doc.add_root(column(header, tabs, sizing_mode="stretch_width"))
    doc.title = "TCP Dashboard"
    market.load()
    bots.refresh()
    ctx.pages[doc] = (market, bots)

    def closed(_context: object) -> None:
        market.close()
        bots.close()
        ctx.pages.pop(doc, None)

    doc.on_session_destroyed(closed)
