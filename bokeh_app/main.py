"""``bokeh serve bokeh_app``: the same dashboard as ``tcp dashboard``, settings from TCP_*.

    bokeh serve bokeh_app --auth-module bokeh_app/auth.py --include-cookies \
        --cookie-secret "$TCP_DASHBOARD_COOKIE_SECRET" --allow-websocket-origin localhost:5006
"""

from __future__ import annotations

from bokeh.io import curdoc

from bokeh_app.app import make_document
from bokeh_app.auth import Credentials
from bokeh_app.context import AppContext
from bokeh_app.hub import LiveHub
from tcp import services
from tcp.config import Settings

_ctx: AppContext | None = None


def _context() -> AppContext:
    """One context per server process, made by the first session (the environment read once)."""
    global _ctx
    if _ctx is None:
        settings = services.ensure(Settings.load())
        _ctx = AppContext(settings, Credentials.from_settings(settings),
                          LiveHub(settings.redis_url.get_secret_value()).start())  # fmt: skip
    return _ctx


make_document(_context(), curdoc())
