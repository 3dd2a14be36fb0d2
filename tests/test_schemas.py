"""tcp.schemas: the Trade and DeadLetter wire formats and their validation."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcp.schemas import DeadLetter, Trade, decode_dead_letter, decode_trade, encode, is_positive_decimal

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
