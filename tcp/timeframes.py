"""Time rules: timeframes and the close-time labels of candles.

A candle is labelled by its CLOSE time: the candle stamped ``T`` with timeframe ``d`` holds the
trades with ``T - d <= ts < T``. Epoch 0 is a UTC midnight, so every timeframe that divides a
day lines up with UTC midnight. OKX labels the same candle by its open time ``T - d``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

__all__ = [
    "close_of",
    "ms_to_datetime",
    "now_ms",
    "parse_timeframe",
    "timeframe_name",
]

_UNITS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_TIMEFRAME = re.compile(r"^([1-9][0-9]{0,3})([smhdSHD])$")
_DAY_MS = 86_400_000


def parse_timeframe(name: str) -> int:
    """``"1m"`` -> 60000. Accepts s, m, h, d (OKX's ``1H``/``1D`` too); must divide a day or be days."""
    match = _TIMEFRAME.match(name)
    if match is None:
        msg = f"invalid timeframe {name!r}: expected a number and a unit s, m, h or d (e.g. 1m, 4h, 1d)"
        raise ValueError(msg)
    ms = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if ms < _DAY_MS and _DAY_MS % ms != 0 or ms > _DAY_MS and ms % _DAY_MS != 0:
        msg = f"invalid timeframe {name!r}: it must divide a day evenly or be whole days"
        raise ValueError(msg)
    return ms


def timeframe_name(name: str) -> str:
    """The canonical spelling: ``"1H"`` -> ``"1h"``."""
    parse_timeframe(name)
    return name.lower()


def close_of(ts_ms: int, timeframe_ms: int) -> int:
    """The close-time label of the candle that holds a trade at ``ts_ms``."""
    return (ts_ms // timeframe_ms + 1) * timeframe_ms


def ms_to_datetime(ts_ms: int) -> datetime:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)


def now_ms() -> int:
    return int(datetime.now(tz=UTC).timestamp() * 1000)
