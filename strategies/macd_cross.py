"""``macd_cross``: trade the crossings of the MACD line and its signal line.

Rule, on each new final candle ``t`` once the MACD is ready on ``t - 1`` and ``t``:

* buy  when ``line[t-1] <= signal[t-1]`` and ``line[t] > signal[t]``;
* sell when ``line[t-1] >= signal[t-1]`` and ``line[t] < signal[t]``.

The MACD (TA-Lib alignment, see :class:`strategies.indicators.MACD`) is ready at candle index
``slow + signal - 2``, so the first possible signal is on candle index ``slow + signal - 1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from pydantic import Field, model_validator

from strategies.base import Action, Signal, Strategy, StrategyConfig
from strategies.indicators import MACD

if TYPE_CHECKING:
    from dataflows.candle_core import Candle

__all__ = ["MacdCross", "MacdCrossConfig"]


class MacdCrossConfig(StrategyConfig):
    """EMA periods of the MACD (``fast < slow``) and of its signal line, in candles."""

    fast: int = Field(default=12, ge=2, le=10_000, description="fast EMA period")
    slow: int = Field(default=26, ge=2, le=10_000, description="slow EMA period")
    signal: int = Field(default=9, ge=2, le=10_000, description="signal EMA period (of the MACD line)")

    @model_validator(mode="after")
    def _fast_below_slow(self) -> Self:
        if self.fast >= self.slow:
            msg = f"fast ({self.fast}) must be smaller than slow ({self.slow})"
            raise ValueError(msg)
        return self


class MacdCross(Strategy[MacdCrossConfig]):
    """Buy when the MACD line crosses above its signal line, sell when it crosses below."""

    name = "macd_cross"
    config_type = MacdCrossConfig

    def __init__(self, config: MacdCrossConfig) -> None:
        super().__init__(config)
        self._macd = MACD(config.fast, config.slow, config.signal)
        self._prev: tuple[float, float] | None = None

    def on_new_candle(self, candle: Candle) -> Signal | None:
        macd = self._macd
        if not macd.update(float(candle.close)):
            return None
        line = macd.line
        signal = macd.signal
        prev = self._prev
        self._prev = (line, signal)
        if prev is None:
            return None
        prev_line, prev_signal = prev
        if prev_line <= prev_signal and line > signal:
            return self._cross(candle, "buy", "above", prev_line, prev_signal)
        if prev_line >= prev_signal and line < signal:
            return self._cross(candle, "sell", "below", prev_line, prev_signal)
        return None

    def _cross(
        self, candle: Candle, action: Action, direction: str, prev_line: float, prev_signal: float
    ) -> Signal:
        macd = self._macd
        config = self.config
        return self.signal(
            candle,
            action,
            indicators={
                "macd": macd.line,
                "signal": macd.signal,
                "hist": macd.hist,
                "prev_macd": prev_line,
                "prev_signal": prev_signal,
            },
            reason=(
                f"macd({config.fast},{config.slow})={macd.line:.10g} crossed {direction} "
                f"signal({config.signal})={macd.signal:.10g}"
            ),
        )
