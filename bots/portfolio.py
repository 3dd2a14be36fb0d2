"""The fill rule and a bot's virtual portfolio, in exact decimal arithmetic.

Fill rule (the live bots and the backtest engine share this code):

* A signal fills at the ``close`` of the candle that produced it, moved against the bot by the
  slippage: a buy at ``close * (1 + bps / 10^4)``, a sell at ``close * (1 - bps / 10^4)``.
* ``fee = fee_rate * notional``, paid in quote currency, where ``notional = size * fill price``.
* A buy spends its budget (see ``budget``) fee included:
  ``size = budget / (price * (1 + fee_rate))`` rounded DOWN to ``SIZE_DECIMALS`` (12) decimal
  places, so ``notional + fee <= budget`` always; then ``cash -= notional + fee``. A budget too
  small to buy one ``SIZE_QUANTUM`` (10^-12) buys nothing.
* A sell closes the whole position: ``cash += notional - fee``.
* A buy while long, or a sell while flat, does nothing (``apply`` returns ``None``).

P&L: the cost basis of a position is what the buy took from the cash (``notional + fee``).
``realized_pnl`` of a sell = its proceeds (``notional - fee``) minus that cost basis, so it is
net of both fees; ``unrealized_pnl = position * close - cost basis``. Hence at every mark
``equity = cash + position * close = initial cash + realized + unrealized``.

Arithmetic: every operation runs in ``MONEY`` (60 significant digits, half-even), never in the
global context. Products and sums of realistic prices, sizes and rates stay well below 60
digits, so they are exact; the only rounding on purpose is the size (down, to 12 places).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import (
    ROUND_DOWN,
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
)
from typing import Annotated, Literal

import msgspec

from bots.config import BotConfig, FractionSizing, Sizing

__all__ = [
    "MONEY",
    "SIZE_DECIMALS",
    "SIZE_QUANTUM",
    "Fill",
    "Mark",
    "Portfolio",
    "Side",
    "budget",
    "buy_size",
    "decode_fill",
    "decode_mark",
    "encode",
    "fill_price",
    "fmt",
    "to_decimal",
]

Side = Literal["buy", "sell"]

#: The context of every money operation: 60 digits, half-even; invalid operations, division by
#: zero and overflow raise.
MONEY = Context(prec=60, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, DivisionByZero, Overflow])
_DOWN = Context(prec=60, rounding=ROUND_DOWN, traps=[InvalidOperation, DivisionByZero, Overflow])

#: Sizes are multiples of 10^-SIZE_DECIMALS (rounded down).
SIZE_DECIMALS = 12
SIZE_QUANTUM = Decimal(1).scaleb(-SIZE_DECIMALS)

_ZERO = Decimal(0)
_ONE = Decimal(1)


def fmt(value: Decimal) -> str:
    """Canonical plain decimal string: no exponent, no trailing zeros, ``"0"`` for any zero.

    ``Decimal("1.2300") -> "1.23"``, ``Decimal("1E+3") -> "1000"``, ``Decimal("-0.0") -> "0"``.
    """
    if not value.is_finite():
        msg = f"cannot format {value!r}: not a finite number"
        raise ValueError(msg)
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def to_decimal(value: Decimal | str | int, *, what: str = "value") -> Decimal:
    """``value`` as a finite Decimal (strings are parsed exactly); ``ValueError`` otherwise."""
    if isinstance(value, float):  # not in the signature, but guard against silent float rounding
        msg = f"{what}: pass {value!r} as a string or Decimal, not a float"
        raise TypeError(msg)
    try:
        result = Decimal(value)
    except InvalidOperation:
        msg = f"{what}: {value!r} is not a decimal number"
        raise ValueError(msg) from None
    if not result.is_finite():
        msg = f"{what}: {value!r} is not a finite number"
        raise ValueError(msg)
    return result


def _is_canonical(text: str, *, signed: bool) -> bool:
    try:
        value = Decimal(text)
    except InvalidOperation:
        return False
    return value.is_finite() and fmt(value) == text and (signed or not value.is_signed())


def _check_money(struct: msgspec.Struct, *, unsigned: tuple[str, ...], signed: tuple[str, ...]) -> None:
    for name in unsigned + signed:
        text = getattr(struct, name)
        if not _is_canonical(text, signed=name in signed):
            kind = "decimal" if name in signed else "non-negative decimal"
            msg = f"{name}: {text!r} is not a canonical {kind} string (plain notation, no trailing zeros)"
            raise ValueError(msg)


def fill_price(side: Side, close: Decimal, slippage_bps: Decimal) -> Decimal:
    """The close moved against the bot: ``close * (1 + bps/10^4)`` for a buy, ``(1 - bps/10^4)`` for a sell."""
    slip = slippage_bps.scaleb(-4, MONEY)  # exact: bps / 10^4
    factor = MONEY.add(_ONE, slip) if side == "buy" else MONEY.subtract(_ONE, slip)
    return MONEY.multiply(close, factor)


def budget(sizing: Sizing, cash: Decimal) -> Decimal:
    """What a buy may spend, fee included: all the cash, a fraction of it, or a fixed amount (capped)."""
    if sizing == "all-in":
        return cash
    if isinstance(sizing, FractionSizing):
        return MONEY.multiply(sizing.fraction, cash)
    return min(sizing.quote, cash)


def buy_size(spend: Decimal, price: Decimal, fee_rate: Decimal) -> Decimal:
    """The largest multiple of ``SIZE_QUANTUM`` whose ``notional + fee`` fits in ``spend``.

    ``spend / (price * (1 + fee_rate))`` rounded down (the division itself rounds down, then
    the quotient is cut to ``SIZE_DECIMALS`` places). 0 when not even one quantum fits.
    """
    if spend <= 0:
        return _ZERO
    unit_cost = MONEY.multiply(price, MONEY.add(_ONE, fee_rate))
    size = _DOWN.divide(spend, unit_cost).quantize(SIZE_QUANTUM, rounding=ROUND_DOWN, context=_DOWN)
    # Belt and braces: with inputs beyond 60 digits a product could round up; never overspend.
    while size > 0 and _cost(size, price, fee_rate) > spend:
        size = MONEY.subtract(size, SIZE_QUANTUM)
    return size


def _cost(size: Decimal, price: Decimal, fee_rate: Decimal) -> Decimal:
    notional = MONEY.multiply(size, price)
    return MONEY.add(notional, MONEY.multiply(notional, fee_rate))


def _positive_close(bot: str, close: Decimal | str) -> Decimal:
    price = to_decimal(close, what=f"bot {bot!r}: close")
    if price <= 0:
        msg = f"bot {bot!r}: close must be positive, got {close!r}"
        raise ValueError(msg)
    return price


#: close string -> (its Decimal, its canonical text): the bots of a stream mark at the same closes.
_CLOSES: dict[str, tuple[Decimal, str]] = {}


def _close(bot: str, close: str) -> tuple[Decimal, str]:
    known = _CLOSES.get(close)
    if known is None:
        price = _positive_close(bot, close)
        if len(_CLOSES) >= 10_000:  # bounded: forget, re-learn
            _CLOSES.clear()
        known = _CLOSES[close] = (price, fmt(price))
    return known


def _check_costs(fee: Decimal, slippage_bps: Decimal) -> None:
    if not (fee.is_finite() and 0 <= fee < 1):
        msg = f"fee rate must be in [0, 1), got {fee!r}"
        raise ValueError(msg)
    if not (slippage_bps.is_finite() and 0 <= slippage_bps < 10_000):
        msg = f"slippage_bps must be in [0, 10000), got {slippage_bps!r}"
        raise ValueError(msg)


_Money = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
_EpochMs = Annotated[int, msgspec.Meta(ge=0)]


class Fill(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One virtual trade of a bot. Money and sizes are canonical decimal strings (see ``fmt``).

    ``seq`` is the bot's fill number (1-based), so ``(bot, seq)`` is a natural key, and so is
    ``(bot, ts, side)`` (one fill per candle at most). ``ts`` is the ``ts_close`` of the candle
    whose signal filled (epoch ms). ``price`` is the fill price (slippage included);
    ``realized_pnl`` is this fill's (``"0"`` for a buy).
    """

    bot: str
    seq: Annotated[int, msgspec.Meta(ge=1)]
    ts: _EpochMs
    side: Side
    price: _Money
    size: _Money
    notional: _Money
    fee: _Money
    cash_after: _Money
    position_after: _Money
    realized_pnl: _Money


class Mark(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A bot's portfolio valued at a candle's close: ``equity = cash + position * close``.

    ``unrealized_pnl = position * close - cost basis``; ``realized_pnl`` and ``fees_paid`` are
    cumulative since the bot started.
    """

    bot: str
    ts_close: _EpochMs
    close: _Money
    cash: _Money
    position: _Money
    equity: _Money
    unrealized_pnl: _Money
    realized_pnl: _Money
    fees_paid: _Money


@dataclass(slots=True)
class Portfolio:
    """A long-only virtual portfolio in one instrument: quote ``cash`` and a base ``position``.

    ``avg_entry`` is the fill price of the open position (``None`` when flat); ``cost_basis``
    is what opening it cost, fee included (0 when flat). ``realized_pnl`` and ``fees_paid`` are
    cumulative; ``num_trades`` counts fills. Mutable, picklable (the dataflow keeps it as state).
    """

    bot: str
    cash: Decimal
    position: Decimal = _ZERO
    avg_entry: Decimal | None = None
    cost_basis: Decimal = _ZERO
    realized_pnl: Decimal = _ZERO
    fees_paid: Decimal = _ZERO
    num_trades: int = 0
    #: cash, position, realized_pnl, fees_paid as text, kept between fills (``mark`` is per candle).
    _texts: tuple[str, str, str, str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.cash.is_finite() or self.cash < 0:
            msg = f"bot {self.bot!r}: cash must be a finite non-negative decimal, got {self.cash!r}"
            raise ValueError(msg)

    @classmethod
    def for_config(cls, config: BotConfig) -> Portfolio:
        """A fresh, flat portfolio holding the bot's ``initial_cash``."""
        return cls(bot=config.name, cash=config.initial_cash)

    @property
    def is_flat(self) -> bool:
        return self.position == 0

    def apply(
        self,
        action: Side,
        close: Decimal | str,
        ts: int,
        *,
        fee: Decimal,
        slippage_bps: Decimal,
        sizing: Sizing = "all-in",
    ) -> Fill | None:
        """Execute a signal at the candle's ``close`` (``ts`` = its ``ts_close``) by the fill rule.

        Returns the fill, or ``None`` when the signal does nothing (a buy while long or with a
        budget below one size quantum, a sell while flat). ``fee`` is the rate of the notional.
        """
        price_close = _positive_close(self.bot, close)
        _check_costs(fee, slippage_bps)
        if action == "buy":
            return self._buy(price_close, ts, fee=fee, slippage_bps=slippage_bps, sizing=sizing)
        if action == "sell":
            return self._sell(price_close, ts, fee=fee, slippage_bps=slippage_bps)
        msg = f"bot {self.bot!r}: unknown action {action!r}: expected 'buy' or 'sell'"
        raise ValueError(msg)

    def apply_for(self, config: BotConfig, action: Side, close: Decimal | str, ts: int) -> Fill | None:
        """``apply`` with the fee, slippage and sizing of ``config``."""
        return self.apply(
            action, close, ts, fee=config.fee, slippage_bps=config.slippage_bps, sizing=config.sizing
        )

    def mark(self, close: Decimal | str, ts: int) -> Mark:
        """The portfolio valued at ``close`` (the candle's ``ts_close`` is ``ts``)."""
        if isinstance(close, str):
            price, close_text = _close(self.bot, close)
        else:
            price = _positive_close(self.bot, close)
            close_text = fmt(price)
        texts = self._texts
        if texts is None:  # formatted once per fill, not once per candle
            texts = self._texts = (
                fmt(self.cash),
                fmt(self.position),
                fmt(self.realized_pnl),
                fmt(self.fees_paid),
            )
        cash, position, realized, fees = texts
        if self.position == 0:
            equity, unrealized = cash, "0"
        else:
            value = MONEY.multiply(self.position, price)
            equity, unrealized = fmt(MONEY.add(self.cash, value)), fmt(MONEY.subtract(value, self.cost_basis))
        return Mark(self.bot, ts, close_text, cash, position, equity, unrealized, realized, fees)

    def _buy(
        self, close: Decimal, ts: int, *, fee: Decimal, slippage_bps: Decimal, sizing: Sizing
    ) -> Fill | None:
        if self.position > 0:
            return None
        price = fill_price("buy", close, slippage_bps)
        size = buy_size(budget(sizing, self.cash), price, fee)
        if size == 0:
            return None
        notional = MONEY.multiply(size, price)
        fee_paid = MONEY.multiply(notional, fee)
        cost = MONEY.add(notional, fee_paid)
        self.cash = MONEY.subtract(self.cash, cost)
        self.position = size
        self.avg_entry = price
        self.cost_basis = cost
        self.fees_paid = MONEY.add(self.fees_paid, fee_paid)
        self.num_trades += 1
        return self._fill(ts, "buy", price, size, notional, fee_paid, _ZERO)

    def _sell(self, close: Decimal, ts: int, *, fee: Decimal, slippage_bps: Decimal) -> Fill | None:
        if self.position <= 0:
            return None
        price = fill_price("sell", close, slippage_bps)
        size = self.position
        notional = MONEY.multiply(size, price)
        fee_paid = MONEY.multiply(notional, fee)
        proceeds = MONEY.subtract(notional, fee_paid)
        realized = MONEY.subtract(proceeds, self.cost_basis)
        self.cash = MONEY.add(self.cash, proceeds)
        self.position = _ZERO
        self.avg_entry = None
        self.cost_basis = _ZERO
        self.realized_pnl = MONEY.add(self.realized_pnl, realized)
        self.fees_paid = MONEY.add(self.fees_paid, fee_paid)
        self.num_trades += 1
        return self._fill(ts, "sell", price, size, notional, fee_paid, realized)

    def _fill(
        self,
        ts: int,
        side: Side,
        price: Decimal,
        size: Decimal,
        notional: Decimal,
        fee: Decimal,
        realized: Decimal,
    ) -> Fill:
        self._texts = None
        return Fill(
            bot=self.bot,
            seq=self.num_trades,
            ts=ts,
            side=side,
            price=fmt(price),
            size=fmt(size),
            notional=fmt(notional),
            fee=fmt(fee),
            cash_after=fmt(self.cash),
            position_after=fmt(self.position),
            realized_pnl=fmt(realized),
        )


_encoder = msgspec.json.Encoder()
_fill_decoder = msgspec.json.Decoder(Fill)
_mark_decoder = msgspec.json.Decoder(Mark)

#: JSON bytes of a Fill, Mark (or any msgspec value).
encode = _encoder.encode


def decode_fill(data: bytes | str) -> Fill:
    """A Fill from JSON; every money field must be a canonical decimal string
    (``msgspec.ValidationError`` names the field). Fills made by a Portfolio are canonical by
    construction (``fmt``), so the check is made here, where strings come from outside."""
    fill = _fill_decoder.decode(data)
    _check_decoded(
        fill,
        unsigned=("price", "size", "notional", "fee", "cash_after", "position_after"),
        signed=("realized_pnl",),
    )
    return fill


def decode_mark(data: bytes | str) -> Mark:
    """A Mark from JSON, checked like :func:`decode_fill`."""
    mark = _mark_decoder.decode(data)
    _check_decoded(
        mark,
        unsigned=("close", "cash", "position", "equity", "fees_paid"),
        signed=("unrealized_pnl", "realized_pnl"),
    )
    return mark


def _check_decoded(struct: msgspec.Struct, *, unsigned: tuple[str, ...], signed: tuple[str, ...]) -> None:
    try:
        _check_money(struct, unsigned=unsigned, signed=signed)
    except ValueError as exc:
        raise msgspec.ValidationError(str(exc)) from None
