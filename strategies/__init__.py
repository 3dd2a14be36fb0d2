"""Trading strategies over final candles: streaming indicators, the strategy API, the built-ins
and the registry (with ``tcp.strategies`` entry-point plug-ins). docs/strategies.md has the rules.
"""

from strategies.base import (
    Action,
    Signal,
    Strategy,
    StrategyConfig,
    decode_signal,
    encode_signal,
    params_hash,
)
from strategies.bollinger_breakout import BollingerBreakout, BollingerBreakoutConfig
from strategies.ema_crossover import EmaCrossover, EmaCrossoverConfig
from strategies.macd_cross import MacdCross, MacdCrossConfig
from strategies.registry import (
    ENTRY_POINT_GROUP,
    InvalidStrategyParams,
    UnknownStrategyError,
    available,
    get_strategy,
    make_strategy,
)
from strategies.rsi_reversion import RsiReversion, RsiReversionConfig

__all__ = [
    "ENTRY_POINT_GROUP",
    "Action",
    "BollingerBreakout",
    "BollingerBreakoutConfig",
    "EmaCrossover",
    "EmaCrossoverConfig",
    "InvalidStrategyParams",
    "MacdCross",
    "MacdCrossConfig",
    "RsiReversion",
    "RsiReversionConfig",
    "Signal",
    "Strategy",
    "StrategyConfig",
    "UnknownStrategyError",
    "available",
    "decode_signal",
    "encode_signal",
    "get_strategy",
    "make_strategy",
    "params_hash",
]
