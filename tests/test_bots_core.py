"""The pure core of virtual bots: config, fill rule, portfolio, lifecycle (no services)."""

from __future__ import annotations

import json
import pickle
import re
from decimal import Context, Decimal
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bots.config import (
    BotConfig,
    ConfigError,
    FractionSizing,
    QuoteSizing,
    Sizing,
    describe_validation_error,
    load_bots,
    parse_bots,
    with_params,
)
from bots.lifecycle import (
    BotEvent,
    Command,
    CommandError,
    RestartPolicy,
    decode_command,
    decode_event,
    is_stale,
    process_command,
    transition,
)
from bots.lifecycle import encode as encode_lifecycle
from bots.portfolio import (
    SIZE_QUANTUM,
    Fill,
    Mark,
    Portfolio,
    buy_size,
    decode_fill,
    decode_mark,
    encode,
    fill_price,
    fmt,
)

D = Decimal
#: The tests' own arithmetic: far more digits than any value here, so it is exact.
EXACT = Context(prec=200)


def total(*values: Decimal) -> Decimal:
    """An exact sum (the global context would round at 28 digits)."""
    result = D(0)
    for value in values:
        result = EXACT.add(result, value)
    return result


TS = 1_700_000_040_000
MINUTE = 60_000
INITIAL = D(10000)

EXAMPLE = {
    "name": "ema-btc",
    "strategy": "ema_crossover",
    "params": {"fast": 12, "slow": 26},
    "inst_id": "BTC-USDT",
    "timeframe": "1m",
    "fee": 0.001,
    "slippage_bps": 5,
    "initial_cash": 10000,
}


# --- fill rule: exact, hand-computed --------------------------------------------------------------


def test_buy_then_sell_exact_numbers() -> None:
    p = Portfolio(bot="b", cash=D(1000))
    buy = p.apply("buy", "100", TS, fee=D("0.001"), slippage_bps=D(5))
    assert buy is not None
    # fill price = 100 * (1 + 5/10^4) = 100.05; unit cost = 100.05 * 1.001 = 100.15005
    # size = 1000 / 100.15005 = 9.985017481269356... -> down to 12 places
    # notional = 9.985017481269 * 100.05; fee = notional * 0.001; cash = 1000 - notional - fee
    assert buy == Fill(
        bot="b",
        seq=1,
        ts=TS,
        side="buy",
        price="100.05",
        size="9.985017481269",
        notional="999.00099900096345",
        fee="0.99900099900096345",
        cash_after="0.00000000003558655",
        position_after="9.985017481269",
        realized_pnl="0",
    )
    assert p.avg_entry == D("100.05")
    assert p.cost_basis == D("999.99999999996441345")  # notional + fee
    sell = p.apply("sell", "110", TS + MINUTE, fee=D("0.001"), slippage_bps=D(5))
    assert sell is not None
    # fill price = 110 * (1 - 5/10^4) = 109.945; proceeds = notional - fee
    # realized = proceeds - cost basis = 1096.704944231177671345 - 999.99999999996441345 - ...
    assert sell == Fill(
        bot="b",
        seq=2,
        ts=TS + MINUTE,
        side="sell",
        price="109.945",
        size="9.985017481269",
        notional="1097.802746978120205",
        fee="1.097802746978120205",
        cash_after="1096.704944231177671345",
        position_after="0",
        realized_pnl="96.704944231177671345",
    )
    assert (p.position, p.avg_entry, p.cost_basis, p.num_trades) == (0, None, 0, 2)
    assert p.realized_pnl == D("96.704944231177671345")
    assert p.fees_paid == total(D("0.99900099900096345"), D("1.097802746978120205"))
    assert total(p.cash, D(-1000)) == p.realized_pnl


def test_buy_while_long_and_sell_while_flat_do_nothing() -> None:
    p = Portfolio(bot="b", cash=D(1000))
    fee, slip = D("0.001"), D(0)
    assert p.apply("sell", "100", TS, fee=fee, slippage_bps=slip) is None
    assert (p.cash, p.num_trades) == (D(1000), 0)
    assert p.apply("buy", "100", TS, fee=fee, slippage_bps=slip) is not None
    before = (p.cash, p.position, p.cost_basis, p.fees_paid, p.num_trades)
    assert p.apply("buy", "90", TS + MINUTE, fee=fee, slippage_bps=slip) is None
    assert (p.cash, p.position, p.cost_basis, p.fees_paid, p.num_trades) == before


def test_no_fee_no_slippage_buys_at_close() -> None:
    p = Portfolio(bot="b", cash=D(300))
    fill = p.apply("buy", "3", TS, fee=D(0), slippage_bps=D(0))
    assert fill is not None
    assert (fill.price, fill.size, fill.notional, fill.fee, fill.cash_after) == ("3", "100", "300", "0", "0")


def test_fraction_and_quote_sizing() -> None:
    half = Portfolio(bot="b", cash=D(1000))
    fill = half.apply("buy", "10", TS, fee=D(0), slippage_bps=D(0), sizing=FractionSizing(fraction=D("0.5")))
    assert fill is not None
    assert (fill.size, fill.cash_after) == ("50", "500")
    quote = Portfolio(bot="b", cash=D(1000))
    fill = quote.apply("buy", "10", TS, fee=D("0.25"), slippage_bps=D(0), sizing=QuoteSizing(quote=D(250)))
    assert fill is not None  # 250 / (10 * 1.25) = 20
    assert (fill.size, fill.notional, fill.fee, fill.cash_after) == ("20", "200", "50", "750")
    capped = Portfolio(bot="b", cash=D(100))
    fill = capped.apply("buy", "10", TS, fee=D(0), slippage_bps=D(0), sizing=QuoteSizing(quote=D(250)))
    assert fill is not None
    assert (fill.size, fill.cash_after) == ("10", "0")


def test_buy_that_cannot_afford_one_quantum_does_nothing() -> None:
    p = Portfolio(bot="b", cash=D("0.0000000001"))  # 10^-10 < 10^-12 * 1000
    assert p.apply("buy", "1000", TS, fee=D(0), slippage_bps=D(0)) is None
    assert p.num_trades == 0
    assert buy_size(D(0), D(1), D(0)) == 0


def test_fill_price_moves_against_the_bot() -> None:
    assert fill_price("buy", D("67000.1"), D(5)) == D("67033.60005")
    assert fill_price("sell", D("67000.1"), D(5)) == D("66966.59995")
    assert fill_price("buy", D("0.00000123"), D("2.5")) == D("0.00000123030750")
    assert fill_price("sell", D(100), D(0)) == D(100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"close": "0"}, "close must be positive"),
        ({"close": "abc"}, "is not a decimal number"),
        ({"close": "NaN"}, "is not a finite number"),
        ({"fee": D(1)}, "fee rate must be in [0, 1)"),
        ({"slippage_bps": D(-1)}, "slippage_bps must be in [0, 10000)"),
    ],
)
def test_apply_rejects_bad_inputs(kwargs: dict[str, object], message: str) -> None:
    p = Portfolio(bot="b", cash=D(1000))
    args: dict[str, object] = {"close": "100", "fee": D("0.001"), "slippage_bps": D(0)} | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        p.apply("buy", args["close"], TS, fee=args["fee"], slippage_bps=args["slippage_bps"])  # type: ignore[arg-type]


def test_mark_values_the_position_at_the_close() -> None:
    p = Portfolio(bot="b", cash=D(1000))
    assert p.mark("5", TS) == Mark(
        bot="b",
        ts_close=TS,
        close="5",
        cash="1000",
        position="0",
        equity="1000",
        unrealized_pnl="0",
        realized_pnl="0",
        fees_paid="0",
    )
    p.apply("buy", "10", TS, fee=D("0.25"), slippage_bps=D(0))  # size 80, notional 800, fee 200
    mark = p.mark("12", TS + MINUTE)
    assert (mark.cash, mark.position, mark.equity) == ("0", "80", "960")
    assert (mark.unrealized_pnl, mark.fees_paid) == ("-40", "200")  # 960 - (800 + 200)


def test_portfolio_for_config_and_apply_for_and_pickle() -> None:
    config = BotConfig.model_validate(EXAMPLE)
    p = Portfolio.for_config(config)
    assert (p.bot, p.cash, p.is_flat) == ("ema-btc", D(10000), True)
    fill = p.apply_for(config, "buy", "67000.1", TS)
    assert fill is not None
    assert fill.price == "67033.60005"
    assert fill.fee == fmt(EXACT.multiply(D(fill.notional), D("0.001")))
    clone = pickle.loads(pickle.dumps(p))
    assert clone == p
    assert clone is not p


def test_portfolio_rejects_negative_cash() -> None:
    with pytest.raises(ValueError, match="cash must be a finite non-negative decimal"):
        Portfolio(bot="b", cash=D(-1))


# --- fmt ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("1.2300", "1.23"),
        ("1E+3", "1000"),
        ("1.0E-7", "0.0000001"),
        ("-0.000", "0"),
        ("0E-12", "0"),
        ("-12.50", "-12.5"),
        ("100", "100"),
    ],
)
def test_fmt_examples(value: str, text: str) -> None:
    assert fmt(D(value)) == text


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_fmt_is_plain_canonical_and_exact(value: Decimal) -> None:
    text = fmt(value)
    assert "E" not in text and "e" not in text
    assert not ("." in text and text.endswith(("0", ".")))
    assert D(text) == value


def test_fmt_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match="not a finite number"):
        fmt(D("Infinity"))


# --- invariants over random signal sequences ----------------------------------------------------------

_START_PRICES = ["67000.1", "0.00000123", "3.5", "152.25"]
_SIG = Context(prec=10)  # random-walk prices keep 10 significant digits, like real quotes


@st.composite
def price_paths(draw: st.DrawFn) -> list[Decimal]:
    """A random walk: each close is the previous one moved by -10 % .. +10 % (10 significant digits).

    Bounded moves keep the numbers realistic (and far from 60 significant digits).
    """
    price = D(draw(st.sampled_from(_START_PRICES)))
    moves = draw(st.lists(st.integers(900, 1100), min_size=1, max_size=25))
    path = [price]
    for move in moves:
        price = _SIG.multiply(price, D(move).scaleb(-3))
        path.append(price)
    return path


actions = st.sampled_from(["buy", "sell", None])
fees = st.sampled_from([D(0), D("0.0001"), D("0.0008"), D("0.001"), D("0.0025"), D("0.0999")])
slippages = st.sampled_from([D(0), D(1), D("2.5"), D(5), D(1000)])
sizings: st.SearchStrategy[Sizing] = st.sampled_from(
    ["all-in", FractionSizing(fraction=D("0.5")), FractionSizing(fraction=D(1)), QuoteSizing(quote=D(2500))]
)


def _run(
    path: list[Decimal],
    signals: list[str | None],
    *,
    fee: Decimal,
    slippage_bps: Decimal,
    sizing: Sizing,
    cash: Decimal = INITIAL,
) -> tuple[Portfolio, list[Fill], list[Mark]]:
    p = Portfolio(bot="h", cash=cash)
    fills: list[Fill] = []
    marks: list[Mark] = []
    for i, (close, action) in enumerate(zip(path, signals, strict=False)):
        ts = TS + i * MINUTE
        if action is not None:
            fill = p.apply(action, close, ts, fee=fee, slippage_bps=slippage_bps, sizing=sizing)  # type: ignore[arg-type]
            if fill is not None:
                fills.append(fill)
        marks.append(p.mark(close, ts))
    return p, fills, marks


@settings(max_examples=150, deadline=None)
@given(path=price_paths(), data=st.data(), fee=fees, slippage_bps=slippages, sizing=sizings)
def test_portfolio_invariants(
    path: list[Decimal], data: st.DataObject, fee: Decimal, slippage_bps: Decimal, sizing: Sizing
) -> None:
    signals = data.draw(st.lists(actions, min_size=len(path), max_size=len(path)))
    initial = D(10000)
    p, fills, marks = _run(path, signals, fee=fee, slippage_bps=slippage_bps, sizing=sizing, cash=initial)
    for mark in marks:
        cash, position, close = D(mark.cash), D(mark.position), D(mark.close)
        assert cash >= 0
        assert position >= 0
        assert D(mark.equity) == EXACT.add(cash, EXACT.multiply(position, close))
        assert D(mark.equity) == total(initial, D(mark.realized_pnl), D(mark.unrealized_pnl))
    for seq, fill in enumerate(fills, start=1):
        assert fill.seq == seq
        notional, size, price = D(fill.notional), D(fill.size), D(fill.price)
        assert notional == EXACT.multiply(size, price)
        assert D(fill.fee) == EXACT.multiply(notional, fee)
        assert size > 0
        assert size == size.quantize(SIZE_QUANTUM, context=EXACT)
    sides = [fill.side for fill in fills]
    assert sides == ["buy", "sell"] * (len(sides) // 2) + ["buy"] * (len(sides) % 2)  # alternate
    assert p.fees_paid == total(*(D(fill.fee) for fill in fills))
    realized = total(*(D(fill.realized_pnl) for fill in fills))
    assert p.realized_pnl == realized
    if p.is_flat:
        assert total(p.cash, EXACT.minus(initial)) == realized


@settings(max_examples=100, deadline=None)
@given(path=price_paths(), data=st.data(), fee=fees, slippage_bps=slippages)
def test_each_fill_costs_exactly_its_fee_and_slippage(
    path: list[Decimal], data: st.DataObject, fee: Decimal, slippage_bps: Decimal
) -> None:
    """Valued at the candle's close, a fill lowers equity by exactly fee + size * |price - close|."""
    signals = data.draw(st.lists(actions, min_size=len(path), max_size=len(path)))
    p = Portfolio(bot="h", cash=D(10000))
    for i, (close, action) in enumerate(zip(path, signals, strict=True)):
        if action is None:
            continue
        before = D(p.mark(close, TS).equity)
        fill = p.apply(action, close, TS + i * MINUTE, fee=fee, slippage_bps=slippage_bps)  # type: ignore[arg-type]
        after = D(p.mark(close, TS).equity)
        if fill is None:
            assert after == before
            continue
        slip = EXACT.multiply(D(fill.size), EXACT.abs(EXACT.subtract(D(fill.price), close)))
        assert after == total(before, EXACT.minus(D(fill.fee)), EXACT.minus(slip))


@settings(max_examples=100, deadline=None)
@given(
    path=price_paths(),
    data=st.data(),
    fee=fees.filter(lambda fee: fee > 0),
    slippage_bps=slippages,
    sizing=sizings,
)
def test_fees_only_lower_equity(
    path: list[Decimal], data: st.DataObject, fee: Decimal, slippage_bps: Decimal, sizing: Sizing
) -> None:
    """The same signals with a fee never end a candle with more equity than without.

    (Exact in real numbers; with sizes rounded down to 10^-12 the two runs also keep dust below
    10^-12 * price, which these bounded random walks keep many orders below the fee's effect.)
    """
    signals = data.draw(st.lists(actions, min_size=len(path), max_size=len(path)))
    common = {"slippage_bps": slippage_bps, "sizing": sizing}
    _, _, with_fee = _run(path, signals, fee=fee, **common)  # type: ignore[arg-type]
    _, _, no_fee = _run(path, signals, fee=D(0), **common)  # type: ignore[arg-type]
    for paid, free in zip(with_fee, no_fee, strict=True):
        assert D(paid.equity) <= D(free.equity)
        assert D(paid.fees_paid) >= 0


@settings(max_examples=100, deadline=None)
@given(
    cash=st.decimals(min_value=D("0.01"), max_value=D(10**9), places=6),
    price=st.decimals(min_value=D("0.00000001"), max_value=D(10**6), places=8),
    fee=fees,
)
def test_all_in_size_is_the_largest_affordable(cash: Decimal, price: Decimal, fee: Decimal) -> None:
    size = buy_size(cash, price, fee)

    def cost(size: Decimal) -> Decimal:
        notional = EXACT.multiply(size, price)
        return EXACT.add(notional, EXACT.multiply(notional, fee))

    assert size >= 0
    assert size == size.quantize(SIZE_QUANTUM, context=EXACT)
    assert cost(size) <= cash
    assert cost(EXACT.add(size, SIZE_QUANTUM)) > cash


# --- config -----------------------------------------------------------------------------------------


def test_example_config_and_defaults() -> None:
    config = BotConfig.model_validate(EXAMPLE)
    assert config.fee == D("0.001")
    assert config.slippage_bps == D(5)
    assert config.initial_cash == D(10000)
    assert config.sizing == "all-in"
    assert config.long_only is True
    assert config.params == {"fast": 12, "slow": 26}
    minimal = BotConfig(name="m", strategy="s", inst_id="ETH-USDC", timeframe="1H")
    assert (minimal.timeframe, minimal.initial_cash, minimal.fee, minimal.slippage_bps) == (
        "1h",
        D(10000),
        D("0.001"),
        D(0),
    )
    assert minimal.params == {}


def test_params_keep_their_json_types() -> None:
    config = BotConfig.model_validate(EXAMPLE | {"params": {"a": True, "b": 2, "c": 0.5, "d": "x"}})
    assert config.params == {"a": True, "b": 2, "c": 0.5, "d": "x"}
    assert [type(v) for v in config.params.values()] == [bool, int, float, str]


def test_sizing_forms() -> None:
    assert BotConfig.model_validate(EXAMPLE | {"sizing": "all-in"}).sizing == "all-in"
    assert BotConfig.model_validate(EXAMPLE | {"sizing": {"fraction": 0.25}}).sizing == FractionSizing(
        fraction=D("0.25")
    )
    assert BotConfig.model_validate(EXAMPLE | {"sizing": {"quote": "500"}}).sizing == QuoteSizing(
        quote=D(500)
    )


def _error(data: dict[str, object]) -> str:
    with pytest.raises(ValidationError) as info:
        BotConfig.model_validate(data)
    return describe_validation_error(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"inst_id": "btc-usdt"}, "inst_id: 'btc-usdt' is not an instrument id"),
        ({"inst_id": "BTCUSDT"}, "inst_id: 'BTCUSDT' is not an instrument id"),
        ({"timeframe": "7m"}, "timeframe: invalid timeframe '7m': it must divide a day evenly"),
        ({"timeframe": "1w"}, "timeframe: invalid timeframe '1w': expected a number and a unit"),
        (
            {"long_only": False},
            "long_only: long_only=false is not supported yet: short selling is not implemented",
        ),
        ({"fee": 0.1}, "fee: Input should be less than 0.1"),
        ({"fee": -0.001}, "fee: Input should be greater than or equal to 0"),
        ({"slippage_bps": 1001}, "slippage_bps: Input should be less than or equal to 1000"),
        ({"initial_cash": 0}, "initial_cash: Input should be greater than 0"),
        ({"name": ""}, "name: a bot name must not be empty"),
        ({"name": "a b/c"}, "name: bot name 'a b/c' contains ' /': only letters, digits"),
        ({"name": "x" * 65}, "is 65 characters long; at most 64 allowed"),
        ({"params": {"a": [1]}}, "params.a: a parameter must be a number, a string or a boolean, got list"),
        (
            {"sizing": "half"},
            'sizing: sizing must be "all-in", {"fraction": x} with 0 < x <= 1, or {"quote": amount}',
        ),
        ({"sizing": {"fraction": 1.5}}, "Input should be less than or equal to 1"),
        ({"sizing": {"fraction": 0.5, "x": 1}}, "x: Extra inputs are not permitted"),
    ],
)
def test_config_errors_are_readable(change: dict[str, object], message: str) -> None:
    assert message in _error(EXAMPLE | change)


def test_config_missing_fields_and_frozen() -> None:
    text = _error({"name": "x"})
    assert "strategy: Field required" in text
    assert "inst_id: Field required" in text
    config = BotConfig.model_validate(EXAMPLE)
    with pytest.raises(ValidationError, match="frozen"):
        config.fee = D(0)


def test_with_params_replaces_and_validates() -> None:
    config = BotConfig.model_validate(EXAMPLE)
    updated = with_params(config, {"fast": 5})
    assert updated.params == {"fast": 5}
    assert updated.model_dump(exclude={"params"}) == config.model_dump(exclude={"params"})
    with pytest.raises(ValidationError, match="a parameter must be"):
        with_params(config, {"fast": [5]})  # type: ignore[dict-item]


def test_load_bots_list_and_single_object(tmp_path: Path) -> None:
    many = tmp_path / "bots.json"
    many.write_text(json.dumps([EXAMPLE, EXAMPLE | {"name": "ema-eth", "inst_id": "ETH-USDT"}]))
    assert [c.name for c in load_bots(many)] == ["ema-btc", "ema-eth"]
    one = tmp_path / "one.json"
    one.write_text(json.dumps(EXAMPLE))
    assert load_bots(one) == [BotConfig.model_validate(EXAMPLE)]


def test_load_bots_reads_numbers_exactly(tmp_path: Path) -> None:
    path = tmp_path / "bots.json"
    path.write_text(
        json.dumps(EXAMPLE).replace('"initial_cash": 10000', '"initial_cash": 10000.123456789012345678')
    )
    assert load_bots(path)[0].initial_cash == D("10000.123456789012345678")


def test_load_bots_errors_name_the_file_index_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bots.json"
    path.write_text(json.dumps([EXAMPLE, EXAMPLE | {"name": "b2", "fee": 0.5}]))
    with pytest.raises(ConfigError) as info:
        load_bots(path)
    assert str(info.value) == f"{path}: bot [1] ('b2'): fee: Input should be less than 0.1"

    path.write_text(json.dumps([EXAMPLE, EXAMPLE | {"inst_id": "ETH-USDT"}]))
    with pytest.raises(ConfigError) as info:
        load_bots(path)
    assert str(info.value) == f"{path}: bot [1]: duplicate name 'ema-btc' (already used by bot [0])"

    path.write_text('[{"name": "x",')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: invalid JSON at line 1 column")):
        load_bots(path)

    path.write_text('[{"name": "x", "fee": NaN}]')
    with pytest.raises(ConfigError, match="NaN is not a number in JSON"):
        load_bots(path)

    path.write_text("[1]")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: bot [0]: expected a JSON object, got int")):
        load_bots(path)

    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: cannot read the bot config file")):
        load_bots(missing)


def test_parse_bots_empty_list() -> None:
    assert parse_bots("[]") == []


# --- lifecycle ----------------------------------------------------------------------------------------

STATES = ["created", "running", "paused", "stopped", "failed"]
ALLOWED = {
    (None, "create"): "created",
    ("created", "start"): "running",
    ("stopped", "start"): "running",
    ("failed", "start"): "running",
    ("running", "pause"): "paused",
    ("paused", "resume"): "running",
    ("created", "stop"): "stopped",
    ("running", "stop"): "stopped",
    ("paused", "stop"): "stopped",
    ("failed", "stop"): "stopped",
    ("created", "update"): "created",
    ("paused", "update"): "paused",
    ("stopped", "update"): "stopped",
    ("failed", "update"): "failed",
    ("created", "fail"): "failed",
    ("running", "fail"): "failed",
    ("paused", "fail"): "failed",
    ("failed", "restart"): "running",
}
ALL_ACTIONS = ["create", "start", "pause", "resume", "stop", "update", "fail", "restart"]


@pytest.mark.parametrize(("state", "action"), list(ALLOWED))
def test_allowed_transitions(state: str | None, action: str) -> None:
    assert transition("x", state, action) == ALLOWED[state, action]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "action"),
    [(s, a) for s in [None, *STATES] for a in ALL_ACTIONS if (s, a) not in ALLOWED],
)
def test_rejected_transitions_say_why(state: str | None, action: str) -> None:
    with pytest.raises(CommandError) as info:
        transition("x", state, action)  # type: ignore[arg-type]
    reason = info.value.reason
    assert info.value.bot == "x"
    if action == "create":
        assert reason == f"cannot create bot 'x': it already exists (it is {state})"
    elif state is None:
        assert reason == f"cannot {action} bot 'x': there is no such bot (create it first)"
    else:
        needs = sorted(s for (s, a) in ALLOWED if a == action and s is not None)
        match = re.fullmatch(
            rf"cannot {action} bot 'x': it is (already )?{state} \({action} needs (.+)\)", reason
        )
        assert match is not None, reason
        assert sorted(re.split(r", | or ", match.group(2))) == needs


def test_rejection_reasons_examples() -> None:
    with pytest.raises(
        CommandError, match=re.escape("cannot pause bot 'x': it is stopped (pause needs running)")
    ):
        transition("x", "stopped", "pause")
    with pytest.raises(CommandError, match=re.escape("cannot stop bot 'x': it is already stopped")):
        transition("x", "stopped", "stop")
    with pytest.raises(
        CommandError,
        match=re.escape(
            "cannot update bot 'x': it is running (update needs created, paused, stopped or failed)"
        ),
    ):
        transition("x", "running", "update")
    with pytest.raises(CommandError, match="unknown action 'jump'"):
        transition("x", "running", "jump")  # type: ignore[arg-type]


def _command(action: str, **extra: object) -> bytes:
    return json.dumps({"id": "c1", "action": action, "bot": "ema-btc", "at": TS} | extra).encode()


def test_decode_commands() -> None:
    create = decode_command(_command("create", config=EXAMPLE, user="ana"))
    assert create.config == BotConfig.model_validate(EXAMPLE)
    assert (create.id, create.action, create.bot, create.at, create.user) == (
        "c1",
        "create",
        "ema-btc",
        TS,
        "ana",
    )
    update = decode_command(_command("update", params={"fast": 5, "ma": "ema", "k": 0.5, "on": True}))
    assert update.params == {"fast": 5, "ma": "ema", "k": 0.5, "on": True}
    for action in ["start", "pause", "resume", "stop"]:
        command = decode_command(_command(action))
        assert (command.action, command.config, command.params, command.user) == (action, None, None, None)


@pytest.mark.parametrize(
    ("raw", "reason", "command_id", "bot"),
    [
        (b"{", "invalid command: malformed JSON: Input data was truncated", None, None),
        (b"[]", "invalid command: Expected `object`, got `array`", None, None),
        (
            _command("jump"),
            "invalid command: unknown action 'jump': expected one of create, start, pause, resume, stop, update",
            "c1",
            "ema-btc",
        ),
        (
            b'{"id": "c1", "action": "start", "at": 1}',
            "invalid command: Object missing required field `bot`",
            "c1",
            None,
        ),
        (_command("create"), "invalid command: a create command needs a config", "c1", "ema-btc"),
        (
            _command("create", config={"name": "ema-btc"}),
            "invalid command: strategy: Field required; inst_id: Field required; timeframe: Field required - at `$.config`",
            "c1",
            "ema-btc",
        ),
        (
            _command("create", config=EXAMPLE | {"fee": 0.2}),
            "invalid command: fee: Input should be less than 0.1 - at `$.config`",
            "c1",
            "ema-btc",
        ),
        (
            _command("create", config=EXAMPLE | {"name": "other"}),
            "invalid command: the config's name 'other' differs from the command's bot 'ema-btc'",
            "c1",
            "ema-btc",
        ),
        (
            _command("start", config=EXAMPLE),
            "invalid command: a start command takes no config (only create does)",
            "c1",
            "ema-btc",
        ),
        (_command("update"), "invalid command: an update command needs params", "c1", "ema-btc"),
        (
            _command("stop", params={}),
            "invalid command: a stop command takes no params (only update does)",
            "c1",
            "ema-btc",
        ),
        (
            _command("update", params={"a": [1]}),
            "invalid command: Expected `bool | int | float | str`, got `array` - at `$.params[...]`",
            "c1",
            "ema-btc",
        ),
        (
            _command("start", extra=1),
            "invalid command: Object contains unknown field `extra`",
            "c1",
            "ema-btc",
        ),
        (
            _command("start", id=""),
            "invalid command: Expected `str` of length >= 1 - at `$.id`",
            "",
            "ema-btc",
        ),
        (_command("start", at=-1), "invalid command: Expected `int` >= 0 - at `$.at`", "c1", "ema-btc"),
        (
            _command("start", bot="a b"),
            "invalid command: bot name 'a b' contains ' ': only letters, digits, '.', '_' and '-' are allowed",
            "c1",
            "a b",
        ),
    ],
)
def test_decode_command_errors(raw: bytes, reason: str, command_id: str | None, bot: str | None) -> None:
    with pytest.raises(CommandError) as info:
        decode_command(raw)
    assert (info.value.reason, info.value.command_id, info.value.bot) == (reason, command_id, bot)


def test_process_command_accepts_and_rejects() -> None:
    start = decode_command(_command("start"))
    ok = process_command("created", start, at=TS + 1)
    assert ok == BotEvent(
        bot="ema-btc", command_id="c1", action="start", ok=True, state="running", reason=None, at=TS + 1
    )
    rejected = process_command("running", start, at=TS + 2)
    assert rejected == BotEvent(
        bot="ema-btc",
        command_id="c1",
        action="start",
        ok=False,
        state="running",
        reason="cannot start bot 'ema-btc': it is already running (start needs created, stopped or failed)",
        at=TS + 2,
    )
    update = decode_command(_command("update", params={"fast": 5}))
    assert process_command("paused", update, at=TS).state == "paused"
    create = decode_command(_command("create", config=EXAMPLE))
    assert process_command(None, create, at=TS).state == "created"
    assert process_command(None, start, at=TS).state is None


def test_restart_policy_three_per_hour() -> None:
    policy = RestartPolicy()
    hour = 3_600_000
    t0 = TS
    history: list[int] = []
    for i in range(3):
        now = t0 + i * 60_000
        assert policy.allow(history, now)
        history.append(now)
    assert not policy.allow(history, t0 + 10 * 60_000)  # a 4th within the hour: refused
    assert policy.allowed_at(history, t0 + 10 * 60_000) == t0 + hour
    assert not policy.allow(history, t0 + hour - 1)
    assert policy.allow(history, t0 + hour)  # the first restart left the window
    assert policy.recent(history, t0 + hour) == [t0 + 60_000, t0 + 120_000]
    assert policy.allowed_at(history, t0 + hour) == t0 + hour
    assert policy.allow(history, t0 + 10 * hour)


def test_restart_policy_validation_and_zero() -> None:
    never = RestartPolicy(max_restarts=0)
    assert not never.allow([], TS)
    with pytest.raises(ValueError, match="never allowed"):
        never.allowed_at([], TS)
    with pytest.raises(ValueError, match="max_restarts must be >= 0"):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError, match="window_ms must be > 0"):
        RestartPolicy(window_ms=0)


def test_is_stale() -> None:
    assert not is_stale(TS, TS + 30_000, 30_000)
    assert is_stale(TS, TS + 30_001, 30_000)
    assert is_stale(None, TS, 30_000)
    with pytest.raises(ValueError, match="stale_after_ms must be > 0"):
        is_stale(TS, TS, 0)


# --- JSON round trips --------------------------------------------------------------------------------


def test_fill_and_mark_round_trip() -> None:
    p = Portfolio(bot="b", cash=D(1000))
    fill = p.apply("buy", "100", TS, fee=D("0.001"), slippage_bps=D(5))
    assert fill is not None
    data = encode(fill)
    assert decode_fill(data) == fill
    assert json.loads(data)["price"] == "100.05"
    mark = p.mark("101", TS)
    assert decode_mark(encode(mark)) == mark


def test_fill_and_mark_reject_non_canonical_money() -> None:
    p = Portfolio(bot="b", cash=D(1000))
    fill = p.apply("buy", "100", TS, fee=D("0.001"), slippage_bps=D(5))
    assert fill is not None
    good = json.loads(encode(fill))
    for field, value in [("price", "100.050"), ("fee", "1E-3"), ("size", "-1"), ("cash_after", "abc")]:
        with pytest.raises(
            msgspec.ValidationError, match=f"{field}: '{re.escape(value)}' is not a canonical"
        ):
            decode_fill(json.dumps(good | {field: value}))
    assert decode_fill(json.dumps(good | {"realized_pnl": "-1.5"})).realized_pnl == "-1.5"
    mark = json.loads(encode(p.mark("101", TS)))
    with pytest.raises(msgspec.ValidationError, match="unrealized_pnl"):
        decode_mark(json.dumps(mark | {"unrealized_pnl": "1.0"}))


def test_command_and_event_round_trip() -> None:
    commands = [
        decode_command(_command("create", config=EXAMPLE | {"sizing": {"fraction": 0.5}}, user="ana")),
        decode_command(_command("update", params={"fast": 5, "k": 0.5})),
        decode_command(_command("pause")),
    ]
    for command in commands:
        assert decode_command(encode_lifecycle(command)) == command
    built = Command(id="c9", action="create", bot="ema-btc", at=TS, config=BotConfig.model_validate(EXAMPLE))
    assert decode_command(encode_lifecycle(built)) == built
    assert json.loads(encode_lifecycle(built))["config"]["fee"] == "0.001"  # exact decimal string
    event = BotEvent(bot="b", command_id="c1", action="pause", ok=False, state="stopped", reason="why", at=TS)
    assert decode_event(encode_lifecycle(event)) == event
    supervisor = BotEvent(
        bot="b", command_id=None, action="restart", ok=True, state="running", reason=None, at=TS
    )
    assert decode_event(encode_lifecycle(supervisor)) == supervisor


def test_command_constructor_checks_cross_fields() -> None:
    with pytest.raises(ValueError, match="a create command needs a config"):
        Command(id="c", action="create", bot="b", at=TS)
    with pytest.raises(ValueError, match="an update command needs params"):
        Command(id="c", action="update", bot="b", at=TS)
