"""``ema_crossover``: trade the crossings of a fast and a slow EMA of the close.

Rule, on each new final candle ``t`` once both EMAs are ready on ``t - 1`` and ``t``:

* buy  when ``fast[t-1] <= slow[t-1]`` and ``fast[t] > slow[t]``;
* sell when ``fast[t-1] >= slow[t-1]`` and ``fast[t] < slow[t]``.

The slow EMA is ready at the ``slow``-th candle (index ``slow - 1``), so the first possible
signal is on candle index ``slow``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from pydantic import Field, model_validator

from strategies.base import Action, Signal, Strategy, StrategyConfig
from strategies.indicators import EMA

if TYPE_CHECKING:
    from dataflows.candle_core import Candle

__all__ = ["EmaCrossover", "EmaCrossoverConfig"]


class EmaCrossoverConfig(StrategyConfig):
    """``fast`` and ``slow`` EMA periods (candles), ``fast < slow``."""

    fast: int = Field(default=12, ge=2, le=10_000, description="fast EMA period, in candles")
    slow: int = Field(default=26, ge=2, le=10_000, description="slow EMA period, in candles")

    @model_validator(mode="after")
    def _fast_below_slow(self) -> Self:
        if self.fast >= self.slow:
            msg = f"fast ({self.fast}) must be smaller than slow ({self.slow})"
            raise ValueError(msg)
        return self


class EmaCrossover(Strategy[EmaCrossoverConfig]):
    """Buy when the fast EMA crosses above the slow one, sell when it crosses below."""

    name = "ema_crossover"
    config_type = EmaCrossoverConfig

    def __init__(self, config: EmaCrossoverConfig) -> None:
        super().__init__(config)
        self._fast = EMA(config.fast)
        self._slow = EMA(config.slow)
        self._prev: tuple[float, float] | None = None

    def on_new_candle(self, candle: Candle) -> Signal | None:
        close = float(candle.close)
        fast = self._fast.update(close)
        slow = self._slow.update(close)
        if fast is None or slow is None:
            return None
        prev = self._prev
        self._prev = (fast, slow)
        if prev is None:
            return None
        prev_fast, prev_slow = prev
        if prev_fast <= prev_slow and fast > slow:
            return self._cross(candle, "buy", "above", fast, slow, prev_fast, prev_slow)
        if prev_fast >= prev_slow and fast < slow:
            return self._cross(candle, "sell", "below", fast, slow, prev_fast, prev_slow)
        return None

    def _cross(
        self,
        candle: Candle,
        action: Action,
        direction: str,
        fast: float,
        slow: float,
        prev_fast: float,
        prev_slow: float,
    ) -> Signal:
        config = self.config
        return self.signal(
            candle,
            action,
            indicators={"fast": fast, "slow": slow, "prev_fast": prev_fast, "prev_slow": prev_slow},
            reason=f"ema({config.fast})={fast:.10g} crossed {direction} ema({config.slow})={slow:.10g}",
        )
