"""OkxTradeSource: live OKX trades from the public WebSocket, with REST backfill after reconnects.

One connection subscribes the ``trades`` channel of every instrument. What keeps it honest:

- keep-alive: after ``ping_after_s`` without any frame it sends the text ``ping``; no ``pong``
  within ``pong_timeout_s`` means the connection is dead (OKX itself closes a connection that
  sees nothing for 30 s, with close code 4004);
- reconnects: capped exponential backoff with jitter after failures, and never more than
  ``connects_per_s`` (OKX: 3) new connections in any second; a ``notice`` 64008 (service
  upgrade ahead) triggers an immediate, proactive reconnect;
- no gaps: on a re-connection, as soon as an instrument's subscription is acknowledged, the
  trades after the last tradeId seen are fetched from REST ``history-trades`` and yielded
  (``origin="rest"``). Trades arriving twice (REST overlap, OKX re-sending the last trade after
  a subscribe) are removed downstream by the ingest's de-duplication;
- errors: error events are logged with their code; ``60018`` for an instrument means it does
  not exist, and the source carries on with the others (it fails only when none is left).

The OKX shapes stay in this package: the source yields ``Trade`` and ``DeadLetter`` only.
Cancelling the task that iterates :meth:`OkxTradeSource.batches` (Ctrl-C) closes the
connection and stops every helper task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from connectors.base import Batch
from connectors.okx.parse import FrameKind, WsFrame, now_ms, parse_ws_frame
from connectors.okx.ratelimit import SlidingWindowLimiter
from connectors.okx.rest import OkxRestClient, OkxRestError
from tcp.config import Settings
from tcp.schemas import Trade, is_inst_id

__all__ = ["MAX_REQUEST_BYTES", "OkxSourceError", "OkxStats", "OkxTradeSource", "subscribe_requests"]

log = logging.getLogger(__name__)

#: OKX: "All args of one request ≤ 64 KB".
MAX_REQUEST_BYTES = 64 * 1024
#: Code of the error event for a channel or instrument that does not exist.
NO_SUCH_CHANNEL = "60018"
#: An anchor (see ``_anchor``) is a trade at least this much older than the subscription ack:
#: clock skew between us and OKX can only make the anchor earlier, never later.
_ANCHOR_MARGIN_MS = 5_000
_BACKFILL_CHUNK = 1_000
_encoder = msgspec.json.Encoder()


class OkxSourceError(RuntimeError):
    """The source cannot go on (e.g. none of the instruments exists on OKX)."""


@dataclass
class OkxStats:
    """What the source did since it started; read it any time (it is updated in place)."""

    connections: int = 0  # WebSocket connections opened
    reconnects: int = 0  # connections opened after the first one
    connect_failures: int = 0  # attempts that did not get a connection
    trades: int = 0  # trades parsed from WebSocket pushes
    dead_letters: int = 0  # items and frames that could not be parsed (WebSocket and REST)
    ignored_frames: int = 0  # pushes of other channels, unknown events
    backfilled: int = 0  # trades fetched from REST after reconnects
    backfill_failures: int = 0  # backfills abandoned after REST retries (a gap is left)
    pings: int = 0
    pong_timeouts: int = 0
    notices: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error events by code


@dataclass
class _Connection:
    """Per-connection state: what to backfill, what was acknowledged, how it ended."""

    gap_from: dict[str, int]  # last tradeId seen per instrument when this connection started
    healthy: bool = False  # got at least one subscription ack
    proactive: bool = False  # ended on our initiative (notice): reconnect without backoff
    dead: bool = False  # no pong: abort it, a close handshake would go unanswered
    started_backfill: set[str] = field(default_factory=set)


def subscribe_requests(
    instruments: Iterable[str], *, channel: str = "trades", max_bytes: int = MAX_REQUEST_BYTES
) -> list[str]:
    """``subscribe`` requests (JSON text) covering the instruments, each shorter than ``max_bytes``.

    Requests carry ids ``sub1``, ``sub2``, ... (OKX echoes them in acks and errors).
    """

    def render(args: list[dict[str, str]], number: int) -> str:
        return _encoder.encode({"id": f"sub{number}", "op": "subscribe", "args": args}).decode()

    overhead = len(render([], 1)) + 12  # room for a longer id
    requests: list[str] = []
    batch: list[dict[str, str]] = []
    size = 0
    for inst_id in instruments:
        arg = {"channel": channel, "instId": inst_id}
        arg_size = len(_encoder.encode(arg)) + 1  # and a comma
        if batch and overhead + size + arg_size >= max_bytes:
            requests.append(render(batch, len(requests) + 1))
            batch, size = [], 0
        batch.append(arg)
        size += arg_size
    if batch:
        requests.append(render(batch, len(requests) + 1))
    return requests


def _backoff(failures: int, base_s: float, max_s: float) -> float:
    """Capped exponential backoff with jitter (half to all of the step)."""
    return min(max_s, base_s * 2**failures) * random.uniform(0.5, 1.0)


def _close_text(exc: ConnectionClosed) -> str:
    close = exc.rcvd
    if close is None:
        return "connection lost (no close frame)"
    return f"closed by OKX: code {close.code} {close.reason!r}"


class OkxTradeSource:
    """A :class:`connectors.base.TradeSource` of live OKX trades (see the module docstring)."""

    name = "okx"

    def __init__(
        self,
        *,
        ws_url: str,
        rest_url: str,
        instruments: Iterable[str],
        ping_after_s: float = 25.0,
        pong_timeout_s: float = 10.0,
        backoff_max_s: float = 30.0,
        backoff_base_s: float = 0.5,
        connects_per_s: int = 3,
        open_timeout_s: float = 10.0,
        anchor: bool = True,
        rest: OkxRestClient | None = None,
        queue_batches: int = 1_000,
    ) -> None:
        wanted = list(dict.fromkeys(instruments))
        bad = [inst_id for inst_id in wanted if not is_inst_id(inst_id)]
        if not wanted or bad:
            msg = f"need instrument ids like BTC-USDT; got {wanted!r}" + (
                f" (not ids: {bad!r})" if bad else ""
            )
            raise ValueError(msg)
        self.ws_url = ws_url
        self.instruments: tuple[str, ...] = tuple(wanted)
        self.unavailable: set[str] = set()
        self.ping_after_s = ping_after_s
        self.pong_timeout_s = pong_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.open_timeout_s = open_timeout_s
        self.anchor = anchor
        self.rest = rest or OkxRestClient(rest_url)
        self.stats = OkxStats()
        # The newest tradeId seen per instrument: from WebSocket pushes and finished backfills.
        self.last_trade_ids: dict[str, int] = {}
        # Where to backfill from for an instrument that had no trade yet (see _anchor).
        self._anchors: dict[str, int] = {}
        self._anchoring: set[str] = set()
        self._connect_limiter = SlidingWindowLimiter(connects_per_s, 1.05)
        self._queue_batches = queue_batches

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> OkxTradeSource:
        """The source configured by ``settings`` (``okx_*`` and ``instruments``); keywords override."""
        options: dict[str, Any] = {
            "ws_url": settings.okx_ws_url,
            "rest_url": settings.okx_rest_url,
            "instruments": settings.instruments,
            "ping_after_s": settings.okx_ping_after_s,
            "pong_timeout_s": settings.okx_pong_timeout_s,
            "backoff_max_s": settings.okx_backoff_max_s,
        }
        options.update(overrides)
        return cls(**options)

    async def batches(self) -> AsyncIterator[Batch]:
        """Batches of trades and dead letters, until the consuming task is cancelled."""
        queue: asyncio.Queue[Batch | BaseException] = asyncio.Queue(self._queue_batches)
        runner = asyncio.create_task(self._run(queue), name="okx-ws")
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    # --- connection loop -------------------------------------------------------------------------

    async def _run(self, queue: asyncio.Queue[Batch | BaseException]) -> None:
        """The connection loop plus its helper tasks; an unexpected error is handed to the consumer."""
        tasks: set[asyncio.Task[None]] = set()
        try:
            await self._connect_forever(queue, tasks)
        except Exception as exc:
            await queue.put(exc)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _connect_forever(
        self, queue: asyncio.Queue[Batch | BaseException], tasks: set[asyncio.Task[None]]
    ) -> None:
        failures = 0
        while True:
            await self._connect_limiter.acquire()
            state = _Connection(gap_from=self._gap_starts())
            try:
                ws = await connect(
                    self.ws_url,
                    ping_interval=None,  # OKX wants its own text ping, sent by _session
                    open_timeout=self.open_timeout_s,
                    close_timeout=1.0,
                    max_size=2**23,
                )
            except (OSError, WebSocketException) as exc:  # refused, DNS, TLS, timeout, HTTP status
                self.stats.connect_failures += 1
                reason = f"cannot connect: {exc!r}"
            else:
                self.stats.connections += 1
                if self.stats.connections > 1:
                    self.stats.reconnects += 1
                log.info("connected to %s (connection %d)", self.ws_url, self.stats.connections)
                try:
                    reason = await self._session(ws, state, queue, tasks)
                except ConnectionClosed as exc:
                    reason = _close_text(exc)
                finally:
                    await self._release(ws, state, tasks)
            if state.healthy:
                failures = 0
            if state.proactive:
                delay = 0.0
            else:
                delay = _backoff(failures, self.backoff_base_s, self.backoff_max_s)
                failures += 1
            log.warning("OKX WebSocket: %s; reconnecting in %.2f s", reason, delay)
            await asyncio.sleep(delay)

    async def _release(
        self, ws: ClientConnection, state: _Connection, tasks: set[asyncio.Task[None]]
    ) -> None:
        """Let go of a connection without delaying the next one more than needed.

        A dead one (no pong) is aborted: a close handshake would only wait for its timeout. After
        a notice the old connection still works, so it closes gracefully in the background while
        the new one opens. Otherwise (dropped, or we are being cancelled) it is closed here.
        """
        if state.dead:
            ws.transport.abort()
        elif state.proactive:
            self._spawn(ws.close(), tasks)
        else:
            await ws.close()

    def _gap_starts(self) -> dict[str, int]:
        """Per instrument, the tradeId after which a new connection must backfill."""
        starts = {inst_id: self._anchors[inst_id] for inst_id in self.instruments if inst_id in self._anchors}
        starts.update(
            (inst_id, self.last_trade_ids[inst_id])
            for inst_id in self.instruments
            if inst_id in self.last_trade_ids
        )
        return starts

    async def _session(
        self,
        ws: ClientConnection,
        state: _Connection,
        queue: asyncio.Queue[Batch | BaseException],
        tasks: set[asyncio.Task[None]],
    ) -> str:
        """Subscribe and read until the connection must be replaced; returns why."""
        for request in subscribe_requests(self.instruments):
            await ws.send(request)
        loop = asyncio.get_running_loop()
        last_rx = loop.time()
        pong_due: float | None = None
        while True:
            now = loop.time()
            if pong_due is None and now - last_rx >= self.ping_after_s:
                await ws.send("ping")
                self.stats.pings += 1
                pong_due = now + self.pong_timeout_s
            if pong_due is not None and now >= pong_due:
                self.stats.pong_timeouts += 1
                state.dead = True
                return f"no pong within {self.pong_timeout_s:g} s of a ping: connection presumed dead"
            try:
                async with asyncio.timeout_at(
                    pong_due if pong_due is not None else last_rx + self.ping_after_s
                ):
                    raw = await ws.recv(decode=False)
            except TimeoutError:
                continue
            last_rx = loop.time()
            frame = parse_ws_frame(raw)
            if frame.kind is FrameKind.PONG:
                pong_due = None
                continue
            end = await self._handle(frame, state, queue, tasks)
            if end:
                return end

    # --- frames ----------------------------------------------------------------------------------

    async def _handle(
        self,
        frame: WsFrame,
        state: _Connection,
        queue: asyncio.Queue[Batch | BaseException],
        tasks: set[asyncio.Task[None]],
    ) -> str:
        """Act on one frame; a non-empty result ends the connection (with that reason)."""
        kind = frame.kind
        if kind is FrameKind.TRADES:
            self._count_trades(frame)
            if frame.items:
                await queue.put(frame.items)
        elif kind is FrameKind.INVALID:
            self.stats.dead_letters += len(frame.items)
            await queue.put(frame.items)
        elif kind is FrameKind.SUBSCRIBED:
            state.healthy = True
            log.debug("subscribed %s %s (connId %s)", frame.channel, frame.inst_id, frame.conn_id,
                      extra={"inst_id": frame.inst_id})  # fmt: skip
            self._after_ack(frame.inst_id, state, queue, tasks)
        elif kind is FrameKind.ERROR:
            self._on_error(frame)
        elif kind is FrameKind.NOTICE:
            self.stats.notices += 1
            state.proactive = True
            return f"notice {frame.code} ({frame.msg}): reconnecting before OKX closes the connection"
        elif kind is FrameKind.IGNORED:
            self.stats.ignored_frames += 1
        return ""

    def _count_trades(self, frame: WsFrame) -> None:
        last = self.last_trade_ids
        for item in frame.items:
            if type(item) is Trade:
                self.stats.trades += 1
                if item.trade_id > last.get(item.inst_id, -1):
                    last[item.inst_id] = item.trade_id
            else:
                self.stats.dead_letters += 1

    def _on_error(self, frame: WsFrame) -> None:
        code = frame.code or "?"
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        inst_id = frame.error_inst_id
        if code == NO_SUCH_CHANNEL and inst_id in self.instruments:
            self.instruments = tuple(i for i in self.instruments if i != inst_id)
            self.unavailable.add(inst_id)
            log.error(
                "OKX error %s: instrument %s does not exist (%s); going on with %d others",
                code,
                inst_id,
                frame.msg,
                len(self.instruments),
            )
            if not self.instruments:
                msg = f"none of the instruments exists on OKX: {sorted(self.unavailable)}"
                raise OkxSourceError(msg)
            return
        log.error("OKX error event %s: %s (request %s)", code, frame.msg, frame.req_id or "-")

    def _after_ack(
        self,
        inst_id: str,
        state: _Connection,
        queue: asyncio.Queue[Batch | BaseException],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        """Once a subscription is live, fill the gap since the last connection (or set an anchor)."""
        if inst_id not in self.instruments or inst_id in state.started_backfill:
            return
        if inst_id in state.gap_from:
            state.started_backfill.add(inst_id)
            self._spawn(self._backfill(inst_id, state.gap_from[inst_id], queue), tasks)
        elif self.anchor and inst_id not in self.last_trade_ids and inst_id not in self._anchoring:
            self._anchoring.add(inst_id)
            self._spawn(self._anchor(inst_id, now_ms()), tasks)

    @staticmethod
    def _spawn(coro: Coroutine[Any, Any, None], tasks: set[asyncio.Task[None]]) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # --- REST ------------------------------------------------------------------------------------

    async def _backfill(
        self, inst_id: str, after_id: int, queue: asyncio.Queue[Batch | BaseException]
    ) -> None:
        """Fetch and yield the trades of ``inst_id`` after ``after_id`` (missed while disconnected)."""
        try:
            trades = await self.rest.backfill(inst_id, after_id)
        except OkxRestError as exc:
            self.stats.backfill_failures += 1
            log.error(
                "backfill of %s after trade %d failed, trades may be missing: %s",
                inst_id,
                after_id,
                exc,
                extra={"inst_id": inst_id},
            )
            return
        dead = self.rest.take_dead_letters()
        if trades and trades[-1].trade_id > self.last_trade_ids.get(inst_id, -1):
            # Everything up to here is in hand: a later reconnect need not fetch it again.
            self.last_trade_ids[inst_id] = trades[-1].trade_id
        self.stats.backfilled += len(trades)
        self.stats.dead_letters += len(dead)
        log.info("backfilled %d trades of %s after trade %d", len(trades), inst_id, after_id,
                 extra={"inst_id": inst_id})  # fmt: skip
        for start in range(0, len(trades), _BACKFILL_CHUNK):
            await queue.put(list(trades[start : start + _BACKFILL_CHUNK]))
        if dead:
            await queue.put(list(dead))

    async def _anchor(self, inst_id: str, acked_at_ms: int) -> None:
        """Remember a tradeId from before the first subscription of a not-yet-traded instrument.

        Without it, a quiet instrument that has no trade before the first disconnect would have
        nothing to backfill from, and its trades during the outage would be lost. The anchor is
        the newest trade at least ``_ANCHOR_MARGIN_MS`` older than the ack: older than anything
        the WebSocket can have missed. It only matters until the first trade is seen.
        """
        try:
            page = await self.rest.history_trades(inst_id)
        except OkxRestError as exc:
            log.warning("could not read the latest trades of %s (no backfill anchor): %s", inst_id, exc,
                        extra={"inst_id": inst_id})  # fmt: skip
            return
        finally:
            self._anchoring.discard(inst_id)
        # None older (a busy instrument): no anchor, its WebSocket trades will set one soon.
        older = [t.trade_id for t in page if t.ts <= acked_at_ms - _ANCHOR_MARGIN_MS]
        if older:
            self._anchors[inst_id] = max(older)
