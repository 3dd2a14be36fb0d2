"""connectors.okx.parse: OKX v5 frames and REST bodies -> trades, dead letters, control frames.

The fixtures are written here in the shapes of captured OKX traffic: 2022 trade pushes
(instId, tradeId, px, sz, side, ts only), current pushes (plus count, source, seqId), acks with
and without ``connId``/``id``, error and notice events, and pushes of other channels.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.okx.parse import (
    BAD_RESPONSE,
    FrameKind,
    RestError,
    RestTrades,
    WsFrame,
    parse_rest_trades,
    parse_ws_frame,
    trade_from_item,
)
from tcp.schemas import DeadLetter, Trade, decode_dead_letter, decode_trade, encode

NOW = 1_747_087_200_000  # received_at stamped by the tests


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def push(inst_id: str, *items: Any, channel: str = "trades") -> bytes:
    return dumps({"arg": {"channel": channel, "instId": inst_id}, "data": list(items)})


def item_2022(**over: Any) -> dict[str, Any]:
    """A trade item as OKX sent it in 2022: six fields, all strings."""
    base = {
        "instId": "BTC-USDT",
        "tradeId": "338412907",
        "px": "30187.4",
        "sz": "0.00391",
        "side": "sell",
        "ts": "1652459301117",
    }
    return {**base, **over}


def item_now(**over: Any) -> dict[str, Any]:
    """A trade item as OKX sends it now: with count, source and an integer seqId."""
    base = {
        "instId": "ETH-USDT",
        "tradeId": "1689502111",
        "px": "2531.48",
        "sz": "0.052",
        "side": "buy",
        "ts": "1747087161666",
        "count": "3",
        "source": "0",
        "seqId": 40817326,
    }
    return {**base, **over}


def parse(raw: bytes | str) -> WsFrame:
    return parse_ws_frame(raw, received_at=NOW)


def only_dead_letter(frame: WsFrame) -> DeadLetter:
    assert len(frame.items) == 1, frame
    item = frame.items[0]
    assert isinstance(item, DeadLetter), item
    return item


# --- trade pushes ------------------------------------------------------------------------------


def test_2022_push_without_count_source_seq_id() -> None:
    frame = parse(push("BTC-USDT", item_2022()))
    assert frame.kind is FrameKind.TRADES and frame.inst_id == "BTC-USDT" and frame.channel == "trades"
    assert frame.items == [
        Trade(
            inst_id="BTC-USDT",
            trade_id=338412907,
            px="30187.4",
            sz="0.00391",
            side="sell",
            ts=1652459301117,
            origin="ws",
            received_at=NOW,
        )
    ]
    trade = frame.items[0]
    assert isinstance(trade, Trade) and trade.count == 1 and trade.source == 0 and trade.seq_id is None


def test_current_push_with_count_source_seq_id_and_several_items() -> None:
    items = [
        item_now(),
        item_now(tradeId="1689502112", count="1", source="1", seqId=40817326, side="sell"),
    ]
    frame = parse(push("ETH-USDT", *items))
    assert frame.kind is FrameKind.TRADES
    trades = frame.items
    assert [type(t) for t in trades] == [Trade, Trade]
    first, second = trades
    assert isinstance(first, Trade) and isinstance(second, Trade)
    assert (first.trade_id, first.count, first.source, first.seq_id) == (1689502111, 3, 0, 40817326)
    assert (second.trade_id, second.count, second.source, second.side) == (1689502112, 1, 1, "sell")
    assert first.px == "2531.48" and first.sz == "0.052"  # exact strings, never floats
    assert first.origin == "ws" and first.received_at == NOW
    assert decode_trade(encode(first)) == first


def test_str_and_bytes_frames_parse_alike() -> None:
    raw = push("BTC-USDT", item_2022())
    assert parse(raw) == parse(raw.decode())


def test_replayed_frames_carry_the_replay_origin_and_place() -> None:
    good = parse_ws_frame(
        push("BTC-USDT", item_2022()), received_at=NOW, origin="replay", where="replay:f.jsonl:7"
    )
    bad = parse_ws_frame(
        push("BTC-USDT", item_2022(px="0")), received_at=NOW, origin="replay", where="replay:f.jsonl:8"
    )
    assert isinstance(good.items[0], Trade) and good.items[0].origin == "replay"
    assert isinstance(bad.items[0], DeadLetter) and bad.items[0].where == "replay:f.jsonl:8"
    garbage = parse_ws_frame(b"{", origin="replay", where="replay:f.jsonl:9")
    assert isinstance(garbage.items[0], DeadLetter) and garbage.items[0].where == "replay:f.jsonl:9"


def test_trades_all_push_is_trade_data() -> None:
    frame = parse(push("BTC-USDT", item_2022(), channel="trades-all"))
    assert frame.kind is FrameKind.TRADES and frame.channel == "trades-all"
    assert isinstance(frame.items[0], Trade)


def test_empty_data_is_a_trades_frame_without_items() -> None:
    frame = parse(push("BTC-USDT"))
    assert frame.kind is FrameKind.TRADES and frame.items == []


def test_unknown_extra_fields_are_ignored() -> None:
    frame = parse(push("ETH-USDT", item_now(instFamily="ETH-USDT", newField={"x": 1})))
    assert isinstance(frame.items[0], Trade)


# --- control frames ----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"pong", "pong"])
def test_pong(raw: bytes | str) -> None:
    assert parse(raw).kind is FrameKind.PONG


def test_ack_2022_without_conn_id() -> None:
    frame = parse(dumps({"event": "subscribe", "arg": {"channel": "trades", "instId": "UNI-USD-SWAP"}}))
    assert frame == WsFrame(FrameKind.SUBSCRIBED, channel="trades", inst_id="UNI-USD-SWAP")


def test_ack_with_id_and_conn_id() -> None:
    raw = dumps(
        {
            "id": "sub1",
            "event": "subscribe",
            "arg": {"channel": "trades", "instId": "BTC-USDT"},
            "connId": "9f1c02ab",
        }
    )
    frame = parse(raw)
    assert frame.kind is FrameKind.SUBSCRIBED
    assert (frame.inst_id, frame.conn_id, frame.req_id) == ("BTC-USDT", "9f1c02ab", "sub1")


def test_unsubscribe_ack() -> None:
    frame = parse(dumps({"event": "unsubscribe", "arg": {"channel": "trades", "instId": "BTC-USDT"}}))
    assert frame.kind is FrameKind.UNSUBSCRIBED


def test_error_60018_names_the_instrument() -> None:
    msg = (
        "Wrong URL or channel:trades,instId:NOPE-USDT doesn't exist. "
        "Please use the correct URL, channel and parameters referring to API document."
    )
    frame = parse(dumps({"id": "sub2", "event": "error", "code": "60018", "msg": msg, "connId": "77aa01cd"}))
    assert frame.kind is FrameKind.ERROR and frame.code == "60018" and frame.req_id == "sub2"
    assert frame.error_inst_id == "NOPE-USDT"
    assert frame.items == []


def test_error_60018_older_message_format() -> None:
    frame = parse(
        dumps({"event": "error", "msg": "channel:trades,instId:DOGE-EUR doesn't exist", "code": "60018"})
    )
    assert frame.kind is FrameKind.ERROR and frame.error_inst_id == "DOGE-EUR"


def test_error_60012_and_numeric_code() -> None:
    frame = parse(dumps({"event": "error", "code": "60012", "msg": 'Invalid request: {"op":1}'}))
    assert (frame.kind, frame.code, frame.error_inst_id) == (FrameKind.ERROR, "60012", None)
    assert parse(dumps({"event": "error", "code": 60014, "msg": "Requests too frequent"})).code == "60014"


def test_notice_64008() -> None:
    raw = dumps(
        {
            "event": "notice",
            "code": "64008",
            "msg": "The connection will soon be closed for a service upgrade. Please reconnect.",
            "connId": "a4d3ae55",
        }
    )
    frame = parse(raw)
    assert (frame.kind, frame.code, frame.conn_id) == (FrameKind.NOTICE, "64008", "a4d3ae55")


@pytest.mark.parametrize(
    "raw",
    [
        # tickers push
        dumps(
            {
                "arg": {"channel": "tickers", "instId": "BTC-USDT"},
                "data": [
                    {
                        "instType": "SPOT",
                        "instId": "BTC-USDT",
                        "last": "30101.2",
                        "lastSz": "0.01",
                        "ts": "1652459300000",
                    }
                ],
            }
        ),
        # books snapshot
        dumps(
            {
                "arg": {"channel": "books", "instId": "BTC-USDT"},
                "action": "snapshot",
                "data": [
                    {
                        "asks": [["30102.1", "0.5", "0", "2"]],
                        "bids": [["30101.9", "1.2", "0", "3"]],
                        "ts": "1652459300001",
                        "checksum": -1280322374,
                    }
                ],
            }
        ),
        # candle push (a business-endpoint channel)
        dumps(
            {
                "arg": {"channel": "candle1m", "instId": "BTC-USDT"},
                "data": [["1652459280000", "1", "2", "0.5", "1.5", "10", "10", "15", "0"]],
            }
        ),
        # other events
        dumps({"event": "channel-conn-count", "channel": "trades", "connCount": "2", "connId": "a4d3ae55"}),
        dumps({"event": "login", "code": "0", "msg": ""}),
    ],
)
def test_other_channels_and_events_are_ignored_not_dead_letters(raw: bytes) -> None:
    frame = parse(raw)
    assert frame.kind is FrameKind.IGNORED and frame.items == []


# --- malformed input: one dead letter each, with a precise reason ----------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"arg":{"channel":"trades","instId":"BTC-USDT"},"data":[', "invalid JSON"),
        (b"\xff\xfe\x00garbage", "invalid JSON"),
        (b"", "invalid JSON"),
        (b"ping", "invalid JSON"),
        (b"[1,2,3]", "frame: expected a JSON object, got array"),
        (b'"pong"', "frame: expected a JSON object, got string"),
        (b'{"op":"subscribe"}', "frame: unknown shape (no 'event' or 'arg'; keys: op)"),
        (dumps({"arg": "trades", "data": []}), "arg: expected an object, got string"),
        (
            dumps({"arg": {"channel": "trades"}, "data": [item_2022()]}),
            "arg.instId: missing in a trades push",
        ),
        (
            dumps({"arg": {"channel": "trades", "instId": "BTC-USDT"}}),
            "data: expected an array of trades, got null",
        ),
        (
            dumps({"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": {"tradeId": "1"}}),
            "data: expected an array of trades, got object",
        ),
    ],
)
def test_bad_frames_become_one_dead_letter(raw: bytes, reason: str) -> None:
    frame = parse(raw)
    assert frame.kind is FrameKind.INVALID
    dead = only_dead_letter(frame)
    assert dead.reason.startswith(reason), dead.reason
    assert dead.where == "okx.ws" and dead.at == NOW
    assert dead.raw_bytes() == raw  # kept exactly, for inspection and replay
    assert decode_dead_letter(encode(dead)) == dead


def _without(field: str) -> dict[str, Any]:
    item = item_now()
    del item[field]
    return item


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (_without("px"), "px: missing"),
        (_without("tradeId"), "tradeId: missing"),
        (_without("ts"), "ts: missing"),
        ({"instId": "ETH-USDT"}, "tradeId: missing; px: missing; sz: missing; side: missing; ts: missing"),
        (item_now(px="-1"), "px: '-1' is not a positive decimal"),
        (item_now(px="0"), "px: '0' is not a positive decimal"),
        (item_now(px="abc"), "px: 'abc' is not a positive decimal"),
        (item_now(px="2.5e3"), "px: '2.5e3' is not a positive decimal"),
        (item_now(px=2531.48), "px: expected a positive decimal string, got number 2531.48"),
        (item_now(sz="0.000"), "sz: '0.000' is not a positive decimal"),
        (item_now(sz="-0.5"), "sz: '-0.5' is not a positive decimal"),
        (item_now(sz=None), "sz: expected a positive decimal string, got null"),
        (item_now(side="long"), "side: 'long' is not 'buy' or 'sell'"),
        (item_now(side="BUY"), "side: 'BUY' is not 'buy' or 'sell'"),
        (
            item_now(ts="1747087161666000"),
            "ts: 1747087161666000 is outside 2010-01-01..2100-01-01 in epoch ms",
        ),
        (item_now(ts="1747087161"), "ts: 1747087161 is outside 2010-01-01..2100-01-01 in epoch ms"),
        (item_now(ts="yesterday"), "ts: 'yesterday' is not an integer (epoch ms)"),
        (item_now(tradeId="-5"), "tradeId: '-5' is not a non-negative integer"),
        (item_now(tradeId="12.0"), "tradeId: '12.0' is not a non-negative integer"),
        (item_now(tradeId="1e3"), "tradeId: '1e3' is not a non-negative integer"),
        (item_now(tradeId=" 17"), "tradeId: ' 17' is not a non-negative integer"),
        (item_now(tradeId="1" * 25), "tradeId: '1111111111111111111111111' is not a non-negative integer"),
        (item_now(count="0"), "count: '0' is not a positive integer"),
        (item_now(source="x"), "source: 'x' is not a non-negative integer"),
        (item_now(seqId="x"), "seqId: 'x' is not an integer"),
        # Beyond the PostgreSQL columns (trades.count integer, source smallint, seq_id bigint):
        (item_now(count="2147483648"), "trade: Expected `int` <= 2147483647 - at `$.count`"),
        (item_now(source="32768"), "trade: Expected `int` <= 32767 - at `$.source`"),
        (item_now(seqId=2**63), "trade: Expected `int` <= 9223372036854775807 - at `$.seq_id`"),
        (item_now(instId="BTC-USDT"), "instId: 'BTC-USDT' does not match the channel's instId 'ETH-USDT'"),
        (item_now(instId="eth-usdt"), "instId: 'eth-usdt' is not an instrument id"),
        ("just a string", "trade: expected an object, got string 'just a string'"),
        ([1, 2], "trade: expected an object, got array [1,2]"),
    ],
)
def test_bad_items_become_dead_letters_with_reasons(item: Any, reason: str) -> None:
    frame = parse(push("ETH-USDT", item))
    assert frame.kind is FrameKind.TRADES
    dead = only_dead_letter(frame)
    assert dead.reason.startswith(reason), dead.reason
    assert dead.where == "okx.ws" and dead.at == NOW
    assert json.loads(dead.raw or "") == item  # the item itself, not the whole frame


def test_several_problems_are_all_named() -> None:
    dead = only_dead_letter(parse(push("ETH-USDT", item_now(px="-1", side="hold", count="0"))))
    assert (
        dead.reason
        == "px: '-1' is not a positive decimal; side: 'hold' is not 'buy' or 'sell'; count: '0' is not a positive integer"
    )


def test_valid_neighbours_of_a_bad_item_survive_in_order() -> None:
    items: list[Any] = [item_now(tradeId="101"), item_now(tradeId="102", px="-1"), 7, item_now(tradeId="104")]
    frame = parse(push("ETH-USDT", *items))
    kinds = [type(item).__name__ for item in frame.items]
    assert kinds == ["Trade", "DeadLetter", "DeadLetter", "Trade"]
    assert [t.trade_id for t in frame.items if isinstance(t, Trade)] == [101, 104]


def test_slow_path_gives_the_same_trade_as_the_fast_path() -> None:
    item = item_now()
    fast = parse(push("ETH-USDT", item)).items[0]
    slow = trade_from_item(item, expect_inst_id="ETH-USDT", origin="ws", received_at=NOW)
    assert fast == slow


# --- REST --------------------------------------------------------------------------------------


def rest_row(trade_id: int, ts: int, inst_id: str = "BTC-USDT") -> dict[str, str]:
    """A history-trades row: no count or seqId, keys in OKX's order."""
    return {
        "instId": inst_id,
        "side": "buy",
        "sz": "0.0015",
        "px": "102537.9",
        "source": "0",
        "tradeId": str(trade_id),
        "ts": str(ts),
    }


def test_rest_page_newest_first() -> None:
    body = dumps(
        {
            "code": "0",
            "msg": "",
            "data": [rest_row(734864333, 1747087163557), rest_row(734864332, 1747087161666)],
        }
    )
    result = parse_rest_trades(body, inst_id="BTC-USDT", received_at=NOW)
    assert isinstance(result, RestTrades) and result.dead_letters == []
    assert [t.trade_id for t in result.trades] == [734864333, 734864332]
    assert all(t.origin == "rest" and t.received_at == NOW and t.count == 1 for t in result.trades)


def test_rest_bad_rows_are_dead_letters_and_other_instruments_refused() -> None:
    rows = [
        rest_row(5, 1747087163557),
        {**rest_row(4, 1747087163000), "px": "0"},
        rest_row(3, 1747087162000, "ETH-USDT"),
    ]
    result = parse_rest_trades(
        dumps({"code": "0", "msg": "", "data": rows}), inst_id="BTC-USDT", received_at=NOW
    )
    assert isinstance(result, RestTrades)
    assert [t.trade_id for t in result.trades] == [5]
    assert [d.reason for d in result.dead_letters] == [
        "px: '0' is not a positive decimal",
        "instId: 'ETH-USDT' does not match the channel's instId 'BTC-USDT'",
    ]
    assert all(d.where == "okx.rest" for d in result.dead_letters)


@pytest.mark.parametrize(
    ("body", "code", "rate_limited"),
    [
        (b'{"msg":"Too Many Requests","code":"50011"}', "50011", True),
        (b'{\n  "msg": "Invalid OK-ACCESS-KEY",\n  "code": "50111"\n}', "50111", False),
        (
            dumps(
                {
                    "code": 404,
                    "data": {},
                    "detailMsg": "",
                    "error_code": "404",
                    "error_message": "Not Found",
                    "msg": "Not Found",
                }
            ),
            "404",
            False,
        ),
        (dumps({"code": "51001", "msg": "Instrument ID does not exist", "data": []}), "51001", False),
        (b"<html><body>502 Bad Gateway</body></html>", BAD_RESPONSE, False),
        (b'{"data":[]}', BAD_RESPONSE, False),
        (b'{"code":"0","msg":"","data":{}}', BAD_RESPONSE, False),
        (b"[]", BAD_RESPONSE, False),
    ],
)
def test_rest_errors_are_typed(body: bytes, code: str, rate_limited: bool) -> None:
    result = parse_rest_trades(body, inst_id="BTC-USDT")
    assert isinstance(result, RestError)
    assert result.code == code and result.rate_limited is rate_limited and result.msg


# --- fuzzing: nothing raises, everything is accounted for ----------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

# Values that are sometimes right, often subtly wrong.
numberish = st.one_of(
    st.from_regex(r"\A[0-9]{1,19}\Z"),
    st.from_regex(r"\A-?[0-9]{0,6}(\.[0-9]{0,9})?\Z"),
    st.sampled_from(["1652459301117", "1747087161666000", "0", "1e3", " 7", "NaN", ""]),
    st.integers(),
    st.floats(allow_nan=False),
    st.none(),
    st.text(max_size=12),
)
trade_items = (
    st.fixed_dictionaries(
        {},
        optional={
            "instId": st.sampled_from(["BTC-USDT", "ETH-USDT", "btc-usdt", "", "BTC--USDT"])
            | st.text(max_size=10),
            "tradeId": numberish,
            "px": numberish,
            "sz": numberish,
            "side": st.sampled_from(["buy", "sell", "hold", ""]) | json_values,
            "ts": numberish,
            "count": numberish,
            "source": numberish,
            "seqId": numberish,
        },
    )
    | json_values
)


def check_frame(frame: WsFrame) -> None:
    assert isinstance(frame.kind, FrameKind)
    for item in frame.items:
        assert isinstance(item, Trade | DeadLetter)
        wire = encode(item)  # whatever comes out must go onto Kafka as it is
        if isinstance(item, Trade):
            assert decode_trade(wire) == item  # and every trade satisfies the schema
        else:
            assert item.reason and decode_dead_letter(wire) == item
    if frame.kind is FrameKind.INVALID:
        assert len(frame.items) == 1
    elif frame.kind is not FrameKind.TRADES:
        assert frame.items == []


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(raw: bytes) -> None:
    check_frame(parse_ws_frame(raw))


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_fuzz_random_text(raw: str) -> None:
    check_frame(parse_ws_frame(raw))


@settings(max_examples=300)
@given(json_values)
def test_fuzz_random_json(value: Any) -> None:
    check_frame(parse_ws_frame(msgspec.json.encode(value)))


@settings(max_examples=500)
@given(
    st.sampled_from(["trades", "trades-all", "tickers"]) | st.text(max_size=8),
    st.sampled_from(["BTC-USDT", "ETH-USDT"]) | json_values,
    st.lists(trade_items, max_size=5),
)
def test_fuzz_trade_shaped_frames_account_for_every_item(channel: str, inst_id: Any, data: list[Any]) -> None:
    raw = msgspec.json.encode({"arg": {"channel": channel, "instId": inst_id}, "data": data})
    frame = parse_ws_frame(raw)
    check_frame(frame)
    if frame.kind is FrameKind.TRADES:
        assert len(frame.items) == len(data)  # one trade or one dead letter per item, none lost


@settings(max_examples=300)
@given(
    st.binary(max_size=200)
    | json_values.map(msgspec.json.encode)
    | st.lists(trade_items, max_size=4).map(
        lambda d: msgspec.json.encode({"code": "0", "msg": "", "data": d})
    )
)
def test_fuzz_rest_bodies(body: bytes) -> None:
    result = parse_rest_trades(body, inst_id="BTC-USDT")
    assert isinstance(result, RestTrades | RestError)
    if isinstance(result, RestTrades):
        for trade in result.trades:
            assert decode_trade(encode(trade)) == trade
