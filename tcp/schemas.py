"""Message schemas on the wire: trades and dead letters.

Values on Kafka are compact JSON. Prices and sizes travel as the exact decimal strings the
exchange sent (never floats); times are epoch milliseconds, UTC. Decoding goes through typed
msgspec decoders, which validate while they parse: a value that does not fit raises
``msgspec.ValidationError`` with the path of the bad field.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal
from operator import attrgetter
from typing import Annotated, Literal

import msgspec

__all__ = [
    "MAX_BIGINT",
    "MAX_COUNT",
    "MAX_KEPT",
    "MAX_REASON",
    "MAX_SOURCE",
    "MAX_TS_MS",
    "MIN_TS_MS",
    "DeadLetter",
    "Origin",
    "Side",
    "Trade",
    "check_trade",
    "decode_dead_letter",
    "decode_trade",
    "decode_trades",
    "encode",
    "is_inst_id",
    "is_positive_decimal",
    "trade_problem",
    "trade_problems",
]

#: 2010-01-01T00:00:00Z: nothing we ingest is older (OKX opened in 2013).
MIN_TS_MS = 1_262_304_000_000
#: 2100-01-01T00:00:00Z: anything later is a unit mistake (µs or ns instead of ms).
MAX_TS_MS = 4_102_444_800_000

Side = Literal["buy", "sell"]
Origin = Literal["ws", "rest", "replay", "sim"]

EpochMs = Annotated[int, msgspec.Meta(ge=MIN_TS_MS, lt=MAX_TS_MS)]

# The integer fields' bounds are the PostgreSQL columns' (sinks/migrations): a value the archive
# could not store (``trades.source`` is a smallint, ``count`` an integer, ids bigint) or turn
# into a timestamp must be dead-lettered here, not crash a sink at every restart.
#: PostgreSQL ``bigint``.
MAX_BIGINT = 2**63 - 1
#: PostgreSQL ``integer`` (``trades.count``).
MAX_COUNT = 2**31 - 1
#: PostgreSQL ``smallint`` (``trades.source``).
MAX_SOURCE = 2**15 - 1


def is_positive_decimal(text: str) -> bool:
    """A positive decimal in plain notation: "42219.9", "0.00000123"; no sign, exponent or blanks.

    String methods instead of a regex: this runs twice per trade on the hot path, and is
    three times faster than msgspec's pattern constraint.
    """
    return (
        0 < len(text) <= 40
        and text.isascii()
        and text.replace(".", "", 1).isdigit()
        and text[0] != "."
        and text[-1] != "."
        and text.strip("0.") != ""
    )


def is_inst_id(text: str) -> bool:
    """An instrument id like BTC-USDT or BTC-USD-SWAP: upper-case ASCII letters/digits joined by dashes."""
    return (
        len(text) <= 64
        and 1 <= text.count("-") <= 4
        and text.isascii()
        and text.isupper()
        and text.replace("-", "").isalnum()
        and "--" not in text
        and text[0] != "-"
        and text[-1] != "-"
    )


_VALID_DECIMALS: set[str] = set()
_VALID_INST_IDS: set[str] = set()
_REMEMBER_AT_MOST = 200_000


class Trade(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True, gc=False):
    """One exchange trade (or one aggregated push of ``count`` fills at one price).

    ``trade_id`` is the exchange's id as an integer (OKX sends digits in a string; for an
    aggregated push it is the LAST id of the fills). Event order is ``(ts, trade_id)``.

    Like every msgspec Struct, the constructor checks nothing. Trades enter the platform only
    through checked doors: :func:`decode_trade` / :func:`decode_trades` (Kafka), the OKX parser
    and the replay reader, which apply the types above AND :func:`trade_problem` (px and sz
    positive decimals in plain notation, inst_id like BTC-USDT). Code that builds trades itself
    from untrusted input must call :func:`check_trade` too.
    """

    inst_id: str
    trade_id: Annotated[int, msgspec.Meta(ge=0, le=MAX_BIGINT)]
    px: str
    sz: str
    side: Side
    ts: EpochMs
    origin: Origin
    received_at: Annotated[int, msgspec.Meta(ge=0, lt=MAX_TS_MS)] = 0  # 0: not known
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)] = 1
    source: Annotated[int, msgspec.Meta(ge=0, le=MAX_SOURCE)] = 0
    seq_id: Annotated[int, msgspec.Meta(ge=-MAX_BIGINT - 1, le=MAX_BIGINT)] | None = None

    @property
    def price(self) -> Decimal:
        return Decimal(self.px)

    @property
    def size(self) -> Decimal:
        return Decimal(self.sz)

    @property
    def key(self) -> bytes:
        """The Kafka message key: the instrument, so one instrument stays on one partition."""
        return self.inst_id.encode()


#: The most of a bad input a dead letter keeps (bytes, or characters of a text input), and the
#: longest reason: a letter must fit in one Kafka message (1 MB by default) even when its input
#: did not fit in less, and JSON writes a control character as six bytes.
MAX_KEPT = 64 * 1024
MAX_REASON = 1_000


class DeadLetter(msgspec.Struct, frozen=True, omit_defaults=True):
    """A message that could not be turned into a trade, kept with the reason.

    ``raw`` holds the input exactly when it is UTF-8 text; otherwise ``raw_b64`` holds the bytes
    in base64. ``where`` says where it came from (``okx.ws``, ``replay:FILE:LINE``, a topic and
    offset, ...), ``at`` is when it was dead-lettered (epoch ms).

    An input longer than :data:`MAX_KEPT` is cut: the letter keeps its first ``MAX_KEPT``
    bytes (characters, for text), with ``raw_size`` (its length in bytes) and ``raw_sha256``
    (hex) of the whole input; both are absent when the input is kept whole. A reason longer
    than :data:`MAX_REASON` characters is cut too.
    """

    reason: str
    where: str
    at: int
    raw: str | None = None
    raw_b64: str | None = None
    raw_size: int | None = None
    raw_sha256: str | None = None

    @classmethod
    def of(cls, raw: bytes | str, *, reason: str, where: str, at: int) -> DeadLetter:
        if len(reason) > MAX_REASON:
            reason = f"{reason[:MAX_REASON]}... ({len(reason):,} characters)"
        if len(raw) <= MAX_KEPT:
            return cls._keep(raw, reason, where, at)
        import hashlib

        whole = raw.encode("utf-8") if isinstance(raw, str) else raw
        kept = cls._keep(raw[:MAX_KEPT], reason, where, at)
        return msgspec.structs.replace(
            kept, raw_size=len(whole), raw_sha256=hashlib.sha256(whole).hexdigest()
        )

    @classmethod
    def _keep(cls, raw: bytes | str, reason: str, where: str, at: int) -> DeadLetter:
        if isinstance(raw, str):
            return cls(reason=reason, where=where, at=at, raw=raw)
        try:
            return cls(reason=reason, where=where, at=at, raw=raw.decode("utf-8"))
        except UnicodeDecodeError:
            import base64

            return cls(reason=reason, where=where, at=at, raw_b64=base64.b64encode(raw).decode())

    @property
    def cut(self) -> bool:
        """Whether the letter keeps only the beginning of its input (see ``raw_size``)."""
        return self.raw_size is not None

    def raw_bytes(self) -> bytes:
        """The input, or only its beginning when the letter is ``cut``."""
        if self.raw is not None:
            return self.raw.encode("utf-8")
        import base64

        return base64.b64decode(self.raw_b64 or "")


_encoder = msgspec.json.Encoder()
_trade_decoder = msgspec.json.Decoder(Trade)
_dead_letter_decoder = msgspec.json.Decoder(DeadLetter)

encode = _encoder.encode
decode_dead_letter = _dead_letter_decoder.decode

_PX = attrgetter("px")
_SZ = attrgetter("sz")
_INST = attrgetter("inst_id")


def _remember(cache: set[str], text: str) -> None:
    if len(cache) >= _REMEMBER_AT_MOST:  # bounded: forget everything, re-learn the common ones
        cache.clear()
    cache.add(text)


def trade_problem(trade: Trade) -> str | None:
    """Why a trade's strings break the schema (px, sz, inst_id), or None when they are fine.

    The types, ranges and field names are msgspec's job when decoding; this is the rest.
    Prices and instrument ids repeat, so a string found valid once is remembered (bounded).
    """
    if trade.px not in _VALID_DECIMALS:
        if not is_positive_decimal(trade.px):
            return f"px: {trade.px!r} is not a positive decimal"
        _remember(_VALID_DECIMALS, trade.px)
    if not is_positive_decimal(trade.sz):
        return f"sz: {trade.sz!r} is not a positive decimal"
    if trade.inst_id not in _VALID_INST_IDS:
        if not is_inst_id(trade.inst_id):
            return f"inst_id: {trade.inst_id!r} is not an instrument id like BTC-USDT"
        _remember(_VALID_INST_IDS, trade.inst_id)
    return None


def check_trade(trade: Trade) -> Trade:
    """The trade itself when :func:`trade_problem` finds nothing, else ``ValueError`` with the reason."""
    problem = trade_problem(trade)
    if problem is not None:
        raise ValueError(problem)
    return trade


def trade_problems(trades: Sequence[Trade]) -> dict[int, str]:
    """``{index: reason}`` of the trades that break the schema; empty when all are fine.

    The batch form of :func:`trade_problem`: each DISTINCT px, sz and inst_id of the batch is
    checked once (the sets are built by C loops), so a clean batch costs a fraction of checking
    trade by trade. Only when some string is bad are the trades looked at one by one.
    """
    new_px = set(map(_PX, trades)).difference(_VALID_DECIMALS)
    new_inst = set(map(_INST, trades)).difference(_VALID_INST_IDS)
    clean = all(map(is_positive_decimal, new_px)) and all(map(is_inst_id, new_inst))
    clean = clean and all(map(is_positive_decimal, set(map(_SZ, trades))))
    if clean:
        for text in new_px:
            _remember(_VALID_DECIMALS, text)
        for text in new_inst:
            _remember(_VALID_INST_IDS, text)
        return {}
    problems = {}
    for i, trade in enumerate(trades):
        problem = trade_problem(trade)
        if problem is not None:
            problems[i] = problem
    return problems


def decode_trade(data: bytes | str) -> Trade:
    """One ``okx.trades`` value as a checked Trade; ``msgspec.ValidationError`` (or
    ``msgspec.DecodeError`` for broken JSON) says what is wrong and where."""
    trade = _trade_decoder.decode(data)
    problem = trade_problem(trade)
    if problem is not None:
        raise msgspec.ValidationError(problem)
    return trade


def decode_trades(values: Iterable[bytes]) -> tuple[list[Trade], list[tuple[int, str]]]:
    """A batch of ``okx.trades`` values: the checked trades (in order), and ``(index, reason)``
    of every value that is not one. The hot path of the candle dataflow: one typed decode per
    value, then :func:`trade_problems` over the batch."""
    decode = _trade_decoder.decode
    trades: list[Trade] = []
    where: list[int] = []  # the value index of each decoded trade, built only after a failure
    bad: list[tuple[int, str]] = []
    for i, value in enumerate(values):
        try:
            trade = decode(value)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            if not bad:
                where = list(range(len(trades)))
            bad.append((i, str(exc)))
            continue
        trades.append(trade)
        if bad:
            where.append(i)
    problems = trade_problems(trades)
    if problems:
        if not bad:
            where = list(range(len(trades)))
        bad.extend((where[i], reason) for i, reason in problems.items())
        bad.sort()
        trades = [trade for i, trade in enumerate(trades) if i not in problems]
    return trades, bad
