"""What every trade source yields, so a new exchange plugs in without touching the dataflows.

A source is an object with ``name`` and an async ``batches()`` iterator. Each batch is a list of
``Trade`` and ``DeadLetter`` items in arrival order: one OKX push, one chunk of a file, one
simulated burst. Batching keeps the per-trade overhead off the hot path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from tcp.schemas import DeadLetter, Trade

__all__ = ["Batch", "TradeSource"]

Batch = list[Trade | DeadLetter]


class TradeSource(Protocol):
    name: str

    def batches(self) -> AsyncIterator[Batch]: ...
