"""A fake OKX for tests: the public WebSocket and REST ``history-trades``, on 127.0.0.1.

It speaks the real v5 protocol, as described in the OKX docs and seen in captured frames:

- WebSocket ``/ws/v5/public``: ``subscribe`` -> one ack per arg (``{"id","event","arg","connId"}``),
  or an error event ``60018`` ("Wrong URL or channel:trades,instId:X doesn't exist. ...") for an
  instrument it does not list; malformed requests get ``60012`` / ``60013`` / ``60019``. The text
  ``ping`` is answered with the text ``pong``. A connection with nothing received from the client
  and nothing pushed to it for ``idle_timeout_s`` (OKX: 30 s) is closed with code 4004. Right
  after a subscribe it re-sends the instrument's last trade, as OKX does.
- Trade pushes: ``{"arg":{"channel":"trades","instId":..},"data":[{instId, tradeId, px, sz, side,
  ts, count, source, seqId}]}``; every number a string except ``seqId``; tradeIds ascend per
  instrument and jump by ``count`` (the id of an aggregated push is the last of its fills).
- REST ``GET /api/v5/market/history-trades?instId=&type=1&after=&before=&limit=``: newest first,
  ``limit`` <= 100, ``after`` = older than that tradeId, ``before`` = newer; over 20 requests in
  2 s it answers ``{"msg":"Too Many Requests","code":"50011"}`` (HTTP 429). An unknown path gets
  OKX's 404 body, whose ``code`` is a number.

Test controls: generate and push trades (one burst or a steady stream), drop every connection
without a close frame (a network failure), push a ``notice`` 64008, stop answering pings, refuse
new connections, inject REST errors. Everything runs in a background thread with its own event
loop, so the fake keeps serving while the code under test blocks its own loop.

Use it as a context manager::

    with FakeOkx(("BTC-USDT", "ETH-USDT"), idle_timeout_s=2) as okx:
        source = OkxTradeSource(ws_url=okx.ws_url, rest_url=okx.rest_url, instruments=...)
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

__all__ = ["INSTRUMENT_SPECS", "FakeOkx", "InstrumentSpec"]

T = TypeVar("T")

WS_PATH = "/ws/v5/public"
HISTORY_PATH = "/api/v5/market/history-trades"
TRADES_PATH = "/api/v5/market/trades"
RATE_LIMIT_BODY = {"msg": "Too Many Requests", "code": "50011"}
NOT_FOUND_BODY = {
    "code": 404,
    "data": {},
    "detailMsg": "",
    "error_code": "404",
    "error_message": "Not Found",
    "msg": "Not Found",
}
NOTICE_MSG = "The connection will soon be closed for a service upgrade. Please reconnect."


@dataclass(frozen=True)
class InstrumentSpec:
    """How trades of one instrument look: start price, tick and lot decimals, first tradeId."""

    price: str
    price_decimals: int
    size_decimals: int
    first_trade_id: int
    max_lots: int  # sizes are 1..max_lots lots of 10^-size_decimals


INSTRUMENT_SPECS = {
    "BTC-USDT": InstrumentSpec("42219.9", 1, 8, 130_639_474, 20_000_000),
    "ETH-USDT": InstrumentSpec("2250.12", 2, 6, 542_013_001, 5_000_000),
    "SOL-USDT": InstrumentSpec("98.123", 3, 4, 88_120_017, 2_000_000),
    "BTC-USDT-SWAP": InstrumentSpec("42225.1", 1, 0, 1_012_345_678, 300),
}


def _plain(ticks: int, decimals: int) -> str:
    """``ticks`` * 10^-decimals as OKX writes it: plain notation, no trailing zeros ("30236", "5.16")."""
    text = f"{Decimal(ticks).scaleb(-decimals):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass
class _Book:
    """The generated history of one instrument (ascending tradeIds), and the generator's state."""

    spec: InstrumentSpec
    next_id: int
    price_ticks: int
    seq_id: int = 0
    trades: list[dict[str, Any]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Conn:
    ws: ServerConnection
    conn_id: str
    last_activity: float
    subs: set[str] = field(default_factory=set)


class FakeOkx:
    """A fake OKX public WebSocket + REST server (see the module docstring)."""

    def __init__(
        self,
        instruments: Iterable[str] = ("BTC-USDT", "ETH-USDT"),
        *,
        idle_timeout_s: float = 30.0,
        history: int = 0,
        rest_limit: tuple[int, float] = (20, 2.0),
        rate_limit_status: int = 429,
        resend_last_on_subscribe: bool = True,
        seed: int = 7,
    ) -> None:
        self._rng = random.Random(seed)
        self._books: dict[str, _Book] = {}
        for inst_id in instruments:
            spec = INSTRUMENT_SPECS.get(inst_id) or InstrumentSpec("100.5", 2, 4, 1_000_000, 100_000)
            ticks = int(Decimal(spec.price).scaleb(spec.price_decimals))
            self._books[inst_id] = _Book(spec, spec.first_trade_id, ticks)
        self.idle_timeout_s = idle_timeout_s
        self.rest_limit = rest_limit
        self.rate_limit_status = rate_limit_status
        self.resend_last_on_subscribe = resend_last_on_subscribe
        # Switches a test may flip at any time.
        self.answer_pings = True
        self.refuse_connections = False
        # What happened, for assertions.
        self.connection_attempts: list[float] = []  # time.monotonic() of every handshake
        self.connections = 0  # accepted WebSocket connections
        self.close_codes: list[int] = []  # close codes the fake sent (4004 ...)
        self.client_close_codes: list[int | None] = []  # how each connection ended (1006: cut)
        self.pings = 0
        self.subscribe_requests: list[dict[str, Any]] = []
        self.rest_requests = 0
        self.rest_rate_limited = 0
        self._lock = threading.Lock()  # guards books and REST state (the HTTP server has threads)
        self._rest_window: deque[float] = deque()
        self._rest_faults: deque[tuple[int, dict[str, Any]]] = deque()
        self._conns: set[_Conn] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-okx", daemon=True)
        self._ws_server: Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._stream: asyncio.Task[None] | None = None
        self.ws_port = 0
        if history:
            past = int(time.time() * 1000) - history * 250
            for index in range(history):
                for inst_id in self._books:
                    self._new_trade(inst_id, past + index * 250)

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> FakeOkx:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        self._call(self._start_ws())
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._http.daemon_threads = True
        self._http_thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-okx-http", daemon=True
        )
        self._http_thread.start()

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._thread.is_alive():
            self._call(self._stop_ws())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}{WS_PATH}"

    @property
    def rest_url(self) -> str:
        assert self._http is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    # --- test controls (thread-safe, blocking briefly) ---------------------------------------------

    def push_trades(self, n: int = 1, inst_id: str | None = None) -> list[dict[str, Any]]:
        """Generate ``n`` trades per instrument (or of ``inst_id``) now, push them, return them."""
        return self._call(self._push(n, inst_id))

    def start_stream(self, interval_s: float = 0.01, per_tick: int = 1) -> None:
        """Keep generating ``per_tick`` trades per instrument every ``interval_s`` until stopped."""
        self._call(self._start_stream(interval_s, per_tick))

    def stop_stream(self) -> None:
        """Stop the stream; no trade is generated after this returns."""
        self._call(self._stop_stream())

    def drop_all(self) -> int:
        """Cut every connection without a close frame (like a network failure); how many were cut."""
        return self._call(self._drop_all())

    def send_notice(self) -> int:
        """Push ``notice`` 64008 (service upgrade ahead) to every connection; how many got it."""
        return self._call(self._send_notice())

    def inject_rest_errors(
        self, count: int, *, status: int = 429, body: dict[str, Any] | None = None
    ) -> None:
        """Answer the next ``count`` REST requests with ``status`` and ``body`` (default 50011)."""
        with self._lock:
            self._rest_faults.extend([(status, body or RATE_LIMIT_BODY)] * count)

    # --- observations ------------------------------------------------------------------------------

    def trade_ids(self, inst_id: str) -> list[int]:
        """Every tradeId generated for the instrument, ascending."""
        with self._lock:
            return list(self._books[inst_id].ids)

    def all_trade_ids(self) -> dict[str, list[int]]:
        with self._lock:
            return {inst_id: list(book.ids) for inst_id, book in self._books.items()}

    def subscribed(self, inst_id: str) -> bool:
        """Whether an open connection is subscribed to the instrument's trades."""
        return any(inst_id in conn.subs for conn in list(self._conns))

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # --- trade generation --------------------------------------------------------------------------

    def _new_trade(self, inst_id: str, ts_ms: int) -> dict[str, Any]:
        """One realistic trade push item; appended to the history. Call with the books consistent."""
        with self._lock:
            book = self._books[inst_id]
            rng = self._rng
            count = 1 if rng.random() < 0.8 else rng.randint(2, 5)
            trade_id = book.next_id + count - 1
            book.next_id = trade_id + 1
            book.price_ticks = max(1, book.price_ticks + rng.choice((-2, -1, 0, 0, 0, 1, 2)))
            book.seq_id += rng.randint(1, 3)
            lots = max(1, int(rng.paretovariate(1.2) * book.spec.max_lots / 2000))
            item = {
                "instId": inst_id,
                "tradeId": str(trade_id),
                "px": _plain(book.price_ticks, book.spec.price_decimals),
                "sz": _plain(min(lots, book.spec.max_lots), book.spec.size_decimals),
                "side": rng.choice(("buy", "sell")),
                "ts": str(ts_ms),
                "count": str(count),
                "source": "0" if rng.random() < 0.95 else "1",
                "seqId": book.seq_id,
            }
            book.trades.append(item)
            book.ids.append(trade_id)
            return item

    @staticmethod
    def _push_frame(inst_id: str, items: list[dict[str, Any]]) -> str:
        return json.dumps(
            {"arg": {"channel": "trades", "instId": inst_id}, "data": items}, separators=(",", ":")
        )

    async def _push(self, n: int, only: str | None) -> list[dict[str, Any]]:
        pushed: list[dict[str, Any]] = []
        for _ in range(n):
            for inst_id in [only] if only else list(self._books):
                item = self._new_trade(inst_id, int(time.time() * 1000))
                pushed.append(item)
                await self._broadcast(inst_id, self._push_frame(inst_id, [item]))
        return pushed

    async def _start_stream(self, interval_s: float, per_tick: int) -> None:
        await self._stop_stream()

        async def run() -> None:
            while True:
                await self._push(per_tick, None)
                await asyncio.sleep(interval_s)

        self._stream = asyncio.create_task(run())

    async def _stop_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stream
            self._stream = None

    async def _broadcast(self, inst_id: str, text: str) -> None:
        for conn in list(self._conns):
            if inst_id in conn.subs:
                await self._send(conn, text)

    async def _send(self, conn: _Conn, text: str) -> None:
        conn.last_activity = self._loop.time()
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.send(text)

    # --- WebSocket server --------------------------------------------------------------------------

    async def _start_ws(self) -> None:
        self._ws_server = await serve(
            self._serve,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            ping_interval=None,
            close_timeout=1,
        )
        self.ws_port = next(iter(self._ws_server.sockets)).getsockname()[1]

    async def _stop_ws(self) -> None:
        await self._stop_stream()
        if self._ws_server is not None:
            self._ws_server.close()
            await self._ws_server.wait_closed()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.connection_attempts.append(time.monotonic())
        if urlsplit(request.path).path != WS_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        if self.refuse_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Service Unavailable\n")
        return None

    async def _serve(self, ws: ServerConnection) -> None:
        conn = _Conn(ws, secrets.token_hex(4), self._loop.time())
        self._conns.add(conn)
        self.connections += 1
        watchdog = asyncio.create_task(self._idle_watchdog(conn))
        try:
            async for message in ws:
                conn.last_activity = self._loop.time()
                text = message if isinstance(message, str) else message.decode("utf-8", "replace")
                if text == "ping":
                    self.pings += 1
                    if self.answer_pings:
                        await self._send(conn, "pong")
                    continue
                await self._on_request(conn, text)
        except ConnectionClosed:
            pass
        finally:
            self._conns.discard(conn)
            watchdog.cancel()
            self.client_close_codes.append(ws.close_code)

    async def _idle_watchdog(self, conn: _Conn) -> None:
        while True:
            remaining = conn.last_activity + self.idle_timeout_s - self._loop.time()
            if remaining <= 0:
                self.close_codes.append(4004)
                await conn.ws.close(4004, "No data received in 30s")
                return
            await asyncio.sleep(remaining)

    async def _error(self, conn: _Conn, code: str, msg: str, req_id: Any) -> None:
        frame: dict[str, Any] = {"event": "error", "code": code, "msg": msg, "connId": conn.conn_id}
        if req_id is not None:
            frame = {"id": req_id, **frame}
        await self._send(conn, json.dumps(frame, separators=(",", ":")))

    async def _on_request(self, conn: _Conn, text: str) -> None:
        try:
            request = json.loads(text)
        except ValueError:
            await self._error(conn, "60012", f"Invalid request: {text[:200]}", None)
            return
        if not isinstance(request, dict):
            await self._error(conn, "60012", f"Invalid request: {text[:200]}", None)
            return
        self.subscribe_requests.append(request)
        req_id, op, args = request.get("id"), request.get("op"), request.get("args")
        if len(text.encode()) > 64 * 1024:
            await self._error(conn, "60012", "Invalid request: request too large", req_id)
        elif op not in ("subscribe", "unsubscribe"):
            await self._error(conn, "60019", f"Invalid op: op {op}", req_id)
        elif not isinstance(args, list) or not args or not all(isinstance(arg, dict) for arg in args):
            await self._error(conn, "60013", f"Invalid args: {text[:200]}", req_id)
        else:
            for arg in args:
                await self._on_arg(conn, op, arg, req_id)

    async def _on_arg(self, conn: _Conn, op: str, arg: dict[str, Any], req_id: Any) -> None:
        channel, inst_id = arg.get("channel"), arg.get("instId")
        if channel != "trades" or inst_id not in self._books:
            msg = (
                f"Wrong URL or channel:{channel},instId:{inst_id} doesn't exist. "
                "Please use the correct URL, channel and parameters referring to API document."
            )
            await self._error(conn, "60018", msg, req_id)
            return
        ack: dict[str, Any] = {
            "event": op,
            "arg": {"channel": channel, "instId": inst_id},
            "connId": conn.conn_id,
        }
        if req_id is not None:
            ack = {"id": req_id, **ack}
        if op == "unsubscribe":
            conn.subs.discard(inst_id)
            await self._send(conn, json.dumps(ack, separators=(",", ":")))
            return
        conn.subs.add(inst_id)  # before the ack: nothing generated after this is missed
        await self._send(conn, json.dumps(ack, separators=(",", ":")))
        with self._lock:
            trades = self._books[inst_id].trades
            last = trades[-1] if trades else None
        if self.resend_last_on_subscribe and last is not None:
            await self._send(conn, self._push_frame(inst_id, [last]))

    async def _drop_all(self) -> int:
        conns = list(self._conns)
        for conn in conns:
            conn.ws.transport.abort()
        return len(conns)

    async def _send_notice(self) -> int:
        conns = list(self._conns)
        for conn in conns:
            frame = {"event": "notice", "code": "64008", "msg": NOTICE_MSG, "connId": conn.conn_id}
            await self._send(conn, json.dumps(frame, separators=(",", ":")))
        return len(conns)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # --- REST --------------------------------------------------------------------------------------

    def rest_answer(self, path: str, query: str) -> tuple[int, Any]:
        """(HTTP status, JSON body) for a GET; called from the HTTP server's threads."""
        with self._lock:
            self.rest_requests += 1
            if self._rest_faults:
                return self._rest_faults.popleft()
            if path not in (HISTORY_PATH, TRADES_PATH):
                return HTTPStatus.NOT_FOUND, NOT_FOUND_BODY
            if path == HISTORY_PATH and not self._rest_admit(time.monotonic()):
                self.rest_rate_limited += 1
                return self.rate_limit_status, RATE_LIMIT_BODY
            return self._trades_page(path, parse_qs(query))

    def _rest_admit(self, now: float) -> bool:
        """The server side of "20 requests per 2 seconds": a sliding window over admitted requests."""
        limit, window = self.rest_limit
        while self._rest_window and now - self._rest_window[0] >= window:
            self._rest_window.popleft()
        if len(self._rest_window) >= limit:
            return False
        self._rest_window.append(now)
        return True

    def _trades_page(self, path: str, params: dict[str, list[str]]) -> tuple[int, Any]:
        def param(name: str) -> str | None:
            values = params.get(name)
            return values[-1] if values else None

        inst_id = param("instId")
        if not inst_id:
            return HTTPStatus.OK, {"code": "51000", "msg": "Parameter instId error", "data": []}
        book = self._books.get(inst_id)
        if book is None:
            return HTTPStatus.OK, {"code": "51001", "msg": "Instrument ID does not exist", "data": []}
        max_limit = 100 if path == HISTORY_PATH else 500
        after_text, before_text = param("after"), param("before")
        try:
            limit = int(param("limit") or max_limit)
            after = int(after_text) if after_text else None
            before = int(before_text) if before_text else None
        except ValueError:
            return HTTPStatus.OK, {"code": "51000", "msg": "Parameter error", "data": []}
        if param("type") not in (None, "1") or path == TRADES_PATH and (after or before):
            return HTTPStatus.OK, {
                "code": "51000",
                "msg": "Parameter type error (fake: tradeId paging only)",
                "data": [],
            }
        if not 1 <= limit <= max_limit:
            return HTTPStatus.OK, {"code": "51000", "msg": "Parameter limit error", "data": []}
        hi = bisect.bisect_left(book.ids, after) if after is not None else len(book.ids)
        lo = bisect.bisect_right(book.ids, before) if before is not None else 0
        rows = [_rest_row(item) for item in reversed(book.trades[max(lo, hi - limit) : hi])]
        return HTTPStatus.OK, {"code": "0", "msg": "", "data": rows}


def _rest_row(item: dict[str, Any]) -> dict[str, str]:
    """A pushed trade as ``history-trades`` returns it (no count/seqId; key order as OKX sends)."""
    keys = ("instId", "side", "sz", "px", "source", "tradeId", "ts")
    return {key: item[key] for key in keys}


def _handler_for(fake: FakeOkx) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            status, body = fake.rest_answer(parts.path, parts.query)
            payload = json.dumps(body, separators=(",", ":")).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

    return Handler
