"""ONE Redis pub/sub subscriber per server process, fanning messages out to the sessions.

The dataflows publish on ``market:{inst_id}`` (final and forming candles), ``status:{bot}`` and
``signals:{bot}`` (sinks/redis.py). A browser tab never gets a Redis or Kafka connection of its
own: each session registers a callback for the channels it shows, and :class:`LiveHub`'s one
thread calls the callbacks (which must only hand the message over to their document with
``doc.add_next_tick_callback``: they run on the hub's thread). A lost Redis connection is
retried with a capped backoff; sessions keep their callbacks meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from fnmatch import fnmatchcase

import redis

__all__ = ["PATTERNS", "Listener", "LiveHub"]

log = logging.getLogger(__name__)

#: The channel patterns the hub subscribes to (all the dashboard shows).
PATTERNS = ("market:*", "status:*", "signals:*")

#: A session's callback: (channel, message bytes). Called on the hub's thread.
Listener = Callable[[str, bytes], None]


class LiveHub:
    """Subscribes once (``PSUBSCRIBE`` to :data:`PATTERNS`) and calls every listener whose
    pattern matches a message's channel."""

    def __init__(self, redis_url: str, *, patterns: tuple[str, ...] = PATTERNS) -> None:
        self._url = redis_url
        self._patterns = patterns
        self._listeners: dict[int, tuple[str, Listener]] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.received = 0  # messages received (all channels), for the data-health view and tests

    def start(self) -> LiveHub:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tcp-dashboard-hub", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def listen(self, pattern: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` for each message on a channel matching ``pattern`` (fnmatch, e.g.
        ``market:BTC-USDT`` or ``status:*``); returns the function that stops it."""
        with self._lock:
            key = self._next_id
            self._next_id += 1
            self._listeners[key] = (pattern, listener)

        def stop() -> None:
            with self._lock:
                self._listeners.pop(key, None)

        return stop

    @property
    def listeners(self) -> int:
        with self._lock:
            return len(self._listeners)

    def _dispatch(self, channel: str, data: bytes) -> None:
        self.received += 1
        with self._lock:
            targets = [
                listener for pattern, listener in self._listeners.values() if fnmatchcase(channel, pattern)
            ]
        for listener in targets:
            try:
                listener(channel, data)
            except Exception:  # one broken session must not stop the others' updates
                log.exception("a dashboard session failed to take a message from %s", channel)

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            client = redis.Redis.from_url(self._url, socket_timeout=None, socket_connect_timeout=5)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(*self._patterns)
                delay = 0.5
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message["type"] == "pmessage":
                        channel = message["channel"]
                        self._dispatch(
                            channel.decode() if isinstance(channel, bytes) else channel, message["data"]
                        )
            except redis.RedisError as exc:
                log.warning("dashboard hub: Redis %s: %s; subscribing again in %.1f s", self._url, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
            finally:
                pubsub.close()
                client.close()
