"""Malformed and hostile ``okx.trades`` values, made deterministically from a seed, mixed with
valid trades written in odd but valid ways (the fuzz drill in tests/test_drills.py).

Every message says what it is: a valid one carries the :class:`Trade` it encodes, a malformed
one the name of the maker that made it (``kind``). The messages come lazily: a million of them
need not be in memory at once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tcp.schemas import Trade, encode

__all__ = ["HUGE", "MALFORMED_KINDS", "T0", "VALID_INSTRUMENTS", "FuzzMessage", "fuzz_messages"]

#: The valid trades' instruments. FUZZ-USDT is not among the configured instruments but is
#: well-formed: the schema takes any instrument id shaped like BTC-USDT, so it makes candles.
VALID_INSTRUMENTS = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "FUZZ-USDT")
T0 = 1_704_067_200_000  # 2024-01-01 00:00:00 UTC: the valid trades' first event time
#: The size of the "1 MB" values.
HUGE = 1_000_000

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class FuzzMessage:
    key: bytes | None
    value: bytes | None  # None: a tombstone (the dataflow reads it as an empty value)
    trade: Trade | None  # the trade of a valid message, None for a malformed one
    kind: str  # the maker of a malformed message; "valid" otherwise


# --------------------------------------------------------------------------------------------
# Malformed values: one maker per kind, each (rng, a valid trade as a dict) -> value


def _base(rng: random.Random) -> Json:
    """A valid trade as a dict (the makers break it)."""
    return {
        "inst_id": rng.choice(VALID_INSTRUMENTS),
        "trade_id": rng.randrange(1, 10**12),
        "px": f"{rng.randrange(1, 10**6)}.{rng.randrange(10)}",
        "sz": f"0.{rng.randrange(1, 10**8):08d}",
        "side": rng.choice(("buy", "sell")),
        "ts": T0 + rng.randrange(10**10),
        "origin": rng.choice(("ws", "rest", "replay", "sim")),
    }


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=True).encode()


Maker = Callable[[random.Random, Json], bytes | None]


def _replacing(table: tuple[tuple[str, Any], ...]) -> Maker:
    """A maker that sets one field of the trade to a value of ``table``: (field, value) pairs."""

    def make(rng: random.Random, good: Json) -> bytes:
        field, value = rng.choice(table)
        return _dumps({**good, field: value})

    return make


def _truncated(rng: random.Random, good: Json) -> bytes:
    whole = _dumps(good)
    return whole[: rng.randrange(len(whole))]  # any proper prefix of an object is cut short


_WRONG_TYPES: tuple[tuple[str, Any], ...] = (
    ("trade_id", "123"), ("trade_id", 1.5), ("trade_id", 1e3), ("trade_id", True), ("trade_id", None),
    ("trade_id", []), ("ts", "1704067200000"), ("ts", 1.7040672e12), ("ts", None), ("px", 100.5),
    ("px", 100), ("px", None), ("px", ["1"]), ("px", True), ("sz", 1), ("sz", {"v": "1"}), ("side", 1),
    ("side", None), ("inst_id", 123), ("inst_id", ["BTC-USDT"]), ("inst_id", None), ("origin", 0),
    ("count", "1"), ("count", 1.0), ("source", "0"), ("received_at", "now"), ("seq_id", "12"),
    ("seq_id", 1.5),
)  # fmt: skip


def _missing(rng: random.Random, good: Json) -> bytes:
    gone = rng.choice(("inst_id", "trade_id", "px", "sz", "side", "ts", "origin"))
    return _dumps({k: v for k, v in good.items() if k != gone})


_BAD_DECIMALS = (
    "-1", "-0.5", "0", "0.0", "0.00000000", "00", "NaN", "nan", "-NaN", "sNaN", "Infinity", "-Infinity",
    "inf", "1e5", "1E-3", "1e+308", "9" * 41, "1" + "0" * 400, "0." + "0" * 60 + "1", " 1", "1 ", "+1",
    "1,5", "0x10", "1_000", ".5", "5.", "1.2.3", "", "１２３", "١٢٣", "²", "1\u00a0", "1\n", "1\x00",
)  # fmt: skip


def _bad_decimal(rng: random.Random, good: Json) -> bytes:
    return _dumps({**good, rng.choice(("px", "sz")): rng.choice(_BAD_DECIMALS)})


_OUT_OF_RANGE: tuple[tuple[str, int], ...] = (
    ("trade_id", -1), ("trade_id", 2**63), ("trade_id", 2**64), ("trade_id", 10**30), ("count", 0),
    ("count", -1), ("count", 2**31), ("count", 2**62), ("source", -1), ("source", 2**15),
    ("source", 2**40), ("received_at", -1), ("received_at", 10**15), ("received_at", 2**63),
    ("seq_id", 2**63), ("seq_id", -(2**63) - 1), ("seq_id", 10**40),
)  # fmt: skip


_BAD_TIMESTAMPS = (
    0, -1, 1_230_768_000_000, 1_262_303_999_999, 4_102_444_800_000, 1_704_067_200_000_000,
    1_704_067_200_000_000_000, 2**63 - 1, -(2**63),
)  # fmt: skip


def _bad_timestamp(rng: random.Random, good: Json) -> bytes:
    """Before 2010 (2009 included), after 2100, or in µs/ns instead of ms."""
    return _dumps({**good, "ts": rng.choice(_BAD_TIMESTAMPS)})


_BAD_INST_IDS = (
    "btc-usdt", "BTCUSDT", "BTC--USDT", "-BTC-USDT", "BTC-USDT-", "BTC_USDT", "BTC-USDT ", " BTC-USDT",
    "A-B-C-D-E-F", "X" * 60 + "-USDT", "BTC-USDŦ", "ВТС-USDT", "", "-",
    "BTC-USDT'; DROP TABLE candles;--", "BTC-USDT\" OR \"1\"=\"1", "'; DELETE FROM trades WHERE ''='",
    "<script>alert(1)</script>", "BTC-<b>USDT</b>", "${jndi:ldap://x/a}", "{{7*7}}", "../../etc/passwd",
    "BTC-USDT\n", "BTC-USDT\r\nX-Injected: 1", "BTC-\tUSDT", "BTC-USDT\x00", "BTC-USDT\x1b[31m",
    "BTC-USDT\u202e", "BTC-USDT\ufeff", "BTC-USD\u200bT",
)  # fmt: skip


def _bad_inst_id(rng: random.Random, good: Json) -> bytes:
    return _dumps({**good, "inst_id": rng.choice(_BAD_INST_IDS)})


_BAD_ENUMS = (
    ("side", "BUY"), ("side", "Sell"), ("side", ""), ("side", "long"), ("side", "buy "), ("side", "<i>buy</i>"),
    ("origin", "okx"), ("origin", "WS"), ("origin", ""), ("origin", "sim' OR 1=1 --"),
)  # fmt: skip


def _unknown_field(rng: random.Random, good: Json) -> bytes:
    name = rng.choice(("extra", "instId", "PX", "__proto__", "constructor", "px ", ""))
    return _dumps({**good, name: rng.choice((1, "x", None, {"a": [1]}))})


def _duplicate_key(rng: random.Random, good: Json) -> bytes:
    """A key twice, the LAST value invalid (the decoder keeps the last one)."""
    field, bad = rng.choice((("px", '"-1"'), ("sz", '"0"'), ("ts", "0"), ("side", '"up"')))
    return _dumps(good)[:-1] + f',"{field}":{bad}}}'.encode()


def _not_an_object(rng: random.Random, good: Json) -> bytes:
    return rng.choice(
        (b"null", b"true", b"0", b"-1", b'"BTC-USDT"', b"[]", b"{}", b"[" + _dumps(good) + b"]", b"1e999",
         b"NaN", b"Infinity", b'{"trade": ' + _dumps(good) + b"}")
    )  # fmt: skip


def _broken_json(rng: random.Random, good: Json) -> bytes:
    text = _dumps(good)
    return rng.choice(
        (
            text.replace(b'"px":"', b'"px":', 1),  # an unterminated string
            text.replace(b",", b";", 1),
            text.replace(b'"', b"'"),
            text + b"}",
            text + text,
            text + b"\x00",
            b"\xef\xbb\xbf" + text,  # a byte order mark
            text.replace(b":", b"=", 1),
            text[:-1] + b",}",  # a trailing comma
            b"{" + text,
            text.replace(b'"px":"', b'"px":NaN,"x":"', 1),
            text.replace(b'"sz":"', b'"sz":Infinity,"x":"', 1),
            text.replace(b'"side":"', b'"side":"\x01', 1),  # a raw control character in a string
            text.replace(b'"origin":"', b'"origin":"\\ud800', 1),  # a lone surrogate escape
            text.replace(b'"origin":"', b'"origin":"\\x41', 1),  # an invalid escape
        )
    )


def _not_utf8(rng: random.Random, good: Json) -> bytes:
    text = _dumps(good)
    return rng.choice(
        (
            rng.randbytes(rng.randrange(200)) + b"\xff",
            text.replace(b"-USDT", b"-US\xffDT", 1),
            text.replace(b"-USDT", b"-US\xc0\xafDT", 1),  # an overlong encoding
            text.replace(b"-USDT", b"-US\xed\xa0\x80DT", 1),  # an encoded surrogate
            text.replace(b"-USDT", b"-US\xe2\x82", 1),  # a sequence cut short
            text.decode().encode("utf-16"),
            b"\xfe\xff" + text.decode().encode("utf-16-be"),
        )
    )


def _empty(rng: random.Random, good: Json) -> bytes | None:
    return rng.choice((b"", None, b" ", b"\n", b"\x00", b"\t\r\n "))


def _nested(rng: random.Random, good: Json) -> bytes:
    depth = rng.choice((32, 64, 128, 512, 1_000))  # deeper ones: see _huge
    kind = rng.randrange(5)
    if kind == 0:
        return b"[" * depth + b"]" * depth
    if kind == 1:
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == 2:
        return _dumps(good)[:-1] + b',"seq_id":' + b"[" * depth + b"]" * depth + b"}"
    if kind == 3:
        return _dumps(good)[:-1] + b',"x":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
    return b"[" * depth  # never closed


_CONTROL = bytes(1 + i % 31 for i in range(256))  # any byte -> a control character
_HIGH = bytes(128 + i % 128 for i in range(256))  # any byte -> a byte that is not ASCII


def _huge(rng: random.Random, good: Json) -> bytes:
    """A 1 MB value (HUGE bytes): junk, a huge field or key, control characters (a JSON
    string escapes each to six bytes), bytes that are not UTF-8, or nesting 500,000 deep."""
    head = _dumps({**good, "px": ""})
    kind = rng.randrange(6)
    if kind == 0:
        return b"x" * HUGE
    if kind == 1:  # a huge px: its reason must not be huge too
        filler = HUGE - len(head)
        return head.replace(b'"px":""', b'"px":"' + b"9" * filler + b'"')[:HUGE]
    if kind == 2:
        return rng.randbytes(HUGE).translate(_CONTROL)
    if kind == 3:
        return rng.randbytes(HUGE).translate(_HIGH)  # not UTF-8
    if kind == 4:
        return b'{"' + b"k" * (HUGE - 6) + b'":1}'  # a huge unknown key
    return b"[" * (HUGE // 2) + b"]" * (HUGE // 2)  # nested 500,000 deep


#: Every kind of malformed value, by name.
MALFORMED_KINDS: dict[str, Maker] = {
    "truncated": _truncated,
    "wrong type": _replacing(_WRONG_TYPES),
    "missing field": _missing,
    "bad decimal": _bad_decimal,
    "integer out of range": _replacing(_OUT_OF_RANGE),
    "bad timestamp": _bad_timestamp,
    "bad or hostile inst_id": _bad_inst_id,
    "bad side or origin": _replacing(_BAD_ENUMS),
    "unknown field": _unknown_field,
    "duplicate key": _duplicate_key,
    "not an object": _not_an_object,
    "broken JSON": _broken_json,
    "not UTF-8": _not_utf8,
    "empty": _empty,
    "deeply nested": _nested,
}


# --------------------------------------------------------------------------------------------
# Valid trades, encoded in odd but valid ways


def _valid_value(rng: random.Random, trade: Trade) -> bytes:
    """``trade`` as JSON the decoder must take: compact, pretty, keys reordered, escaped
    characters, defaults written out, an earlier invalid value of a repeated key (the last wins)."""
    plain = encode(trade)
    kind = rng.randrange(8)
    if kind <= 2:
        return plain
    fields = json.loads(plain)
    if kind == 3:
        return json.dumps(fields, indent=2).encode() + b"\n"
    if kind == 4:
        items = list(fields.items())
        rng.shuffle(items)
        return json.dumps(dict(items), ensure_ascii=True).encode()
    if kind == 5:
        return plain.replace(b"-USDT", b"\\u002dUSDT", 1).replace(b'"buy"', b'"\\u0062uy"')
    if kind == 6:
        defaults = {"received_at": 0, "count": 1, "source": 0, "seq_id": None}
        return _dumps({**defaults, **fields})
    return b'{"px":"-1","sz":"0",' + plain[1:]  # repeated keys: the last one wins


def _valid_trades(rng: random.Random, count: int) -> Iterator[Trade]:
    """``count`` trades, round robin over VALID_INSTRUMENTS, in event order per instrument."""
    ts = dict.fromkeys(VALID_INSTRUMENTS, T0)
    ticks = dict.fromkeys(VALID_INSTRUMENTS, 100_000)
    for i in range(count):
        inst = VALID_INSTRUMENTS[i % len(VALID_INSTRUMENTS)]
        ts[inst] += rng.randrange(0, 3_000)
        ticks[inst] = max(1, ticks[inst] + rng.randrange(-5, 6))
        yield Trade(
            inst_id=inst,
            trade_id=i + 1,
            px=f"{ticks[inst] // 10}.{ticks[inst] % 10}",
            sz=f"0.{rng.randrange(1, 10**8):08d}",
            side=rng.choice(("buy", "sell")),
            ts=ts[inst],
            origin="sim",
            received_at=ts[inst] + 5,
            count=rng.choice((1, 1, 2)),
            seq_id=rng.choice((None, i * 10)),
        )


# --------------------------------------------------------------------------------------------


def fuzz_messages(seed: int, malformed: int, valid: int, *, huge: int = 5) -> Iterator[FuzzMessage]:
    """``malformed`` malformed or hostile messages (``huge`` of them 1 MB values) and ``valid``
    valid trades keyed by instrument, shuffled together; the same for the same arguments."""
    rng = random.Random(seed)
    makers = list(MALFORMED_KINDS.items())
    trades = _valid_trades(random.Random(seed + 1), valid)
    huge_at = set(rng.sample(range(malformed), min(huge, malformed)))
    bad_left, good_left = malformed, valid
    while bad_left or good_left:
        if rng.randrange(bad_left + good_left) < good_left:
            good_left -= 1
            trade = next(trades)
            yield FuzzMessage(trade.key, _valid_value(rng, trade), trade, "valid")
            continue
        bad_left -= 1
        if bad_left in huge_at:
            name, value = "1 MB value", _huge(rng, _base(rng))
        else:
            name, maker = rng.choice(makers)
            value = maker(rng, _base(rng))
        key = rng.choice((None, b"BTC-USDT", b"", b"\xff\xfe", b"k" * 300))
        yield FuzzMessage(key, value, None, name)
