"""``tcp dashboard``: the Bokeh server of bokeh_app, on the services of the settings.

    tcp dashboard [--port 5006] [--address 127.0.0.1] [--allow-websocket-origin HOST:PORT ...]

The websocket origins are an explicit allow-list (default: the address and port it serves,
plus localhost); a browser page from any other origin cannot open a session. Cookies are
included in the session context (for the login of bokeh_app/auth.py), signed with
``TCP_DASHBOARD_COOKIE_SECRET``; forms carry an XSRF token.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from functools import partial

from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.resources import Resources
from bokeh.server.server import Server

from bokeh_app.app import Prefetch, make_document
from bokeh_app.auth import COOKIE, Credentials, DashboardAuth
from bokeh_app.context import AppContext
from bokeh_app.hub import LiveHub
from tcp.config import Settings

__all__ = ["cmd_dashboard", "make_server", "register"]

log = logging.getLogger(__name__)


def origins(address: str, port: int, extra: Sequence[str]) -> list[str]:
    """The websocket origin allow-list: the served address, localhost, and ``extra``."""
    found = [f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}", *extra]
    return list(dict.fromkeys(o for o in found if o and not o.startswith("0.0.0.0")))


def make_server(settings: Settings, *, port: int = 5006, address: str = "127.0.0.1",
                allow_origins: Sequence[str] = ()) -> tuple[Server, AppContext]:  # fmt: skip
    """A started-but-not-running Bokeh server of the dashboard (``server.io_loop.start()``
    serves; tests run it on a thread). ``settings`` must point at reachable services."""
    credentials = Credentials.from_settings(settings)
    hub = LiveHub(settings.redis_url.get_secret_value()).start()
    ctx = AppContext(settings, credentials, hub)
    app = Application(Prefetch(ctx), FunctionHandler(partial(make_document, ctx)))
    server = Server(
        {"/": app},
        port=port,
        address=address,
        allow_websocket_origin=origins(address, port, allow_origins),
        auth_provider=DashboardAuth(credentials),
        cookie_secret=credentials.cookie_secret,
        include_cookies=[COOKIE],  # the session sees the login cookie only
        xsrf_cookies=True,
    )
    _skip_unused_bundles(server)
    server.start()
    return server, ctx


#: BokehJS bundles a Bokeh server page loads that the dashboard never uses: MathJax (1.8 MB: no
#: LaTeX labels) and WebGL (no ``output_backend="webgl"``). A server page gets every bundle,
#: since Bokeh cannot know what a session will show; leaving these out is ~2 MB less JavaScript
#: for the browser to parse before it draws the first chart.
UNUSED_BUNDLES = ("bokeh-mathjax", "bokeh-gl")


def _skip_unused_bundles(server: Server) -> None:
    tornado = server._tornado  # no public hook for the page's resources
    full = tornado.resources

    def resources(absolute_url: str | bool | None = None) -> Resources:
        found = full(absolute_url)
        return found.clone(components=[c for c in found.components if c not in UNUSED_BUNDLES])

    tornado.resources = resources  # type: ignore[method-assign]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dashboard`` to the ``tcp`` subcommands."""
    p = sub.add_parser("dashboard", help="serve the Bokeh dashboard (live charts, bots and their controls)")
    p.add_argument("--port", type=int, default=5006)
    p.add_argument(
        "--address", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)"
    )
    p.add_argument("--allow-websocket-origin", action="append", default=[], metavar="HOST:PORT",
                   help="another origin allowed to open sessions (repeatable), e.g. dashboard.example.com:443")  # fmt: skip
    p.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from tcp import services
    from tcp.observe import serve_metrics

    settings = services.ensure(settings)
    serve_metrics("dashboard", settings)
    server, ctx = make_server(settings, port=args.port, address=args.address,
                              allow_origins=args.allow_websocket_origin)  # fmt: skip
    controls = (
        "controls need a login" if ctx.credentials.password else "read-only: set TCP_DASHBOARD_PASSWORD"
    )
    print(f"dashboard on http://{args.address}:{server.port}/ ({controls}); Ctrl-C stops it", flush=True)
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.hub.stop()
    return 0
