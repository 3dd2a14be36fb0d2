"""tcp.schemas: the Trade and DeadLetter wire formats and their validation."""

from __future__ import annotations

import hashlib
import re
from decimal import Decimal, InvalidOperation

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcp.schemas import (
    MAX_BIGINT,
    MAX_COUNT,
    MAX_KEPT,
    MAX_REASON,
    MAX_SOURCE,
    MAX_TS_MS,
    DeadLetter,
    Trade,
    check_trade,
    decode_dead_letter,
    decode_trade,
    decode_trades,
    encode,
    is_positive_decimal,
    trade_problems,
)

GOOD = {
    "inst_id": "BTC-USDT",
    "trade_id": 130639474,
    "px": "42219.9",
    "sz": "0.12060306",
    "side": "buy",
    "ts": 1630048897897,
    "origin": "ws",
}


def test_round_trip_keeps_exact_strings_and_is_compact() -> None:
    trade = Trade(**GOOD, count=3, seq_id=1234, received_at=1630048897950)  # type: ignore[arg-type]
    wire = encode(trade)
    assert b" " not in wire and b'"px":"42219.9"' in wire
    assert decode_trade(wire) == trade
    assert trade.price == Decimal("42219.9") and trade.key == b"BTC-USDT"


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("px", "-1", "px"),
        ("px", "0", "px"),
        ("px", "abc", "px"),
        ("px", 42219.9, "Expected `str`"),
        ("sz", "1e-3", "sz"),
        ("sz", "", "sz"),
        ("side", "long", "side"),
        ("ts", 1630048897897000, "ts"),  # microseconds: absurd as ms
        ("ts", 0, "ts"),
        ("inst_id", "btc-usdt", "inst_id"),
        ("trade_id", "abc", "trade_id"),
        ("origin", "telepathy", "origin"),
    ],
)
def test_invalid_fields_are_rejected_with_a_reason(field: str, value: object, reason: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=re.escape(reason)):
        decode_trade(encode({**GOOD, field: value}))


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("trade_id", 2**63, "Expected `int` <= 9223372036854775807 - at `$.trade_id`"),
        ("trade_id", 10**30, "Expected `int` <= 9223372036854775807 - at `$.trade_id`"),
        ("count", 2**31, "Expected `int` <= 2147483647 - at `$.count`"),
        ("source", 2**15, "Expected `int` <= 32767 - at `$.source`"),
        ("received_at", MAX_TS_MS, "Expected `int` <= 4102444799999 - at `$.received_at`"),
        ("received_at", 2**63, "Expected `int` <= 4102444799999 - at `$.received_at`"),
        ("seq_id", 2**63, "Expected `int` <= 9223372036854775807 - at `$.seq_id`"),
        ("seq_id", -(2**63) - 1, "Expected `int` >= -9223372036854775808 - at `$.seq_id`"),
    ],
)
def test_integers_the_database_cannot_store_are_rejected(field: str, value: int, reason: str) -> None:
    """A trade the archive or the candles table could not store would stop its sink at every
    restart (a poison message): it is dead-lettered instead (found by the fuzz drill)."""
    with pytest.raises(msgspec.ValidationError) as error:
        decode_trade(encode({**GOOD, field: value}))
    assert str(error.value) == reason


def test_the_largest_storable_integers_are_accepted() -> None:
    edge = {**GOOD, "trade_id": MAX_BIGINT, "count": MAX_COUNT, "source": MAX_SOURCE,
            "received_at": MAX_TS_MS - 1, "seq_id": -MAX_BIGINT - 1}  # fmt: skip
    assert decode_trade(encode(edge)) == Trade(**edge)  # type: ignore[arg-type]


def test_missing_and_unknown_fields_are_rejected() -> None:
    with pytest.raises(msgspec.ValidationError, match="px"):
        decode_trade(encode({k: v for k, v in GOOD.items() if k != "px"}))
    with pytest.raises(msgspec.ValidationError, match="surprise"):
        decode_trade(encode({**GOOD, "surprise": 1}))


@given(st.text(max_size=45))
def test_positive_decimal_check_agrees_with_decimal(text: str) -> None:
    expected = bool(re.fullmatch(r"[0-9]+(\.[0-9]+)?", text, flags=re.ASCII)) and len(text) <= 40
    if expected:
        try:
            expected = Decimal(text) > 0
        except InvalidOperation:
            expected = False
    assert is_positive_decimal(text) == expected


@given(st.binary(max_size=200))
def test_dead_letter_keeps_any_bytes(raw: bytes) -> None:
    letter = DeadLetter.of(raw, reason="bad JSON", where="test", at=1)
    assert decode_dead_letter(encode(letter)).raw_bytes() == raw


@pytest.mark.parametrize(
    "raw",
    [
        b"x" * 1_000_000,
        bytes(range(1, 32)) * 33_000,  # control characters: six bytes each in a JSON string
        bytes(range(128, 256)) * 8_000,  # not UTF-8: base64
        "\u00e9\u0001" * 300_000,  # text (the OKX connector's frames)
    ],
)
def test_a_huge_input_makes_a_dead_letter_that_fits_a_kafka_message(raw: bytes | str) -> None:
    """The letter keeps the input's first MAX_KEPT bytes (characters), its size and SHA-256,
    and a cut reason (a reason may quote the value): a 1 MB input made a 2-5 MB letter, which
    Kafka refused, and that stopped the candle dataflow (found by the fuzz drill)."""
    whole = raw.encode() if isinstance(raw, str) else raw
    letter = DeadLetter.of(raw, reason="px: '" + "9" * 1_000_000 + "'", where="okx.trades[0]@7", at=1)
    wire = encode(letter)
    assert len(wire) < 500_000
    back = decode_dead_letter(wire)
    assert back == letter and back.cut
    assert back.raw_size == len(whole) and back.raw_sha256 == hashlib.sha256(whole).hexdigest()
    kept = back.raw_bytes()
    assert whole.startswith(kept) and len(kept) >= MAX_KEPT
    assert back.reason.startswith("px: '999") and back.reason.endswith("... (1,000,006 characters)")
    assert len(back.reason) < MAX_REASON + 30


def test_an_input_of_max_kept_bytes_is_kept_whole() -> None:
    letter = DeadLetter.of(b"\xff" * MAX_KEPT, reason="bad", where="test", at=1)
    assert not letter.cut and letter.raw_bytes() == b"\xff" * MAX_KEPT
    assert b"raw_size" not in encode(letter)


def test_decode_trades_keeps_the_good_and_names_each_bad_value_by_index() -> None:
    good = [encode({**GOOD, "trade_id": i}) for i in range(5)]
    values = [
        good[0],
        b"{not json",
        good[1],
        encode({**GOOD, "px": "-1"}),  # typed fine, breaks the string rules
        good[2],
        encode({**GOOD, "inst_id": "btc-usdt"}),
        good[3],
        encode({**GOOD, "ts": 0}),
        good[4],
    ]
    trades, bad = decode_trades(values)
    assert [t.trade_id for t in trades] == [0, 1, 2, 3, 4]
    assert [i for i, _ in bad] == [1, 3, 5, 7]
    reasons = dict(bad)
    assert "px: '-1' is not a positive decimal" in reasons[3]
    assert "inst_id: 'btc-usdt'" in reasons[5] and "ts" in reasons[7]


def test_trade_problems_checks_every_distinct_string_once_per_batch() -> None:
    clean = [Trade(**{**GOOD, "trade_id": i, "sz": f"0.{i + 1}"}) for i in range(50)]  # type: ignore[arg-type]
    assert trade_problems(clean) == {}
    dirty = [*clean, Trade(**{**GOOD, "sz": "0.000"}), Trade(**{**GOOD, "px": "1e5"})]  # type: ignore[arg-type]
    assert trade_problems(dirty) == {
        50: "sz: '0.000' is not a positive decimal",
        51: "px: '1e5' is not a positive decimal",
    }
    # The constructor checks nothing (as with every msgspec Struct); check_trade does.
    with pytest.raises(ValueError, match="sz: '0.000'"):
        check_trade(dirty[50])
    assert check_trade(clean[0]) is clean[0]
