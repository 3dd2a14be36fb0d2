"""The dashboard's logic against a real Bokeh server, PostgreSQL, Redis and Kafka (no browser):
history from PostgreSQL, live candles through the ONE Redis subscriber (stream and patch),
controls refused without a login and sent on bots.commands with one, form validation, the
websocket origin allow-list. (Real-browser tests: tests/test_dashboard_browser.py.)"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.cookiejar import CookieJar
from typing import Any

import msgspec
import pytest
import redis
from pydantic import SecretStr

from bokeh_app.app import PAGES
from bokeh_app.bots_page import BotsPage, check_create_form
from bokeh_app.context import AppContext
from bokeh_app.market import MarketPage
from bokeh_app.server import make_server
from bots.bot import Bot, encode_status
from bots.config import BotConfig
from bots.lifecycle import decode_command
from bots.portfolio import Fill
from dataflows.bots import BOT_TRADES_UPSERT, BOTS_UPSERT, SIGNALS_UPSERT, fill_row, signal_row, status_row
from dataflows.candle_core import Candle, encode_candle
from dataflows.candles import CANDLES_UPSERT, candle_row
from sinks.postgres import PostgresWriter
from strategies.base import Signal, encode_signal
from tcp import topics
from tcp.config import Settings
from tests.kafka_util import read_topic
from tests.test_run import wait_for

pytestmark = pytest.mark.services

T0 = 1_710_028_800_000
MINUTE = 60_000


def candle(i: int, close: str = "100.5") -> Candle:
    return Candle("BTC-USDT", "1m", T0 + i * MINUTE, "100", "101.5", "99.5", close, "2", "201", 3)


@pytest.fixture
def dashboard(settings: Settings, database: str) -> Iterator[tuple[Settings, Any, AppContext]]:
    s = settings.model_copy(update={"postgres_dsn": SecretStr(database), "dashboard_password": SecretStr("s3cret"),
                                    "dashboard_cookie_secret": SecretStr("test-cookie-secret")})  # fmt: skip
    writer = PostgresWriter(database, CANDLES_UPSERT)
    writer.write([candle_row(candle(i)) for i in range(1, 301)])
    writer.close()
    config = BotConfig.model_validate({"name": "b1", "strategy": "ema_crossover", "params": {}, "inst_id": "BTC-USDT",
                                       "timeframe": "1m"})  # fmt: skip
    bots = PostgresWriter(database, BOTS_UPSERT)
    bots.write([status_row(Bot.create(config).status(now=T0))])
    bots.close()
    with served(s) as (server, ctx):
        yield s, server, ctx


@contextmanager
def served(s: Settings) -> Iterator[tuple[Any, AppContext]]:
    """The dashboard's Bokeh server over ``s``, on a free port, running on a thread."""
    with socket.socket() as probe:  # a free port: the origin allow-list names the real one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server, ctx = make_server(s, port=port)
    thread = threading.Thread(target=server.io_loop.start, daemon=True)
    thread.start()
    try:
        yield server, ctx
    finally:
        server.io_loop.add_callback(server.io_loop.stop)
        thread.join(10)
        server.stop()
        ctx.hub.stop()


def open_session(
    server: Any, ctx: AppContext, opener: urllib.request.OpenerDirector | None = None
) -> tuple[MarketPage, BotsPage]:
    """GET / (Bokeh builds a session's document, as for a browser tab), then that session's pages."""
    before = {session.id for session in server.get_sessions("/")}
    (opener or urllib.request.build_opener()).open(f"http://127.0.0.1:{server.port}/", timeout=20).read()
    session = wait_for(
        "the session", lambda: next((x for x in server.get_sessions("/") if x.id not in before), None)
    )
    found = wait_for("the pages", lambda: ctx.pages.get(session.document))
    return found.market, on_server(found.market, lambda: found.page("Bots"))


def on_server(page: MarketPage | BotsPage, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as a Bokeh callback of the page's document (on the server's loop, the document
    locked: what a click does), and return its result."""
    done = threading.Event()
    result: list[Any] = []

    def callback() -> None:
        result.append(fn())
        done.set()

    page.doc.add_next_tick_callback(callback)
    assert done.wait(10)
    return result[0]


def test_history_then_live_candles_through_the_one_subscriber(
    dashboard: tuple[Settings, Any, AppContext],
) -> None:
    s, server, ctx = dashboard
    market, _ = open_session(server, ctx)
    wait_for("the history", lambda: len(market.source.data["ts"]) == 300)
    assert market.source.data["close"][-1] == 100.5 and market.status.text.startswith("BTC-USDT 1m: 300")
    ema = market.source.data["ema12"]
    assert ema[10] != ema[10] and ema[11] == pytest.approx(100.5)  # NaN in warm-up, then the EMA

    hub = ctx.hub
    assert hub.listeners >= 2  # this session's pages listen on the one hub
    client = redis.Redis.from_url(s.redis_url.get_secret_value())
    live = b'{"kind":"live","candle":' + encode_candle(candle(301, "102")) + b"}"
    wait_for("a subscriber", lambda: client.publish("market:BTC-USDT", live) > 0)
    wait_for("the forming candle", lambda: market.forming.data["close"] == [102.0])
    client.publish("market:BTC-USDT", b'{"kind":"live","candle":' + encode_candle(candle(301, "103")) + b"}")
    wait_for("the patch", lambda: market.forming.data["close"] == [103.0])
    client.publish("market:BTC-USDT", b'{"kind":"final","candle":' + encode_candle(candle(301, "104")) + b"}")
    wait_for("the new final candle", lambda: len(market.source.data["ts"]) == 301)
    assert market.source.data["close"][-1] == 104.0 and market.forming.data["ts"] == []
    client.publish("market:ETH-USDT", b'{"kind":"final","candle":' + encode_candle(candle(302)) + b"}")
    client.publish("market:BTC-USDT", b"not json")
    time.sleep(0.5)
    assert len(market.source.data["ts"]) == 301  # another instrument, and garbage, change nothing

    on_server(market, market._history_mode)  # the user panned: live candles no longer move the view
    end = market.x_range.end
    client.publish("market:BTC-USDT", b'{"kind":"final","candle":' + encode_candle(candle(302)) + b"}")
    wait_for("the next final candle", lambda: len(market.source.data["ts"]) == 302)
    assert market.x_range.end == end and not market.follow.disabled


def test_sessions_share_the_history_columns_but_not_live_updates_or_overlays(
    dashboard: tuple[Settings, Any, AppContext],
) -> None:
    s, server, ctx = dashboard
    first, _ = open_session(server, ctx)
    second, _ = open_session(server, ctx)
    for page in (first, second):
        wait_for("the history", lambda p=page: len(p.source.data["ts"]) == 300)
    # The same rows: the second session got the first one's arrays (read-only), its own indicators.
    assert first.source.data["close"] is second.source.data["close"]
    assert not first.source.data["close"].flags.writeable
    assert first.indicators is not second.indicators
    client = redis.Redis.from_url(s.redis_url.get_secret_value())
    final = b'{"kind":"final","candle":' + encode_candle(candle(301, "104")) + b"}"
    wait_for("a subscriber", lambda: client.publish("market:BTC-USDT", final) > 0)
    for page in (first, second):
        wait_for("the live candle", lambda p=page: len(p.source.data["ts"]) == 301)
        assert page.source.data["close"][-1] == 104.0
        ema = (104 - 100.5) * 2 / 13 + 100.5  # each session continues its own EMA
        assert page.source.data["ema12"][-1] == pytest.approx(ema)
    assert len(ctx.history[("BTC-USDT", "1m")].arrays["ts"]) == 300  # the kept columns did not change

    assert first.bb == [] and "Bollinger" not in [i.label.value for i in first.price.legend.items]
    on_server(first, lambda: setattr(first.overlays, "active", [0, 1]))  # the user ticks "Bollinger 20/2"
    assert len(first.bb) == 3 and all(r.visible for r in first.bb) and second.bb == []
    assert "Bollinger" in [i.label.value for i in first.price.legend.items]
    on_server(first, lambda: setattr(first.overlays, "active", [0]))
    assert len(first.bb) == 3 and not any(r.visible for r in first.bb)


def _signal(i: int, action: str, *, inst_id: str = "BTC-USDT", digest: str = "0123456789abcdef") -> Signal:
    return Signal("ema_crossover", digest, inst_id, "1m", T0 + i * MINUTE, action, "100.5", {}, "a test")  # type: ignore[arg-type]


def _fill(seq: int, i: int, side: str) -> Fill:
    return Fill("b1", seq, T0 + i * MINUTE, side, "100.6", "1", "100.6", "0.1", "9899.3", "1", "0")  # type: ignore[arg-type]


def test_buy_and_sell_markers_of_a_bot_or_a_strategy_history_then_live(
    dashboard: tuple[Settings, Any, AppContext],
) -> None:
    s, server, ctx = dashboard
    dsn = s.postgres_dsn.get_secret_value()
    for upsert, rows in ((SIGNALS_UPSERT, [signal_row(_signal(10, "buy")), signal_row(_signal(40, "sell")),
                                           signal_row(_signal(50, "buy", inst_id="ETH-USDT"))]),
                         (BOT_TRADES_UPSERT, [fill_row(_fill(1, 20, "buy"), "BTC-USDT", "1m")])):  # fmt: skip
        writer = PostgresWriter(dsn, upsert)
        writer.write(rows)
        writer.close()
    market, _ = open_session(server, ctx)
    bot, strategy = "bot:b1", "strategy:ema_crossover:0123456789abcdef"
    wait_for("the marker choices", lambda: [v for v, _ in market.markers.options] == ["", bot, strategy])
    wait_for("the history", lambda: len(market.source.data["ts"]) == 300)

    on_server(market, lambda: setattr(market.markers, "value", bot))
    wait_for("the bot's fills", lambda: market.buys.data["ts"] == [T0 + 20 * MINUTE])
    assert market.buys.data["price"] == [100.6] and market.sells.data["ts"] == []
    client = redis.Redis.from_url(s.redis_url.get_secret_value())
    fill = b'{"kind":"fill","fill":' + msgspec.json.encode(_fill(2, 301, "sell")) + b"}"
    wait_for("a subscriber", lambda: client.publish("signals:b1", fill) > 0)
    wait_for("the live fill", lambda: market.sells.data["ts"] == [T0 + 301 * MINUTE])
    client.publish("signals:b2", b'{"kind":"fill","fill":' + msgspec.json.encode(_fill(3, 302, "buy")) + b"}")

    on_server(market, lambda: setattr(market.markers, "value", strategy))
    wait_for("the strategy's signals", lambda: market.buys.data["ts"] == [T0 + 10 * MINUTE])
    assert market.sells.data["ts"] == [T0 + 40 * MINUTE]  # ETH-USDT's signal is not on this chart
    for signal in (
        _signal(303, "buy", inst_id="ETH-USDT"),
        _signal(304, "buy", digest="f" * 16),
        _signal(305, "buy"),
    ):
        client.publish("signals:b1", b'{"kind":"signal","signal":' + encode_signal(signal) + b"}")
    client.publish("signals:b1", b"not json")
    wait_for("the live signal", lambda: market.buys.data["ts"] == [T0 + 10 * MINUTE, T0 + 305 * MINUTE])
    time.sleep(0.5)
    assert market.buys.data["ts"] == [T0 + 10 * MINUTE, T0 + 305 * MINUTE]  # other streams and params: none

    on_server(
        market, lambda: setattr(market.markers, "value", "bot:x'; DROP TABLE bots; --")
    )  # a forged value
    assert market._chosen is None and market.buys.data["ts"] == [] and "error" in market.status.text
    on_server(market, lambda: setattr(market.markers, "value", ""))
    assert market.buys.data["ts"] == [] and market.sells.data["ts"] == []

    # Export: the candles in view and the markers on them, as stored (exact text).
    on_server(market, lambda: setattr(market.markers, "value", bot))
    wait_for("the bot's fills", lambda: market.buys.data["ts"] == [T0 + 20 * MINUTE])
    on_server(
        market,
        lambda: (
            setattr(market.x_range, "start", T0 + 18 * MINUTE),
            setattr(market.x_range, "end", T0 + 22 * MINUTE),
        ),
    )
    on_server(market, lambda: market.export("csv"))
    wait_for("the CSV", lambda: market.download.data["name"] == ["BTC-USDT-1m.csv"])
    lines = market.download.data["text"][0].splitlines()
    assert lines[0] == "ts,open,high,low,close,volume,marker,marker_price" and len(lines) == 5  # 18..21
    assert lines[3] == "2024-03-10T00:20:00+00:00,100,101.5,99.5,100.5,2,buy,100.6"
    assert lines[1].endswith(",2,,")  # no marker on that candle
    on_server(market, lambda: market.export("json"))
    wait_for("the JSON", lambda: market.download.data["name"] == ["BTC-USDT-1m.json"])
    body = json.loads(market.download.data["text"][0])
    assert [c["ts"] for c in body["candles"]][0] == "2024-03-10T00:18:00+00:00" and len(body["candles"]) == 4
    assert body["candles"][0]["high"] == "101.5" and body["markers"]["of"] == "fills of bot b1"
    assert body["markers"]["rows"] == [{"ts": "2024-03-10T00:20:00+00:00", "side": "buy", "price": "100.6"}]


def test_picked_days_are_history_mode_until_follow_live(dashboard: tuple[Settings, Any, AppContext]) -> None:
    s, server, ctx = dashboard
    market, _ = open_session(server, ctx)
    wait_for("the history", lambda: len(market.source.data["ts"]) == 300)  # 2024-03-10 00:01 .. 05:00
    writer = PostgresWriter(s.postgres_dsn.get_secret_value(), CANDLES_UPSERT)
    writer.write([candle_row(candle(24 * 60 + i)) for i in range(10)])  # 2024-03-11 00:00 .. 00:09
    writer.close()

    def shown() -> int:  # read on the server's loop: the test's thread may catch the source mid-update
        return int(on_server(market, lambda: len(market.source.data["ts"])))

    # As BokehJS's picker sends it: ISO dates; the last day is included.
    on_server(market, lambda: setattr(market.range, "value", ("2024-03-11", "2024-03-11")))
    wait_for("the day's candles", lambda: shown() == 10)
    start, end = T0 + 24 * 60 * MINUTE, T0 + 48 * 60 * MINUTE
    assert market.source.data["ts"][0] == start and market.source.data["ts"][-1] == start + 9 * MINUTE
    assert not market.following and (market.x_range.start, market.x_range.end) == (start, end)
    client = redis.Redis.from_url(s.redis_url.get_secret_value())
    final = b'{"kind":"final","candle":' + encode_candle(candle(24 * 60 + 10)) + b"}"
    wait_for("a subscriber", lambda: client.publish("market:BTC-USDT", final) > 0)
    time.sleep(0.5)
    assert (market.x_range.start, market.x_range.end) == (start, end)  # live candles do not move it
    on_server(market, lambda: setattr(market.timeframe, "value", "5m"))  # another stream: the same days
    wait_for(
        "the 5m candles", lambda: on_server(market, lambda: market.status.text.startswith("BTC-USDT 5m"))
    )
    assert (market.x_range.start, market.x_range.end) == (start, end) and not market.following
    on_server(market, lambda: setattr(market.timeframe, "value", "1m"))
    wait_for("the day's candles again", lambda: shown() == 10)
    on_server(market, lambda: setattr(market.range, "value", ("2024-03-10", "2024-03-11")))  # both days
    wait_for("both days' candles", lambda: shown() == 310)
    # "Follow live": the stored candles again (the live one was published, not stored), the newest in view.
    on_server(market, market.go_live)
    wait_for("live again", lambda: shown() == 310 and market.following)
    assert market.range.value is None and market.x_range.end > start + 9 * MINUTE
    on_server(market, lambda: market.pick_range(("not a date", "2024-03-10")))
    assert "error" in market.status.text and market.following  # refused: nothing changes


def _commands(s: Settings, expect: int) -> list[Any]:
    return [decode_command(m.value()) for m in read_topic(s, topics.BOTS_COMMANDS, expect=expect, idle_s=1.5)]


def test_controls_need_a_login_checked_on_the_server(dashboard: tuple[Settings, Any, AppContext]) -> None:
    s, server, ctx = dashboard
    port = server.port
    _, guest = open_session(server, ctx)
    wait_for("the bots table", lambda: list(guest.source.data["name"]) == ["b1"])
    assert guest.user is None and guest.buttons["stop"].disabled
    on_server(guest, lambda: guest.send("stop", ["b1"]))  # as if the button were forced
    assert "refused" in guest.message.text and "log in" in guest.message.text
    assert read_topic(s, topics.BOTS_COMMANDS, idle_s=1.5) == []  # nothing was sent

    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"http://127.0.0.1:{port}/login", timeout=10).read().decode()
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page)
    assert xsrf is not None
    form = {"_xsrf": xsrf.group(1), "username": "admin", "password": "wrong", "next": "/"}
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(f"http://127.0.0.1:{port}/login", urllib.parse.urlencode(form).encode(), timeout=10)
    assert refused.value.code == 403
    form["password"] = "s3cret"
    opener.open(f"http://127.0.0.1:{port}/login", urllib.parse.urlencode(form).encode(), timeout=10).read()
    assert any(c.name == "tcp_user" for c in jar)

    _, admin = open_session(server, ctx, opener)
    assert admin.user == "admin" and not admin.buttons["stop"].disabled
    wait_for("the bots table", lambda: list(admin.source.data["name"]) == ["b1"])
    on_server(admin, lambda: admin.send("stop", ["b1"]))
    sent = _commands(s, 1)
    assert [(c.action, c.bot, c.user) for c in sent] == [("stop", "b1", "admin")]
    on_server(admin, lambda: admin.send("stop", ["b1; DROP TABLE bots"]))
    assert "refused" in admin.message.text

    client = redis.Redis.from_url(s.redis_url.get_secret_value())
    config = BotConfig.model_validate({"name": "b1", "strategy": "ema_crossover", "params": {}, "inst_id": "BTC-USDT",
                                       "timeframe": "1m"})  # fmt: skip
    bot = Bot.create(config)
    bot.state = "stopped"
    client.publish("status:b1", encode_status(bot.status(now=T0)))
    wait_for("the status patch", lambda: list(admin.source.data["state"]) == ["stopped"])


def test_the_create_form_checks_every_field() -> None:
    good = {"name": "ema-1", "strategy": "ema_crossover", "inst_id": "BTC-USDT", "timeframe": "1m",
            "params": '{"fast": 5, "slow": 13}', "fee": "0.001", "slippage_bps": "5", "initial_cash": "10000"}  # fmt: skip
    config, errors = check_create_form(good)
    assert errors == {} and config is not None and config.params == {"fast": 5, "slow": 13}
    _, errors = check_create_form({**good, "params": '{"fast": 30, "slow": 13}'})
    assert "fast (30) must be smaller than slow (13)" in errors["params"]
    _, errors = check_create_form({**good, "params": "{fast: 5"})
    assert errors["params"].startswith("not JSON")
    _, errors = check_create_form({**good, "inst_id": "btc usdt", "fee": "-1"})
    assert "instrument id" in errors["inst_id"] and "fee" in errors
    _, errors = check_create_form({**good, "strategy": "no_such"})
    assert "no_such" in errors["strategy"]


def test_websocket_origins_are_an_allow_list(dashboard: tuple[Settings, Any, AppContext]) -> None:
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect

    _, server, _ = dashboard
    port = server.port
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20).read().decode()
    token = re.search(r'"token":"([^"]+)"', page)
    assert token is not None

    async def connect(origin: str) -> str:
        request = HTTPRequest(f"ws://127.0.0.1:{port}/ws", headers={"Origin": origin})
        try:
            conn = await websocket_connect(request, subprotocols=["bokeh", token.group(1)])
        except HTTPClientError as exc:
            return str(exc.code)
        conn.close()
        return "open"

    assert IOLoop().run_sync(lambda: connect(f"http://localhost:{port}")) == "open"  # the same session's page
    assert IOLoop().run_sync(lambda: connect("http://evil.example:5006")) == "403"


def _admin(server: Any, ctx: AppContext) -> tuple[Any, ...]:
    """A logged-in session's pages."""
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"http://127.0.0.1:{server.port}/login", timeout=10).read().decode()
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page)
    assert xsrf is not None
    form = {"_xsrf": xsrf.group(1), "username": "admin", "password": "s3cret", "next": "/"}
    opener.open(
        f"http://127.0.0.1:{server.port}/login", urllib.parse.urlencode(form).encode(), timeout=10
    ).read()
    before = {session.id for session in server.get_sessions("/")}
    opener.open(f"http://127.0.0.1:{server.port}/", timeout=20).read()
    session = wait_for(
        "the session", lambda: next((x for x in server.get_sessions("/") if x.id not in before), None)
    )
    found = wait_for("the pages", lambda: ctx.pages.get(session.document))
    return tuple(on_server(found.market, lambda t=t: found.page(t)) for t in PAGES)


def test_a_backtest_runs_in_a_process_and_opens_on_the_performance_page(
    dashboard: tuple[Settings, Any, AppContext],
) -> None:
    s, server, ctx = dashboard
    guest = open_session(server, ctx)
    guest_backtests = on_server(guest[0], lambda: ctx.pages[guest[0].doc].page("Backtests"))
    on_server(guest[0], lambda: guest_backtests.submit(sweep=False))
    assert "refused" in guest_backtests.message.text

    market, _bots, performance, backtests, _health = _admin(server, ctx)

    def fill(**values: str) -> None:
        for key, value in values.items():
            backtests.inputs[key].value = value

    on_server(market, lambda: fill(strategy="ema_crossover", params='{"fast": 30, "slow": 10}'))
    on_server(market, lambda: backtests.submit(sweep=False))
    assert "fast (30) must be smaller than slow (10)" in backtests.errors["params"].text

    on_server(market, lambda: fill(params='{"fast": 3, "slow": 8}'))
    on_server(market, lambda: backtests.submit(sweep=False))
    picked = wait_for("the result on the Performance page", lambda: list(performance.pick.value), timeout=90)
    assert picked[0].startswith("backtest:") and "ema_crossover-BTC-USDT-1m" in picked[0]
    wait_for("its equity curve", lambda: len(performance.lines[0].data["ts"]) == 300, timeout=30)
    assert "total return" in performance.cards.text and "0.00%" in performance.cards.text  # flat candles
    assert "done" in backtests.progress.text

    on_server(market, lambda: fill(params='{"fast": [3, 4], "slow": [8, 9]}'))
    on_server(market, lambda: backtests.submit(sweep=True))
    wait_for("the sweep's best rows", lambda: len(backtests.best.data.get("params", ())) == 4, timeout=120)
    assert "sweep done: 4 combinations" in backtests.message.text and "width:100%" in backtests.progress.text


def test_a_bot_on_the_performance_page_has_the_metrics_of_its_equity(
    dashboard: tuple[Settings, Any, AppContext],
) -> None:
    from bots.portfolio import Mark
    from dataflows.bots import BOT_PERFORMANCE_UPSERT, mark_row

    s, server, ctx = dashboard
    equity = ["10000", "10100", "9999", "10200.5"]
    marks = [Mark("b1", T0 + (i + 1) * MINUTE, "100", e, "0", e, "0", "0", "0") for i, e in enumerate(equity)]
    writer = PostgresWriter(s.postgres_dsn.get_secret_value(), BOT_PERFORMANCE_UPSERT)
    writer.write([mark_row(m) for m in marks])
    writer.close()
    market, *_rest = open_session(server, ctx)
    performance = on_server(market, lambda: ctx.pages[market.doc].page("Performance"))
    wait_for("b1 among the choices", lambda: "bot:b1" in performance.pick.options)
    on_server(market, lambda: setattr(performance.pick, "value", ["bot:b1"]))
    wait_for("the curve", lambda: len(performance.lines[0].data["ret"]) == 4)
    assert performance.lines[0].data["ret"][-1] == pytest.approx(0.02005)
    assert min(performance.lines[0].data["dd"]) == pytest.approx(9999 / 10100 - 1)
    assert "2.00%" in performance.cards.text and "10200.5" in performance.cards.text


def test_data_health_rates_and_ages() -> None:
    from datetime import UTC, datetime, timedelta

    from bokeh_app.health import Snapshot, instrument_rows

    now = datetime.now(tz=UTC)
    services = [("kafka", "embedded", True, "x")]
    first = Snapshot(100.0, services, [], {"BTC-USDT": 1000.0}, {}, {}, {"BTC-USDT": now - timedelta(seconds=30),
                                                                         "ETH-USDT": None})  # fmt: skip
    rows = instrument_rows(None, first, now)
    assert rows == {
        "inst_id": ["BTC-USDT", "ETH-USDT"],
        "trades_per_s": [None, None],
        "last_trade_age_s": [30.0, None],
    }
    second = Snapshot(103.0, services, [], {"BTC-USDT": 1600.0}, {}, {}, first.last_trade)
    assert instrument_rows(first, second, now)["trades_per_s"] == [200.0, None]  # 600 trades in 3 s
