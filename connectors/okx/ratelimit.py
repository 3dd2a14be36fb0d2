"""A sliding-window rate limiter for asyncio: at most N events in any window of W seconds.

OKX states its limits this way ("20 requests per 2 seconds", "3 new connections per second"),
and counts them on a sliding window, so a fixed-bucket limiter could burst 2N across a bucket
edge and be refused.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

__all__ = ["SlidingWindowLimiter"]


class SlidingWindowLimiter:
    """``await acquire()`` returns once one more event fits in the window, and records it.

    Waiters are served in arrival order (one lock), so no caller starves. Create it and use it
    from one event loop.
    """

    def __init__(
        self, max_events: int, window_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_events < 1 or window_s <= 0:
            msg = f"need max_events >= 1 and window_s > 0, got {max_events} and {window_s}"
            raise ValueError(msg)
        self.max_events = max_events
        self.window_s = window_s
        self._clock = clock
        self._events: deque[float] = deque()
        self._lock = asyncio.Lock()

    def _expire(self, now: float) -> None:
        while self._events and now - self._events[0] >= self.window_s:
            self._events.popleft()

    def delay(self) -> float:
        """Seconds until one more event would fit (0 when it fits now)."""
        now = self._clock()
        self._expire(now)
        if len(self._events) < self.max_events:
            return 0.0
        return self._events[0] + self.window_s - now

    async def acquire(self) -> None:
        async with self._lock:
            while (wait := self.delay()) > 0:
                await asyncio.sleep(wait)
            self._events.append(self._clock())
