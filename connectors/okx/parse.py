"""OKX v5 wire formats -> ``Trade`` / ``DeadLetter``: WebSocket frames and REST trade pages.

Nothing here does I/O; every function is total: whatever bytes come in, the result is trades,
dead letters or a classified control frame, never an exception.

How a WebSocket frame is classified (:func:`parse_ws_frame` -> :class:`WsFrame`):

- text ``pong`` (the answer to our text ``ping``): ``PONG``;
- ``{"arg":{"channel":"trades"|"trades-all",..},"data":[..]}``: ``TRADES``, with one Trade or
  one DeadLetter per ``data`` item, in order;
- ``{"event":"subscribe"|"unsubscribe","arg":{..}}``: ``SUBSCRIBED`` / ``UNSUBSCRIBED``;
- ``{"event":"error","code":..,"msg":..}``: ``ERROR``; ``{"event":"notice","code":"64008"}``:
  ``NOTICE``;
- a push of another channel (tickers, books, candles, ...) or another event (login,
  channel-conn-count, ...): ``IGNORED``, no items;
- invalid JSON, not an object, an unknown shape, a trades push without a usable ``arg`` or
  ``data``: ``INVALID``, with one DeadLetter for the whole frame.

Pushes of other channels are not trade data, but they are not garbage either: they are
skipped, and the caller counts them (a subscription we did not ask for shows up in that count).
Garbage is kept as a dead letter, with the reason, so it can be inspected and replayed.

Trade pushes take a fast path: a typed msgspec decoder checks the frame's shape in C, then a
few string checks (digits, bounds, ``Trade``'s own validation) turn the items into trades. Only when that fails does the slow path decode the
frame generically and check each item on its own, so one bad item costs one dead letter and its
valid neighbours still get through. Reasons name the field and the problem, e.g.
``px: '-1' is not a positive decimal``.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import msgspec

from tcp.schemas import (
    MAX_BIGINT,
    MAX_COUNT,
    MAX_SOURCE,
    MAX_TS_MS,
    MIN_TS_MS,
    DeadLetter,
    Origin,
    Side,
    Trade,
    is_inst_id,
    is_positive_decimal,
    trade_problem,
)

__all__ = [
    "TRADE_CHANNELS",
    "FrameKind",
    "RestError",
    "RestTrades",
    "WsFrame",
    "now_ms",
    "parse_rest_trades",
    "parse_ws_frame",
    "trade_from_item",
]

#: Channels whose pushes carry trades in the shape this module parses.
TRADE_CHANNELS = frozenset({"trades", "trades-all"})

#: ``where`` of dead letters made here.
WHERE_WS = "okx.ws"
WHERE_REST = "okx.rest"

#: RestError.code for a body that is not an OKX envelope at all (HTML from a proxy, garbage).
BAD_RESPONSE = "bad-response"
#: OKX's "Too Many Requests" code (sent with HTTP 200 or 429).
RATE_LIMITED = "50011"

_REQUIRED_FIELDS = ("instId", "tradeId", "px", "sz", "side", "ts")
_MAX_ID_DIGITS = 18  # keeps ids inside int64, which every consumer can store
_ERROR_INST_ID = re.compile(r"instId:([A-Za-z0-9_-]+)")


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds (UTC), the unit of every timestamp we store."""
    return time.time_ns() // 1_000_000


# --- fast path: typed wire structs decoded in C, then the few checks msgspec cannot express --------


class _WireTrade(msgspec.Struct, rename="camel"):
    """One item of a ``trades`` push or of a REST trades page, exactly as OKX writes it."""

    inst_id: str
    trade_id: str
    px: str
    sz: str
    side: Side
    ts: str
    count: str = "1"
    source: str = "0"
    seq_id: int | None = None


class _WireArg(msgspec.Struct, rename="camel"):
    channel: Literal["trades", "trades-all"]
    inst_id: str


class _WirePush(msgspec.Struct):
    arg: _WireArg
    data: list[_WireTrade]


class _WireRestPage(msgspec.Struct):
    code: Literal["0"]
    data: list[_WireTrade]
    msg: str = ""


_push_decoder = msgspec.json.Decoder(_WirePush)
_rest_decoder = msgspec.json.Decoder(_WireRestPage)
_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def _digits(text: str) -> int | None:
    """The value of a string of ASCII digits (at most 18: ids stay in int64), else None.

    ``int()`` alone would also take " 12", "1_000" and non-ASCII digits.
    """
    if 0 < len(text) <= _MAX_ID_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return None


def _from_wire(wire: _WireTrade, origin: Origin, received_at: int) -> Trade | None:
    """The Trade for a decoded item, or None when any rule is broken (the slow path says which)."""
    trade_id, ts, count, source = (
        _digits(wire.trade_id),
        _digits(wire.ts),
        _digits(wire.count),
        _digits(wire.source),
    )
    if trade_id is None or ts is None or count is None or source is None:
        return None
    if not MIN_TS_MS <= ts < MAX_TS_MS or not 1 <= count <= MAX_COUNT or source > MAX_SOURCE:
        return None
    if wire.seq_id is not None and not -MAX_BIGINT - 1 <= wire.seq_id <= MAX_BIGINT:
        return None
    trade = Trade(
        inst_id=wire.inst_id,
        trade_id=trade_id,
        px=wire.px,
        sz=wire.sz,
        side=wire.side,
        ts=ts,
        origin=origin,
        received_at=received_at,
        count=count,
        source=source,
        seq_id=wire.seq_id,
    )
    return trade if trade_problem(trade) is None else None


def _fast_items(
    wires: list[_WireTrade], expect_inst_id: str | None, origin: Origin, at: int
) -> list[Trade] | None:
    """All items as trades, or None as soon as one needs the slow path."""
    trades: list[Trade] = []
    for wire in wires:
        if expect_inst_id is not None and wire.inst_id != expect_inst_id:
            return None
        trade = _from_wire(wire, origin, at)
        if trade is None:
            return None
        trades.append(trade)
    return trades


# --- slow path: field-by-field checks with precise reasons ---------------------------------------


def _show(value: Any) -> str:
    """A short, unambiguous rendering of a bad value for a reason text."""
    text = repr(value) if isinstance(value, str) else _encoder.encode(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def _described(value: Any) -> str:
    """A value with its JSON type, for "expected X, got ..." reasons: "number 2531.48", "null"."""
    kind = _json_type(value)
    return kind if value is None else f"{kind} {_show(value)}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _check_str(
    name: str, value: Any, valid: Callable[[str], bool], expected: str
) -> tuple[str | None, str | None]:
    """(value, None) when ``value`` is a string accepted by ``valid``, else (None, reason)."""
    if not isinstance(value, str):
        return None, f"{name}: expected {expected} string, got {_described(value)}"
    if not valid(value):
        return None, f"{name}: {_show(value)} is not {expected}"
    return value, None


def _check_int(name: str, value: Any, *, minimum: int, what: str) -> tuple[int | None, str | None]:
    """An integer written as digits (OKX) or as a JSON integer, at least ``minimum``."""
    number: int | None = None
    if isinstance(value, str):
        number = _digits(value)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**_MAX_ID_DIGITS:
        number = value
    if number is None or number < minimum:
        return None, f"{name}: {_show(value)} is not {what}"
    return number, None


def _check_ts(value: Any) -> tuple[int | None, str | None]:
    number, reason = _check_int("ts", value, minimum=0, what="an integer (epoch ms)")
    if number is None:
        return None, reason
    if not MIN_TS_MS <= number < MAX_TS_MS:
        return None, f"ts: {number} is outside 2010-01-01..2100-01-01 in epoch ms (wrong unit?)"
    return number, None


def _check_seq_id(value: Any) -> tuple[int | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, str) and value.lstrip("-").isdigit() and value.isascii():
        return int(value), None
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    return None, f"seqId: {_show(value)} is not an integer"


def trade_from_item(
    item: Any,
    *,
    expect_inst_id: str | None,
    origin: Origin,
    received_at: int,
) -> Trade | str:
    """Validate one trade object field by field: the Trade, or every problem found, joined by ``; ``.

    ``expect_inst_id`` is the instrument the push (``arg.instId``) or the request was for; an
    item of another instrument is refused rather than filed under the wrong key.
    """
    if not isinstance(item, Mapping):
        return f"trade: expected an object, got {_described(item)}"
    problems = [f"{name}: missing" for name in _REQUIRED_FIELDS if name not in item]

    def keep(checked: tuple[Any, str | None]) -> Any:
        value, reason = checked
        if reason:
            problems.append(reason)
        return value

    inst_id = (
        keep(_check_str("instId", item.get("instId"), is_inst_id, "an instrument id"))
        if "instId" in item
        else None
    )
    if inst_id is not None and expect_inst_id is not None and inst_id != expect_inst_id:
        problems.append(f"instId: {inst_id!r} does not match the channel's instId {expect_inst_id!r}")
    trade_id = (
        keep(_check_int("tradeId", item.get("tradeId"), minimum=0, what="a non-negative integer"))
        if "tradeId" in item
        else None
    )
    px = (
        keep(_check_str("px", item.get("px"), is_positive_decimal, "a positive decimal"))
        if "px" in item
        else None
    )
    sz = (
        keep(_check_str("sz", item.get("sz"), is_positive_decimal, "a positive decimal"))
        if "sz" in item
        else None
    )
    side = item.get("side")
    if "side" in item and side not in ("buy", "sell"):
        problems.append(f"side: {_show(side)} is not 'buy' or 'sell'")
    ts = keep(_check_ts(item.get("ts"))) if "ts" in item else None
    count = keep(_check_int("count", item.get("count", 1), minimum=1, what="a positive integer"))
    source = keep(_check_int("source", item.get("source", 0), minimum=0, what="a non-negative integer"))
    seq_id = keep(_check_seq_id(item.get("seqId")))
    if problems:
        return "; ".join(problems)
    try:
        # Every field was checked above; converting through the schema keeps the two in step
        # (and also checks the bounds that constructing a Trade directly would not).
        return msgspec.convert(
            {
                "inst_id": inst_id,
                "trade_id": trade_id,
                "px": px,
                "sz": sz,
                "side": side,
                "ts": ts,
                "origin": origin,
                "received_at": received_at,
                "count": count,
                "source": source,
                "seq_id": seq_id,
            },
            Trade,
        )
    except msgspec.ValidationError as exc:
        return f"trade: {exc}"


def _items_slow(
    data: list[Any], *, expect_inst_id: str | None, origin: Origin, where: str, at: int
) -> list[Trade | DeadLetter]:
    """One Trade or one DeadLetter (raw = that item's JSON) per item, in order."""
    out: list[Trade | DeadLetter] = []
    for item in data:
        result = trade_from_item(item, expect_inst_id=expect_inst_id, origin=origin, received_at=at)
        if isinstance(result, Trade):
            out.append(result)
        else:
            out.append(DeadLetter(reason=result, where=where, at=at, raw=_encoder.encode(item).decode()))
    return out


# --- WebSocket frames -----------------------------------------------------------------------------


class FrameKind(enum.StrEnum):
    """What a WebSocket frame is, for the connection loop to act on."""

    TRADES = "trades"
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"
    ERROR = "error"
    NOTICE = "notice"
    PONG = "pong"
    IGNORED = "ignored"
    INVALID = "invalid"


class WsFrame(msgspec.Struct, frozen=True):
    """One parsed frame: its kind, its trades/dead letters and the fields of a control frame.

    ``code`` is always a string (OKX sends strings, but a number is accepted and converted).
    A msgspec struct rather than a dataclass: one is built per frame, and this is 8x cheaper.
    """

    kind: FrameKind
    items: list[Trade | DeadLetter] = []
    channel: str = ""
    inst_id: str = ""
    code: str = ""
    msg: str = ""
    conn_id: str = ""
    req_id: str = ""

    @property
    def error_inst_id(self) -> str | None:
        """The instrument an error is about: its ``arg.instId``, else the ``instId:X`` in ``msg``.

        OKX's 60018 error carries no ``arg``; its message reads
        ``Wrong URL or channel:trades,instId:FOO-USDT doesn't exist. ...``.
        """
        if self.inst_id:
            return self.inst_id
        match = _ERROR_INST_ID.search(self.msg)
        return match.group(1) if match else None


_PONG = WsFrame(FrameKind.PONG)
_EVENT_KINDS = {
    "subscribe": FrameKind.SUBSCRIBED,
    "unsubscribe": FrameKind.UNSUBSCRIBED,
    "error": FrameKind.ERROR,
    "notice": FrameKind.NOTICE,
}


def _text(value: Any) -> str:
    """A control-frame field as text: strings as they are, numbers written out, else empty."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


class _Stamp(NamedTuple):
    """What the slow path stamps on its output: trade origin, dead-letter ``where``, time (ms)."""

    origin: Origin
    where: str
    at: int


def _invalid(raw: bytes | str, reason: str, stamp: _Stamp) -> WsFrame:
    dead = DeadLetter.of(raw, reason=reason, where=stamp.where, at=stamp.at)
    return WsFrame(FrameKind.INVALID, [dead])


def _event_frame(obj: Mapping[str, Any]) -> WsFrame:
    event = obj["event"]
    kind = _EVENT_KINDS.get(event, FrameKind.IGNORED) if isinstance(event, str) else FrameKind.IGNORED
    arg = obj.get("arg")
    arg = arg if isinstance(arg, Mapping) else {}
    return WsFrame(
        kind,
        channel=_text(arg.get("channel")) or _text(obj.get("channel")),
        inst_id=_text(arg.get("instId")),
        code=_text(obj.get("code")),
        msg=_text(obj.get("msg")),
        conn_id=_text(obj.get("connId")),
        req_id=_text(obj.get("id")),
    )


def _push_frame(raw: bytes | str, obj: Mapping[str, Any], stamp: _Stamp) -> WsFrame:
    arg = obj["arg"]
    if not isinstance(arg, Mapping):
        return _invalid(raw, f"arg: expected an object, got {_json_type(arg)}", stamp)
    channel = _text(arg.get("channel"))
    if channel not in TRADE_CHANNELS:
        return WsFrame(FrameKind.IGNORED, channel=channel, inst_id=_text(arg.get("instId")))
    inst_id = arg.get("instId")
    if not isinstance(inst_id, str) or not inst_id:
        return _invalid(raw, f"arg.instId: missing in a {channel} push", stamp)
    data = obj.get("data")
    if not isinstance(data, list):
        return _invalid(raw, f"data: expected an array of trades, got {_json_type(data)}", stamp)
    items = _items_slow(data, expect_inst_id=inst_id, origin=stamp.origin, where=stamp.where, at=stamp.at)
    return WsFrame(FrameKind.TRADES, items, channel=channel, inst_id=inst_id)


def parse_ws_frame(
    raw: bytes | str,
    *,
    received_at: int | None = None,
    origin: Origin = "ws",
    where: str = WHERE_WS,
) -> WsFrame:
    """Parse one WebSocket message from OKX's public endpoint (see the module docstring).

    ``received_at`` (epoch ms, default now) is stamped on the trades and on dead letters.
    ``origin`` and ``where`` default to a live connection; a replay of recorded frames passes
    its own (``"replay"``, ``"replay:FILE:LINE"``).
    """
    if raw in (b"pong", "pong"):
        return _PONG
    at = now_ms() if received_at is None else received_at
    try:
        push = _push_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeError):
        pass
    else:
        trades = _fast_items(push.data, push.arg.inst_id, origin, at)
        if trades is not None:
            return WsFrame(
                FrameKind.TRADES,
                list[Trade | DeadLetter](trades),
                channel=push.arg.channel,
                inst_id=push.arg.inst_id,
            )
    return _parse_ws_slow(raw, _Stamp(origin, where, at))


def _parse_ws_slow(raw: bytes | str, stamp: _Stamp) -> WsFrame:
    try:
        obj = _any_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeError) as exc:
        return _invalid(raw, f"invalid JSON: {exc}", stamp)
    if not isinstance(obj, dict):
        return _invalid(raw, f"frame: expected a JSON object, got {_json_type(obj)}", stamp)
    if "event" in obj:
        return _event_frame(obj)
    if "arg" in obj:
        return _push_frame(raw, obj, stamp)
    keys = ", ".join(sorted(obj)[:8]) or "none"
    return _invalid(raw, f"frame: unknown shape (no 'event' or 'arg'; keys: {keys})", stamp)


# --- REST --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RestTrades:
    """A successful trades page, in OKX's order (newest first), with the items that failed."""

    trades: list[Trade]
    dead_letters: list[DeadLetter] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RestError:
    """OKX answered with an error envelope (or with something that is not an envelope).

    ``code`` is a string even when OKX sends a number (an unknown path answers ``"code":404``);
    :data:`BAD_RESPONSE` when the body is not OKX JSON at all.
    """

    code: str
    msg: str

    @property
    def rate_limited(self) -> bool:
        return self.code == RATE_LIMITED


def parse_rest_trades(
    body: bytes | str, *, inst_id: str | None = None, received_at: int | None = None
) -> RestTrades | RestError:
    """Parse a ``/market/trades`` or ``/market/history-trades`` response body.

    ``{"code":"0","data":[...]}`` gives the trades (origin ``rest``); an item that does not
    validate, or is of another instrument than ``inst_id``, becomes a dead letter. Any other
    ``code`` gives a :class:`RestError`.
    """
    at = now_ms() if received_at is None else received_at
    try:
        page = _rest_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeError):
        pass
    else:
        trades = _fast_items(page.data, inst_id, "rest", at)
        if trades is not None:
            return RestTrades(trades)
    return _parse_rest_slow(body, inst_id, at)


def _parse_rest_slow(body: bytes | str, inst_id: str | None, at: int) -> RestTrades | RestError:
    try:
        obj = _any_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeError) as exc:
        return RestError(BAD_RESPONSE, f"invalid JSON: {exc}")
    if not isinstance(obj, dict) or "code" not in obj:
        return RestError(BAD_RESPONSE, f"expected an OKX envelope with 'code', got {_show(obj)}")
    code = _text(obj["code"])
    if code != "0":
        return RestError(code or BAD_RESPONSE, _text(obj.get("msg")) or _show(obj))
    data = obj.get("data")
    if not isinstance(data, list):
        return RestError(BAD_RESPONSE, f"data: expected an array of trades, got {_json_type(data)}")
    trades: list[Trade] = []
    dead: list[DeadLetter] = []
    for item in _items_slow(data, expect_inst_id=inst_id, origin="rest", where=WHERE_REST, at=at):
        if isinstance(item, Trade):
            trades.append(item)
        else:
            dead.append(item)
    return RestTrades(trades, dead)
