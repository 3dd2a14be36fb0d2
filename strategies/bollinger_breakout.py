"""``bollinger_breakout``: buy a close breaking above the upper band, sell when it falls back
below the middle band.

Rule, on each new final candle ``t`` once the bands are ready on ``t - 1`` and ``t`` (bands
include the candle's own close):

* buy  when ``close[t-1] <= upper[t-1]`` and ``close[t] > upper[t]``;
* sell when ``close[t-1] >= middle[t-1]`` and ``close[t] < middle[t]``.

The bands (``SMA(period) +/- k`` population standard deviations) are ready at candle index
``period - 1``, so the first possible signal is on candle index ``period``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from strategies.base import Signal, Strategy, StrategyConfig
from strategies.indicators import BollingerBands

if TYPE_CHECKING:
    from dataflows.candle_core import Candle

__all__ = ["BollingerBreakout", "BollingerBreakoutConfig"]


class BollingerBreakoutConfig(StrategyConfig):
    """Band period (candles) and width ``k`` (population standard deviations)."""

    period: int = Field(default=20, ge=2, le=10_000, description="SMA/stddev window, in candles")
    k: float = Field(default=2.0, gt=0.0, le=10.0, description="band width, in standard deviations")


class BollingerBreakout(Strategy[BollingerBreakoutConfig]):
    """Breakout: buy above the upper band, exit (sell) below the middle band."""

    name = "bollinger_breakout"
    config_type = BollingerBreakoutConfig

    def __init__(self, config: BollingerBreakoutConfig) -> None:
        super().__init__(config)
        self._bands = BollingerBands(config.period, k=config.k)
        self._prev: tuple[float, float, float] | None = None  # close, upper, middle

    def on_new_candle(self, candle: Candle) -> Signal | None:
        close = float(candle.close)
        bands = self._bands
        if not bands.update(close):
            return None
        upper = bands.upper
        middle = bands.middle
        prev = self._prev
        self._prev = (close, upper, middle)
        if prev is None:
            return None
        prev_close, prev_upper, prev_middle = prev
        config = self.config
        if prev_close <= prev_upper and close > upper:
            return self.signal(
                candle,
                "buy",
                indicators=self._indicators(close, prev_close, prev_upper, prev_middle),
                reason=(
                    f"close={close:.10g} crossed above upper band={upper:.10g} "
                    f"(bb({config.period},{config.k:g}))"
                ),
            )
        if prev_close >= prev_middle and close < middle:
            return self.signal(
                candle,
                "sell",
                indicators=self._indicators(close, prev_close, prev_upper, prev_middle),
                reason=(
                    f"close={close:.10g} crossed below middle band={middle:.10g} "
                    f"(bb({config.period},{config.k:g}))"
                ),
            )
        return None

    def _indicators(
        self, close: float, prev_close: float, prev_upper: float, prev_middle: float
    ) -> dict[str, float]:
        bands = self._bands
        return {
            "close": close,
            "upper": bands.upper,
            "middle": bands.middle,
            "lower": bands.lower,
            "prev_close": prev_close,
            "prev_upper": prev_upper,
            "prev_middle": prev_middle,
        }
