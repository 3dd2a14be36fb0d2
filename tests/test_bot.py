"""bots.bot.Bot: strategy + portfolio + lifecycle as one unit (pure: no services)."""

from __future__ import annotations

import copy
import pickle
from decimal import Decimal

import msgspec
import pytest

from bots.bot import SUPERVISOR, Bot, decode_status, encode_status
from bots.config import BotConfig, ConfigError
from bots.lifecycle import Command, RestartPolicy
from bots.portfolio import Portfolio
from dataflows.candle_core import Candle
from strategies.registry import make_strategy
from tests.test_strategies import make_candles, random_closes

CONFIG = BotConfig(
    name="ema-btc",
    strategy="ema_crossover",
    params={"fast": 3, "slow": 8},
    inst_id="BTC-USDT",
    timeframe="1m",
    fee=Decimal("0.001"),
    slippage_bps=Decimal(5),
    initial_cash=Decimal(10000),
)


def command(
    action: str, *, user: str | None = None, params: dict[str, int] | None = None, n: int = 0
) -> Command:
    return Command(id=f"c{n}-{action}", action=action, bot=CONFIG.name, at=1, user=user, params=params)  # type: ignore[arg-type]


def running_bot() -> Bot:
    bot = Bot.create(CONFIG, at=1)
    assert bot.on_command(command("start"), at=2).ok
    return bot


def candles(n: int = 400, seed: int = 3) -> list[Candle]:
    return make_candles(random_closes(n, seed=seed, scale=40_000.0, vol=0.01))


def test_a_running_bot_trades_exactly_what_its_strategy_and_the_fill_rule_say() -> None:
    """The bot equals the plain loop: the same strategy class, the same portfolio, by hand."""
    bot = running_bot()
    strategy = make_strategy("ema_crossover", {"fast": 3, "slow": 8})
    portfolio = Portfolio.for_config(CONFIG)
    want_signals, want_fills, want_equity = [], [], []
    got_signals, got_fills, got_equity = [], [], []
    for candle in candles():
        signal = strategy.on_candle(candle)
        if signal is not None:
            want_signals.append(signal)
            fill = portfolio.apply_for(CONFIG, signal.action, candle.close, candle.ts_close)
            if fill is not None:
                want_fills.append(fill)
        want_equity.append(portfolio.mark(candle.close, candle.ts_close).equity)
        step = bot.on_candle(candle)
        if step.signal is not None:
            got_signals.append(step.signal)
        if step.fill is not None:
            got_fills.append(step.fill)
        assert step.mark is not None
        got_equity.append(step.mark.equity)
    assert len(want_fills) >= 4
    assert (got_signals, got_fills, got_equity) == (want_signals, want_fills, want_equity)


def test_paused_keeps_signalling_without_trading_and_stopped_does_nothing() -> None:
    bot = running_bot()
    series = candles()
    for candle in series[:100]:
        bot.on_candle(candle)
    assert bot.on_command(command("pause"), at=3).state == "paused"
    cash, position = bot.portfolio.cash, bot.portfolio.position
    paused = [bot.on_candle(c) for c in series[100:300]]
    assert any(step.signal is not None for step in paused)
    assert all(step.fill is None and step.mark is not None for step in paused)
    assert (bot.portfolio.cash, bot.portfolio.position) == (cash, position)
    assert bot.on_command(command("stop"), at=4).state == "stopped"
    assert all(bot.on_candle(c).mark is None for c in series[300:])


def test_other_streams_duplicates_and_revisions_are_ignored() -> None:
    bot = running_bot()
    series = candles(50)
    steps = [bot.on_candle(c) for c in series]
    assert all(s.mark is not None for s in steps)
    again = bot.on_candle(series[-1])  # a duplicate of the last candle
    revised = bot.on_candle(msgspec.structs.replace(series[-2], close="1", revision=1))
    other = bot.on_candle(msgspec.structs.replace(series[-1], inst_id="ETH-USDT", ts_close=2**40))
    assert again.mark is None and revised.mark is None and other.mark is None


def test_a_strategy_that_raises_fails_its_bot_and_the_supervisor_restarts_it_at_most_3_times_an_hour() -> (
    None
):
    bot = running_bot()
    bot.strategy = _Exploding(bot.strategy)  # type: ignore[assignment]
    step = bot.on_candle(candles(1)[0])
    assert step.mark is None and bot.state == "failed"
    assert bot.reason is not None and "RuntimeError: boom" in bot.reason
    policy = RestartPolicy(max_restarts=3, window_ms=3_600_000)
    hour = 3_600_000
    for i, at in enumerate((10, 20, 30)):
        event = bot.on_command(command("start", user=SUPERVISOR, n=i), at=at, policy=policy)
        assert event.ok and bot.state == "running"
        bot.fail("again", at=at)
    refused = bot.on_command(command("start", user=SUPERVISOR, n=9), at=40, policy=policy)
    assert not refused.ok and refused.reason is not None and "restarted 3 times" in refused.reason
    assert bot.state == "failed"
    # A user may start it by hand; the supervisor may again once the hour has passed.
    assert bot.on_command(command("start", user=SUPERVISOR, n=10), at=10 + hour, policy=policy).ok


class _Exploding:
    def __init__(self, inner: object) -> None:
        self.inner = inner

    def on_candle(self, candle: Candle) -> None:
        msg = "boom"
        raise RuntimeError(msg)


def test_update_replaces_params_and_rejects_bad_ones_with_the_reason() -> None:
    bot = Bot.create(CONFIG, at=1)
    bad = bot.on_command(command("update", params={"fast": 30, "slow": 8}), at=2)
    assert not bad.ok and bad.reason is not None and "fast" in bad.reason
    good = bot.on_command(command("update", params={"fast": 5, "slow": 20}), at=3)
    assert good.ok and bot.config.params == {"fast": 5, "slow": 20}
    assert bot.strategy.config.model_dump() == {"fast": 5, "slow": 20}
    create = Command(id="c-create", action="create", bot=CONFIG.name, at=4, config=CONFIG)
    assert not bot.on_command(create, at=4).ok  # exists already
    with pytest.raises(ConfigError, match="unknown|no strategy|not"):
        Bot.create(CONFIG.model_copy(update={"strategy": "no_such_strategy"}))


def test_a_bot_snapshots_mid_series_and_continues_identically() -> None:
    series = candles()
    whole = running_bot()
    for c in series:
        whole.on_candle(c)
    bot = running_bot()
    for c in series[:173]:
        bot.on_candle(c)
    for clone in (pickle.loads(pickle.dumps(bot)), copy.deepcopy(bot)):
        for c in series[173:]:
            clone.on_candle(c)
        assert clone.portfolio == whole.portfolio and clone.last_mark == whole.last_mark


def test_status_round_trips_as_json() -> None:
    bot = running_bot()
    for c in candles(100):
        bot.on_candle(c)
    status = bot.status(now=123)
    assert decode_status(encode_status(status)) == status
    assert status.state == "running" and status.heartbeat == 123 and status.equity == bot.last_mark.equity  # type: ignore[union-attr]
    assert BotConfig.model_validate_json(status.config) == CONFIG
