"""The dashboard in a real browser: headless Chromium (Debian's, /usr/bin/chromium, driven by
Selenium through /usr/bin/chromedriver: nothing is downloaded) against a served dashboard on
real services. Screenshots of each page go to ``$TCP_TEST_ARTIFACTS`` (default
``test-artifacts/``).

`make test` installs Chromium where it can (Debian/Ubuntu, as root); where it cannot, these tests
are skipped with the reason, loudly (pytest -ra prints it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from pydantic import SecretStr

from bokeh_app.context import AppContext
from dataflows.candle_core import encode_candle
from tcp.config import Settings
from tests.env_util import tcp_env
from tests.test_dashboard import MINUTE, T0, candle, dashboard, served
from tests.test_run import wait_for

pytestmark = pytest.mark.services

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("TCP_TEST_ARTIFACTS", "test-artifacts"))
__all__ = ["dashboard"]  # the fixture, used by name below


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is not installed (Debian: apt-get install chromium chromium-driver; `make test` tries)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _missing()
    if reason is not None:
        pytest.skip(f"REAL-BROWSER TESTS SKIPPED: {reason}")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=1500,1200"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def candles_drawn(driver: Any) -> int:
    """How many candles the page's candlestick glyph has (from BokehJS, in the browser)."""
    return js(driver, """
        const doc = window.Bokeh && Bokeh.documents && Bokeh.documents[0];
        const r = doc && doc.get_model_by_name('candles');
        return r ? r.data_source.data.ts.length : -1;""")  # fmt: skip


def shot(driver: Any, name: str) -> Path:
    path = ARTIFACTS / f"dashboard-{name}.png"
    driver.save_screenshot(str(path))
    return path


def test_the_chart_renders_and_a_new_candle_appears_live(
    browser: Any, dashboard: tuple[Settings, Any, AppContext]
) -> None:
    s, server, _ = dashboard
    browser.get(f"http://127.0.0.1:{server.port}/")
    wait_for("the candlestick glyphs", lambda: candles_drawn(browser) == 300, timeout=30)
    canvases = _deep(browser, "canvas")  # drawn: Bokeh renders into canvases in shadow roots
    assert canvases and any(c.size["width"] > 500 for c in canvases)
    shot(browser, "market")
    client = redis.Redis.from_url(s.redis_url.get_secret_value())
    client.publish("market:BTC-USDT", b'{"kind":"final","candle":' + encode_candle(candle(301, "104")) + b"}")
    wait_for("the live candle in the browser", lambda: candles_drawn(browser) == 301, timeout=15)
    last = js(browser, "const d = Bokeh.documents[0].get_model_by_name('candles').data_source.data;"
                       "return d.close[d.close.length - 1];")  # fmt: skip
    assert last == 104.0
    for title in ("Bots", "Performance", "Backtests", "Data health"):  # a screenshot of every page
        waiting = len(_deep(browser, "div", "loading ..."))  # the tabs not built yet
        wait_for(f"the {title} tab", lambda t=title: _deep(browser, ".bk-tab", t), timeout=30)[0].click()
        # Built on first use: the tab's "loading ..." is replaced by the page.
        wait_for(
            f"the {title} page", lambda w=waiting: len(_deep(browser, "div", "loading ...")) < w, timeout=30
        )
        time.sleep(1.0)  # let the page draw before the picture
        shot(browser, title.lower().replace(" ", "-"))


_DEEP = """
    const out = [];
    const walk = (root) => {
        root.querySelectorAll(arguments[0]).forEach(e => out.push(e));
        root.querySelectorAll('*').forEach(e => { if (e.shadowRoot) walk(e.shadowRoot); });
    };
    walk(document);
    return arguments[1] === null ? out : out.filter(e => e.textContent.trim() === arguments[1]);
"""


def _deep(driver: Any, selector: str, text: str | None = None) -> list[Any]:
    """Elements matching ``selector`` (and with this text), also inside Bokeh's shadow roots."""
    return driver.execute_script(_DEEP, selector, text)  # type: ignore[no-any-return]


def _bots_tab(driver: Any) -> None:
    tabs = wait_for("the Bots tab", lambda: _deep(driver, ".bk-tab", "Bots"), timeout=30)
    tabs[0].click()
    try:
        wait_for("the bots tab", lambda: any(b.is_displayed() for b in _deep(driver, "button", "stop")))
    except AssertionError:
        shot(driver, "failed-bots-tab")
        raise


def _stop_button(driver: Any) -> Any:
    return _deep(driver, "button", "stop")[0]


_TABLE = "Bokeh.documents[0].get_model_by_name('bots-table')"


def test_controls_need_a_login_and_stop_reaches_postgresql(
    browser: Any, dashboard: tuple[Settings, Any, AppContext], tmp_path: Path
) -> None:
    s, server, _ = dashboard
    bots_file = tmp_path / "bots.json"
    bots_file.write_text(json.dumps([{"name": "b1", "strategy": "ema_crossover", "params": {},
                                      "inst_id": "BTC-USDT", "timeframe": "1m"}]))  # fmt: skip
    env = tcp_env(s, TCP_HOME=str(tmp_path / "home"), TCP_LOG_LEVEL="WARNING")
    log = open(tmp_path / "bots.log", "wb")  # noqa: SIM115 - closed below
    flow = subprocess.Popen([sys.executable, "-m", "tcp.cli", "bots", "run", "--bots", str(bots_file)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    dsn = s.postgres_dsn.get_secret_value()

    def state() -> str | None:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT state FROM bots WHERE name = 'b1'").fetchone()
        return None if row is None else row[0]

    try:
        wait_for("the bot to run", lambda: state() == "running", timeout=60)
        browser.delete_all_cookies()
        browser.get(f"http://127.0.0.1:{server.port}/")
        _bots_tab(browser)
        assert _stop_button(browser).get_attribute("disabled") is not None  # a guest: no controls
        shot(browser, "bots-read-only")

        browser.get(f"http://127.0.0.1:{server.port}/login")
        from selenium.webdriver.common.by import By

        browser.find_element(By.NAME, "username").send_keys("admin")
        browser.find_element(By.NAME, "password").send_keys("s3cret")
        browser.find_element(By.ID, "login").click()
        wait_for("the dashboard", lambda: candles_drawn(browser) >= 300, timeout=30)
        _bots_tab(browser)
        wait_for("b1 in the table", lambda: js(browser, f"return {_TABLE}.source.data.name.includes('b1')"))
        js(browser, f"{_TABLE}.source.selected.indices = [0];")  # the row's checkbox
        button = _stop_button(browser)
        assert button.get_attribute("disabled") is None
        shot(browser, "bots")
        button.click()
        wait_for("the stop in PostgreSQL", lambda: state() == "stopped", timeout=30)
    finally:
        flow.terminate()
        flow.wait(30)
        log.close()


_PIXELS = """
    // Per plot: the pixels of its frame in a candle's colour (#26a69a; every candle here closes
    // up) and a hash of them all, but for the frame's outer 2 columns each side: BokehJS clamps
    // bars beyond the frame to its edge and strokes them there, culled or not, as many as it is
    // given.
    const doc = Bokeh.documents[0];
    return ['price', 'volume', 'rsi', 'macd'].map(name => {
        const view = Bokeh.index.find_one(doc.get_model_by_name(name));
        const canvas = view.canvas_view.primary.canvas, r = window.devicePixelRatio;
        const {left, right, top, bottom} = view.frame.bbox;
        const x0 = Math.ceil(left * r) + 2, x1 = Math.floor(right * r) - 2;
        const y0 = Math.ceil(top * r), y1 = Math.floor(bottom * r);
        const px = canvas.getContext('2d').getImageData(x0, y0, x1 - x0, y1 - y0).data;
        let candle = 0, hash = 0;
        for (let i = 0; i < px.length; i += 4) {
            if (px[i] === 38 && px[i + 1] === 166 && px[i + 2] === 154) { candle++; }
            hash = (hash * 31 + px[i] + 7 * px[i + 1] + 13 * px[i + 2] + 17 * px[i + 3]) | 0;
        }
        return [candle, hash];
    });"""
_FRAMES = "const done = arguments[0]; setTimeout(() => requestAnimationFrame(() => requestAnimationFrame(done)), 200);"
_VIEWS = "[['lrtb', 'LRTBView'], ['segment', 'SegmentView']].map(([m, v]) => Bokeh.require('models/glyphs/' + m)[v])"
_CULLED = f"return {_VIEWS}.map(view => view.prototype._tcp_culled === true);"
_CULLING_OFF = f"window.__culling = {_VIEWS}.map(view => view.prototype._mask_data); {_VIEWS}.forEach(view => {{ delete view.prototype._mask_data; }});"
_CULLING_ON = f"{_VIEWS}.forEach((view, i) => {{ view.prototype._mask_data = window.__culling[i]; }});"


def _view(driver: Any, start: float, end: float) -> list[list[int]]:
    """Set the chart's time range (as a pan does; via start + 1 ms, so it is always a change),
    let BokehJS paint, and read the plots' pixels."""
    for first in (start + 1, start):
        js(driver, f"const x = Bokeh.documents[0].get_model_by_name('price').x_range; x.start = {first}; x.end = {end};")  # fmt: skip
        driver.execute_async_script(_FRAMES)
    return js(driver, _PIXELS)  # type: ignore[no-any-return]


def test_bars_outside_the_view_are_skipped_and_those_in_it_drawn_as_without_culling(
    browser: Any, dashboard: tuple[Settings, Any, AppContext]
) -> None:
    """bokeh_app/culling.js: BokehJS paints only the bars and wicks in view. Wherever the view
    is, the plots' pixels are the same as BokehJS's own drawing of every bar."""
    _, server, _ = dashboard
    browser.get(f"http://127.0.0.1:{server.port}/")
    wait_for("the candlestick glyphs", lambda: candles_drawn(browser) == 300, timeout=30)
    assert js(browser, _CULLED) == [True, True]  # the bar (LRTB) and segment views are patched
    oldest, newest = T0 + MINUTE, T0 + 300 * MINUTE
    windows = [(oldest - 5 * MINUTE, oldest + 60 * MINUTE), (newest - 120 * MINUTE, newest + 2 * MINUTE),
               (oldest + 100 * MINUTE, oldest + 101 * MINUTE), (oldest - 90 * MINUTE, oldest - 30 * MINUTE)]  # fmt: skip
    candle_pixels = []
    for window in windows:
        culled = _view(browser, *window)
        js(browser, _CULLING_OFF)
        whole = _view(browser, *window)
        js(browser, _CULLING_ON)
        assert culled == whole, window  # pixel for pixel, in every plot
        candle_pixels.append(culled[0][0])  # the price chart's
    assert all(n > 0 for n in candle_pixels[:3])  # the candles in view are drawn
    assert candle_pixels[3] == 0  # an hour before the first candle: nothing


def test_over_a_demo_run_the_chart_and_a_bots_fills_are_drawn(
    browser: Any, settings: Settings, database: str, tmp_path: Path
) -> None:
    """The app served over what `tcp demo` wrote: the sample's candles and a bot's fills."""
    s = settings.model_copy(update={"postgres_dsn": SecretStr(database)})
    env = tcp_env(s, TCP_HOME=str(tmp_path / "home"), TCP_LOG_LEVEL="WARNING")
    done = subprocess.run([sys.executable, "-m", "tcp.cli", "demo", "--no-serve"], env=env, capture_output=True,
                          text=True, timeout=240, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with served(s) as (server, _):
        browser.get(f"http://127.0.0.1:{server.port}/")
        wait_for("the first instrument's candles", lambda: candles_drawn(browser) > 0, timeout=30)
        js(browser, "Bokeh.documents[0].get_model_by_name('instrument').value = 'BTC-USDT';")
        # The demo's 2 hours of 1m candles for BTC-USDT, and its bot on BTC-USDT among the choices.
        wait_for("BTC-USDT's candles", lambda: candles_drawn(browser) == 120, timeout=30)
        choices = "return Bokeh.documents[0].get_model_by_name('markers').options.map(o => o[0]);"
        wait_for(
            "the bot among the marker choices", lambda: "bot:ema-btc" in js(browser, choices), timeout=30
        )
        js(browser, "Bokeh.documents[0].get_model_by_name('markers').value = 'bot:ema-btc';")
        fills = "const d = Bokeh.documents[0]; return ['buys', 'sells'].map(n => d.get_model_by_name(n).data_source.data.ts.length);"  # noqa: E501

        def drawn() -> list[int] | None:
            counts: list[int] = js(browser, fills)
            return counts if sum(counts) > 0 else None

        counts = wait_for("the bot's fills drawn", drawn, timeout=30)
        with psycopg.connect(database) as conn:
            stored = conn.execute("SELECT count(*) FROM bot_trades WHERE bot = 'ema-btc'").fetchone()
        assert stored is not None and sum(counts) == stored[0] > 0  # every fill of the 2 hours, as markers
        shot(browser, "market-demo")
