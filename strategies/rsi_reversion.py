"""``rsi_reversion``: buy when the RSI leaves the oversold zone, sell when it leaves overbought.

Rule, on each new final candle ``t`` once the RSI is ready on ``t - 1`` and ``t``:

* buy  when ``rsi[t-1] < oversold <= rsi[t]`` (crossing up through ``oversold``);
* sell when ``rsi[t-1] > overbought >= rsi[t]`` (crossing down through ``overbought``).

Wilder's RSI over ``period`` changes is ready at candle index ``period``, so the first possible
signal is on candle index ``period + 1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from pydantic import Field, model_validator

from strategies.base import Action, Signal, Strategy, StrategyConfig
from strategies.indicators import RSI

if TYPE_CHECKING:
    from dataflows.candle_core import Candle

__all__ = ["RsiReversion", "RsiReversionConfig"]


class RsiReversionConfig(StrategyConfig):
    """RSI period (changes) and the two thresholds, ``0 < oversold < overbought < 100``."""

    period: int = Field(default=14, ge=2, le=10_000, description="RSI period, in candles")
    oversold: float = Field(default=30.0, gt=0.0, lt=100.0, description="buy when RSI rises through this")
    overbought: float = Field(default=70.0, gt=0.0, lt=100.0, description="sell when RSI falls through this")

    @model_validator(mode="after")
    def _oversold_below_overbought(self) -> Self:
        if self.oversold >= self.overbought:
            msg = f"oversold ({self.oversold:g}) must be smaller than overbought ({self.overbought:g})"
            raise ValueError(msg)
        return self


class RsiReversion(Strategy[RsiReversionConfig]):
    """Mean reversion on the RSI: buy out of oversold, sell out of overbought."""

    name = "rsi_reversion"
    config_type = RsiReversionConfig

    def __init__(self, config: RsiReversionConfig) -> None:
        super().__init__(config)
        self._rsi = RSI(config.period)
        self._prev: float | None = None

    def on_new_candle(self, candle: Candle) -> Signal | None:
        rsi = self._rsi.update(float(candle.close))
        if rsi is None:
            return None
        prev = self._prev
        self._prev = rsi
        if prev is None:
            return None
        config = self.config
        if prev < config.oversold <= rsi:
            return self._signal(candle, "buy", f"rose through oversold {config.oversold:g}", rsi, prev)
        if prev > config.overbought >= rsi:
            return self._signal(candle, "sell", f"fell through overbought {config.overbought:g}", rsi, prev)
        return None

    def _signal(self, candle: Candle, action: Action, what: str, rsi: float, prev: float) -> Signal:
        period = self.config.period
        return self.signal(
            candle,
            action,
            indicators={"rsi": rsi, "prev_rsi": prev},
            reason=f"rsi({period}) {what}: {prev:.6g} -> {rsi:.6g}",
        )
