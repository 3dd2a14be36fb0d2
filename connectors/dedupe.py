"""De-duplication of trades by (inst_id, trade_id), with bounded memory."""

from __future__ import annotations

from collections import deque

__all__ = ["RecentTradeIds"]


class RecentTradeIds:
    """Remembers the last ``capacity`` trade ids of each instrument.

    OKX re-sends the last trade after a subscribe, and a REST backfill overlaps the WebSocket
    stream: both repeat recent ids, so a window of recent ids per instrument is enough, and
    memory stays bounded however long the connector runs.
    """

    def __init__(self, capacity: int = 50_000) -> None:
        if capacity < 1:
            msg = f"capacity must be at least 1, got {capacity}"
            raise ValueError(msg)
        self._capacity = capacity
        self._seen: dict[str, set[int]] = {}
        self._order: dict[str, deque[int]] = {}

    def add(self, inst_id: str, trade_id: int) -> bool:
        """Record the id; True when it is new, False for a duplicate."""
        seen = self._seen.get(inst_id)
        if seen is None:
            seen = self._seen[inst_id] = set()
            self._order[inst_id] = deque()
        if trade_id in seen:
            return False
        seen.add(trade_id)
        order = self._order[inst_id]
        order.append(trade_id)
        if len(order) > self._capacity:
            seen.discard(order.popleft())
        return True

    def __contains__(self, key: tuple[str, int]) -> bool:
        seen = self._seen.get(key[0])
        return seen is not None and key[1] in seen
