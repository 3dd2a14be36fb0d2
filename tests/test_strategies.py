"""Strategies: exact signals on hand-built series, config validation, the registry and its
entry-point plug-ins, no lookahead, duplicates ignored, snapshot/restore, Signal JSON."""

from __future__ import annotations

import copy
import hashlib
import logging
import pickle
import random
import sys
import textwrap
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path

import msgspec
import numpy as np
import pytest
import talib
from pydantic import ValidationError

from dataflows.candle_core import Candle
from strategies import (
    BollingerBreakout,
    BollingerBreakoutConfig,
    EmaCrossover,
    EmaCrossoverConfig,
    InvalidStrategyParams,
    MacdCross,
    MacdCrossConfig,
    RsiReversion,
    RsiReversionConfig,
    Signal,
    Strategy,
    StrategyConfig,
    UnknownStrategyError,
    available,
    decode_signal,
    encode_signal,
    get_strategy,
    make_strategy,
    params_hash,
    registry,
)

START_MS = 1_710_028_800_000  # 2024-03-10 00:00 UTC
STEP_MS = 60_000


def fmt(x: float) -> str:
    """An exact plain decimal string for a float (as the candle dataflow would write)."""
    text = format(Decimal(repr(x)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def make_candles(
    closes: Sequence[float], *, inst_id: str = "BTC-USDT", timeframe: str = "1m", start: int = START_MS
) -> list[Candle]:
    """Candles with the given closes, ``ts_close = start + (i + 1) * 60000``, open = previous close."""
    candles = []
    prev = closes[0]
    for i, close in enumerate(closes):
        candles.append(
            Candle(
                inst_id=inst_id,
                timeframe=timeframe,
                ts_close=start + (i + 1) * STEP_MS,
                open=fmt(prev),
                high=fmt(max(prev, close)),
                low=fmt(min(prev, close)),
                close=fmt(close),
                volume="1",
                quote_volume=fmt(close),
                trade_count=1,
            )
        )
        prev = close
    return candles


def random_closes(n: int, *, seed: int, scale: float = 100.0, vol: float = 0.01) -> list[float]:
    rng = random.Random(seed)
    price = scale
    out = []
    for _ in range(n):
        price *= 1.0 + rng.gauss(0.0, vol)
        out.append(price)
    return out


def run(strategy: Strategy[StrategyConfig], candles: Sequence[Candle]) -> list[Signal]:
    return [s for c in candles if (s := strategy.on_candle(c)) is not None]


def summary(signals: Sequence[Signal]) -> list[tuple[int, str]]:
    return [(s.ts_close, s.action) for s in signals]


def ts(i: int) -> int:
    """The ts_close of candle index ``i`` from :func:`make_candles`."""
    return START_MS + (i + 1) * STEP_MS


# Small periods so the random series below give many signals of every strategy.
STRATEGY_PARAMS: list[tuple[str, dict[str, object]]] = [
    ("ema_crossover", {"fast": 3, "slow": 8}),
    ("macd_cross", {"fast": 4, "slow": 9, "signal": 3}),
    ("rsi_reversion", {"period": 5, "oversold": 35, "overbought": 65}),
    ("bollinger_breakout", {"period": 10, "k": 1.5}),
]
STRATEGY_IDS = [name for name, _ in STRATEGY_PARAMS]


# --------------------------------------------------------------------------------------------
# Hand-built series: the exact signal at the exact candle
# --------------------------------------------------------------------------------------------


def test_ema_crossover_exact_signals() -> None:
    closes = [10.0] * 6 + [13.0] * 4 + [7.0] * 2
    strategy = EmaCrossover(EmaCrossoverConfig(fast=2, slow=4))
    signals = run(strategy, make_candles(closes))
    assert summary(signals) == [(ts(6), "buy"), (ts(10), "sell")]
    buy, sell = signals
    assert buy.price == "13" and sell.price == "7"
    assert buy.indicators == pytest.approx({"fast": 12.0, "slow": 11.2, "prev_fast": 10.0, "prev_slow": 10.0})
    assert buy.reason == "ema(2)=12 crossed above ema(4)=11.2"
    assert sell.reason.startswith("ema(2)=8.98765432") and "crossed below ema(4)=10.36672" in sell.reason
    assert buy.strategy == "ema_crossover" and buy.params_hash == strategy.params_hash
    assert (buy.inst_id, buy.timeframe) == ("BTC-USDT", "1m")


def test_ema_crossover_no_signal_before_warm_up() -> None:
    # The fast EMA is above the slow one from the first ready candle (index 3) on: no crossing
    # happens after warm-up, so no signal, although fast > slow throughout.
    closes = [10.0, 10.0, 13.0, 13.0, 13.0, 13.0, 13.0, 13.0]
    assert run(EmaCrossover(EmaCrossoverConfig(fast=2, slow=4)), make_candles(closes)) == []
    # A crossing at the first ready candle (index 3) itself needs a previous ready pair: none.
    closes = [10.0, 10.0, 10.0, 13.0, 13.0, 13.0]
    assert run(EmaCrossover(EmaCrossoverConfig(fast=2, slow=4)), make_candles(closes)) == []


def test_macd_cross_exact_signals() -> None:
    closes = [10.0] * 6 + [12.0] * 4 + [8.0] * 2
    signals = run(MacdCross(MacdCrossConfig(fast=2, slow=3, signal=2)), make_candles(closes))
    # The step up lifts the line above its signal at once; the line then falls back towards 0
    # faster than its EMA and crosses below it two candles later.
    assert summary(signals) == [(ts(6), "buy"), (ts(8), "sell")]
    line, signal, hist = talib.MACD(np.array(closes), 2, 3, 2)
    for sig, i in zip(signals, (6, 8), strict=True):
        assert sig.indicators["macd"] == pytest.approx(line[i], rel=1e-12)
        assert sig.indicators["signal"] == pytest.approx(signal[i], rel=1e-12)
        assert sig.indicators["hist"] == pytest.approx(hist[i], rel=1e-12)
    assert signals[0].reason.startswith("macd(2,3)=0.3333333333 crossed above signal(2)=0.2222222222")


def test_macd_cross_no_signal_before_warm_up() -> None:
    # MACD(2, 3, 2) is ready at index 3 (slow + signal - 2) with line == signal (both 1/3: the
    # step at index 2 is inside the seeds); the first comparable pair is (3, 4), where the line
    # drops below its signal: a sell at index 4, the earliest index a signal can have.
    closes = [10.0, 10.0, 12.0, 12.0, 12.0, 12.0]
    strategy = MacdCross(MacdCrossConfig(fast=2, slow=3, signal=2))
    results = [strategy.on_candle(c) for c in make_candles(closes)]
    assert results[:4] == [None] * 4
    assert summary([s for s in results if s is not None]) == [(ts(4), "sell")]
    assert (
        results[4] is not None and results[4].indicators["prev_macd"] == results[4].indicators["prev_signal"]
    )


def test_rsi_reversion_exact_signals() -> None:
    closes = [10.0, 9.0, 8.0, 7.0, 6.0, 8.0, 9.0, 10.0, 11.0, 12.0, 9.0, 8.0]
    config = RsiReversionConfig(period=3, oversold=30, overbought=70)
    signals = run(RsiReversion(config), make_candles(closes))
    # RSI: idx3 0, idx4 0, idx5 50 (up through 30: buy), idx7 74 (up through 70: no signal),
    # idx9 87.6, idx10 36.4 (down through 70: sell).
    assert summary(signals) == [(ts(5), "buy"), (ts(10), "sell")]
    rsi = talib.RSI(np.array(closes), 3)
    assert signals[0].indicators == pytest.approx({"rsi": 50.0, "prev_rsi": 0.0})
    assert signals[1].indicators == pytest.approx({"rsi": rsi[10], "prev_rsi": rsi[9]}, rel=1e-12)
    assert signals[0].reason == "rsi(3) rose through oversold 30: 0 -> 50"
    assert signals[1].reason == "rsi(3) fell through overbought 70: 87.6448 -> 36.4074"


def test_rsi_reversion_threshold_equality() -> None:
    """prev < oversold <= now: landing exactly on the threshold counts, starting on it does not."""
    strategy = RsiReversion(RsiReversionConfig(period=2, oversold=50, overbought=90))
    # RSI(2): idx2 0 (two falls), idx3: gain 1 and loss 0.5 -> avg gain 0.5, loss 0.5 -> 50.
    closes = [10.0, 9.0, 8.0, 9.0]
    signals = run(strategy, make_candles(closes))
    assert summary(signals) == [(ts(3), "buy")]
    assert signals[0].indicators["rsi"] == 50.0


def test_bollinger_breakout_exact_signals() -> None:
    closes = [10.0] * 6 + [15.0, 15.0, 15.0, 9.0, 9.0]
    signals = run(BollingerBreakout(BollingerBreakoutConfig(period=5, k=1.5)), make_candles(closes))
    # idx6: mean 11, stddev 2, upper 14 < 15 (buy); idx9: 9 < middle 12.8 (sell).
    assert summary(signals) == [(ts(6), "buy"), (ts(9), "sell")]
    buy, sell = signals
    assert buy.indicators["upper"] == pytest.approx(14.0) and buy.indicators["middle"] == pytest.approx(11.0)
    assert buy.indicators["prev_close"] == 10.0 and buy.indicators["prev_upper"] == pytest.approx(10.0)
    assert sell.indicators["middle"] == pytest.approx(12.8) and sell.indicators[
        "prev_middle"
    ] == pytest.approx(13.0)
    assert buy.reason == "close=15 crossed above upper band=14 (bb(5,1.5))"


def test_bollinger_breakout_no_signal_before_warm_up() -> None:
    closes = [10.0, 10.0, 10.0, 30.0, 10.0, 10.0]  # the spike is inside the first window
    assert run(BollingerBreakout(BollingerBreakoutConfig(period=5, k=1.5)), make_candles(closes)) == []


def test_signal_price_is_the_exact_close_string() -> None:
    closes = random_closes(400, seed=3, scale=1e-8, vol=0.03)  # PEPE-like prices
    candles = make_candles(closes, inst_id="PEPE-USDT")
    signals = run(make_strategy("ema_crossover", {"fast": 3, "slow": 8}), candles)
    assert signals
    by_ts = {c.ts_close: c for c in candles}
    for signal in signals:
        assert signal.price == by_ts[signal.ts_close].close
        assert "e" not in signal.price and signal.price.startswith("0.0000000")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def test_config_defaults() -> None:
    assert EmaCrossoverConfig() == EmaCrossoverConfig(fast=12, slow=26)
    assert MacdCrossConfig().model_dump() == {"fast": 12, "slow": 26, "signal": 9}
    assert RsiReversionConfig().model_dump() == {"period": 14, "oversold": 30.0, "overbought": 70.0}
    assert BollingerBreakoutConfig().model_dump() == {"period": 20, "k": 2.0}


@pytest.mark.parametrize(
    ("config_type", "params", "message"),
    [
        (EmaCrossoverConfig, {"fast": 26, "slow": 12}, r"fast \(26\) must be smaller than slow \(12\)"),
        (EmaCrossoverConfig, {"fast": 5, "slow": 5}, r"fast \(5\) must be smaller than slow \(5\)"),
        (EmaCrossoverConfig, {"fast": 1}, r"fast\n  Input should be greater than or equal to 2"),
        (EmaCrossoverConfig, {"slow": 10_001}, r"slow\n  Input should be less than or equal to 10000"),
        (EmaCrossoverConfig, {"fats": 3}, r"fats\n  Extra inputs are not permitted"),
        (MacdCrossConfig, {"fast": 30}, r"fast \(30\) must be smaller than slow \(26\)"),
        (MacdCrossConfig, {"signal": 1}, r"signal\n  Input should be greater than or equal to 2"),
        (
            RsiReversionConfig,
            {"oversold": 70, "overbought": 30},
            r"oversold \(70\) must be smaller than overbought \(30\)",
        ),
        (RsiReversionConfig, {"overbought": 100}, r"overbought\n  Input should be less than 100"),
        (RsiReversionConfig, {"period": "x"}, r"period\n  Input should be a valid integer"),
        (BollingerBreakoutConfig, {"k": 0}, r"k\n  Input should be greater than 0"),
        (BollingerBreakoutConfig, {"period": 1}, r"period\n  Input should be greater than or equal to 2"),
    ],
)
def test_config_validation_errors(
    config_type: type[StrategyConfig], params: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        config_type.model_validate(params)


def test_config_is_frozen() -> None:
    config = EmaCrossoverConfig(fast=3, slow=8)
    with pytest.raises(ValidationError, match="frozen"):
        config.fast = 4


def test_params_hash() -> None:
    config = EmaCrossoverConfig(fast=3, slow=8)
    expected = hashlib.sha256(b'{"fast":3,"slow":8}').hexdigest()[:16]
    assert config.params_hash == params_hash(config) == expected
    assert EmaCrossover(config).params_hash == expected
    assert EmaCrossoverConfig.model_validate({"slow": 8, "fast": 3}).params_hash == expected  # key order
    assert EmaCrossoverConfig(fast=3, slow=9).params_hash != expected
    # floats are canonical: k=2 and k=2.0 are the same parameter set
    assert BollingerBreakoutConfig(k=2).params_hash == BollingerBreakoutConfig(k=2.0).params_hash
    assert len(expected) == 16 and int(expected, 16) >= 0


def test_strategy_rejects_a_foreign_config() -> None:
    with pytest.raises(TypeError, match="EmaCrossover needs a EmaCrossoverConfig, got MacdCrossConfig"):
        EmaCrossover(MacdCrossConfig())  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    registry.clear_cache()
    yield
    registry.clear_cache()


def test_registry_builtins(fresh_registry: None) -> None:
    found = available()
    assert {"ema_crossover", "macd_cross", "rsi_reversion", "bollinger_breakout"} <= set(found)
    assert get_strategy("macd_cross") is MacdCross
    strategy = make_strategy("rsi_reversion", {"period": 7})
    assert isinstance(strategy, RsiReversion)
    assert strategy.config == RsiReversionConfig(period=7)
    assert make_strategy("bollinger_breakout").config == BollingerBreakoutConfig()
    found.clear()  # a copy: the registry is not changed
    assert "macd_cross" in available()


def test_registry_errors(fresh_registry: None) -> None:
    with pytest.raises(UnknownStrategyError) as info:
        get_strategy("ema_cross")
    assert str(info.value) == (
        "unknown strategy 'ema_cross'; available: bollinger_breakout, ema_crossover, macd_cross, rsi_reversion"
    )
    with pytest.raises(UnknownStrategyError, match="unknown strategy 'nope'"):
        make_strategy("nope", {})
    with pytest.raises(InvalidStrategyParams) as bad:
        make_strategy("ema_crossover", {"fast": 30, "slow": 20})
    assert (
        str(bad.value)
        == "invalid params for strategy 'ema_crossover': fast (30) must be smaller than slow (20)"
    )
    with pytest.raises(InvalidStrategyParams) as bad:
        make_strategy("ema_crossover", {"fast": 1, "speed": 3})
    assert str(bad.value) == (
        "invalid params for strategy 'ema_crossover': fast: Input should be greater than or equal to 2 "
        "(got 1); speed: Extra inputs are not permitted (got 3)"
    )
    assert isinstance(bad.value.__cause__, ValidationError)


PLUGIN_MODULE = """
from __future__ import annotations

from pydantic import Field

from strategies import Signal, Strategy, StrategyConfig


class EveryNthConfig(StrategyConfig):
    n: int = Field(default=2, ge=1)


class EveryNth(Strategy[EveryNthConfig]):
    name = "every_nth"
    config_type = EveryNthConfig

    def __init__(self, config: EveryNthConfig) -> None:
        super().__init__(config)
        self.count = 0

    def on_new_candle(self, candle) -> Signal | None:
        self.count += 1
        if self.count % self.config.n:
            return None
        return self.signal(candle, "buy", indicators={"count": float(self.count)}, reason="every nth")


class Misnamed(EveryNth):
    name = "something_else"


class NotAStrategy:
    pass
"""

PLUGIN_ENTRY_POINTS = """
[tcp.strategies]
every_nth = tcp_plugin_demo:EveryNth
broken_import = tcp_plugin_missing_module:Nope
not_a_strategy = tcp_plugin_demo:NotAStrategy
misnamed = tcp_plugin_demo:Misnamed
ema_crossover = tcp_plugin_demo:EveryNth
"""


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None) -> Iterator[Path]:
    """An 'installed' distribution with a tcp.strategies entry point, on sys.path."""
    (tmp_path / "tcp_plugin_demo.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    dist_info = tmp_path / "tcp_plugin_demo-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: tcp-plugin-demo\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(PLUGIN_ENTRY_POINTS.lstrip())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("tcp_plugin_demo", None)


def test_registry_finds_entry_point_plugins(plugin_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="strategies.registry"):
        found = available()
    plugin = found["every_nth"]
    assert plugin.__module__ == "tcp_plugin_demo" and plugin.name == "every_nth"
    assert found["ema_crossover"] is EmaCrossover  # a plug-in cannot replace a built-in
    for skipped in ("broken_import", "not_a_strategy", "misnamed"):
        assert skipped not in found
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert "'broken_import' (tcp_plugin_missing_module:Nope) skipped: it failed to load" in messages
    assert "'not_a_strategy' (tcp_plugin_demo:NotAStrategy) skipped: " in messages
    assert "is not a Strategy subclass" in messages
    assert "Misnamed.name is 'something_else', not the entry-point name 'misnamed'" in messages
    assert "'ema_crossover' (tcp_plugin_demo:EveryNth) skipped: the name is already taken" in messages

    strategy = make_strategy("every_nth", {"n": 3})
    signals = run(strategy, make_candles([1.0] * 9))
    assert summary(signals) == [(ts(2), "buy"), (ts(5), "buy"), (ts(8), "buy")]
    with pytest.raises(
        InvalidStrategyParams, match=r"'every_nth': n: Input should be greater than or equal to 1"
    ):
        make_strategy("every_nth", {"n": 0})


def test_registry_cache_is_cleared(plugin_dir: Path) -> None:
    registry.clear_cache()
    assert "every_nth" in available()
    sys.path.remove(str(plugin_dir))
    assert "every_nth" in available()  # cached
    registry.clear_cache()
    assert "every_nth" not in available()
    sys.path.insert(0, str(plugin_dir))  # monkeypatch restores sys.path afterwards


# --------------------------------------------------------------------------------------------
# Causality, duplicates, snapshots
# --------------------------------------------------------------------------------------------


def _series(seed: int, n: int = 600) -> list[Candle]:
    return make_candles(random_closes(n, seed=seed, vol=0.012))


@pytest.mark.parametrize(("name", "params"), STRATEGY_PARAMS, ids=STRATEGY_IDS)
def test_no_lookahead(name: str, params: dict[str, object]) -> None:
    """Signals up to a cut never depend on what comes after it: the signals of a truncated series,
    and of the same prefix followed by a different future, equal the full series' up to the cut."""
    candles = _series(seed=11)
    full = run(make_strategy(name, params), candles)
    assert len(full) >= 5, "the series should give this strategy several signals"
    actions = {s.action for s in full}
    assert actions == {"buy", "sell"}
    other_future = _series(seed=12, n=100)
    for cut in range(1, len(candles), 17):
        cut_ts = candles[cut - 1].ts_close
        expected = [s for s in full if s.ts_close <= cut_ts]
        assert run(make_strategy(name, params), candles[:cut]) == expected
        shifted = [
            msgspec.structs.replace(c, ts_close=cut_ts + (i + 1) * STEP_MS)
            for i, c in enumerate(other_future)
        ]
        altered = run(make_strategy(name, params), candles[:cut] + shifted)
        assert [s for s in altered if s.ts_close <= cut_ts] == expected


@pytest.mark.parametrize(("name", "params"), STRATEGY_PARAMS, ids=STRATEGY_IDS)
def test_duplicates_and_revisions_are_ignored(name: str, params: dict[str, object]) -> None:
    candles = _series(seed=21, n=400)
    clean = run(make_strategy(name, params), candles)
    assert clean
    rng = random.Random(5)
    strategy = make_strategy(name, params)
    noisy: list[Signal] = []
    for i, candle in enumerate(candles):
        if (signal := strategy.on_candle(candle)) is not None:
            noisy.append(signal)
        state = pickle.dumps(strategy)
        replays = [candle, msgspec.structs.replace(candle, close=fmt(float(candle.close) * 1.5), revision=1)]
        if i:
            replays.append(candles[rng.randrange(i)])  # an older candle
        for replay in rng.sample(replays, k=rng.randint(1, len(replays))):
            assert strategy.on_candle(replay) is None
        assert pickle.dumps(strategy) == state  # ignored candles leave no trace
    assert noisy == clean


def test_candles_of_another_stream_are_rejected() -> None:
    strategy = make_strategy("ema_crossover", {"fast": 2, "slow": 3})
    strategy.on_candle(make_candles([1.0])[0])
    with pytest.raises(ValueError, match="handles BTC-USDT 1m candles, got one of ETH-USDT 1m"):
        strategy.on_candle(make_candles([1.0, 2.0], inst_id="ETH-USDT")[1])
    with pytest.raises(ValueError, match="handles BTC-USDT 1m candles, got one of BTC-USDT 5m"):
        strategy.on_candle(make_candles([1.0], timeframe="5m")[0])


@pytest.mark.parametrize(("name", "params"), STRATEGY_PARAMS, ids=STRATEGY_IDS)
def test_snapshot_restore_mid_series(name: str, params: dict[str, object]) -> None:
    candles = _series(seed=31, n=300)
    uninterrupted = run(make_strategy(name, params), candles)
    assert uninterrupted
    for cut in (0, 1, 5, 9, 10, 11, 57, 150, 299):
        strategy = make_strategy(name, params)
        before = run(strategy, candles[:cut])
        for restored in (pickle.loads(pickle.dumps(strategy)), copy.deepcopy(strategy)):
            assert type(restored) is type(strategy) and restored.last_ts_close == strategy.last_ts_close
            assert before + run(restored, candles[cut:]) == uninterrupted


# --------------------------------------------------------------------------------------------
# Signal messages
# --------------------------------------------------------------------------------------------


def test_signal_json_round_trip() -> None:
    candles = _series(seed=41, n=300)
    signals = [s for name, params in STRATEGY_PARAMS for s in run(make_strategy(name, params), candles)]
    assert len(signals) > 10
    for signal in signals:
        data = encode_signal(signal)
        assert decode_signal(data) == signal
        assert decode_signal(data.decode()) == signal
    one = signals[0]
    assert msgspec.json.decode(encode_signal(one))["ts_close"] == one.ts_close


def test_signal_decoding_validates() -> None:
    signal = Signal(
        strategy="x",
        params_hash="0123456789abcdef",
        inst_id="BTC-USDT",
        timeframe="1m",
        ts_close=START_MS,
        action="buy",
        price="42000.5",
        indicators={"a": 1.5},
        reason="r",
    )
    data = msgspec.json.decode(encode_signal(signal))
    with pytest.raises(msgspec.ValidationError, match="Invalid enum value 'hold'"):
        decode_signal(msgspec.json.encode({**data, "action": "hold"}))
    with pytest.raises(msgspec.ValidationError, match="unknown field `extra`"):
        decode_signal(msgspec.json.encode({**data, "extra": 1}))
    with pytest.raises(msgspec.ValidationError, match="Object missing required field `reason`"):
        decode_signal(msgspec.json.encode({k: v for k, v in data.items() if k != "reason"}))
    with pytest.raises(AttributeError):
        signal.action = "sell"  # type: ignore[misc]
