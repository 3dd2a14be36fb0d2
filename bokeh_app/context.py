"""What every session of one server process shares: settings, login, the live hub, the I/O threads."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from bokeh.document import Document

from bokeh_app.auth import Credentials
from bokeh_app.hub import LiveHub
from tcp.config import Settings

__all__ = ["AppContext", "choices", "in_background"]

T = TypeVar("T")


@dataclass
class AppContext:
    """Made once per server process (``bokeh_app.server``), handed to every session."""

    settings: Settings
    credentials: Credentials
    hub: LiveHub
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="tcp-io")
    )
    #: Each open session (bokeh_app.app.Session) by document, for tests and the health view.
    pages: weakref.WeakKeyDictionary[Document, Any] = field(default_factory=weakref.WeakKeyDictionary)
    #: What bokeh_app.app.Prefetch read for a session about to be made, by session id.
    prefetched: dict[str, Any] = field(default_factory=dict)
    #: The last history of each stream as chart columns (bokeh_app.market.chart_columns), for
    #: the next session that shows the same rows.
    history: dict[tuple[str, str], Any] = field(default_factory=dict)

    _cache: dict[str, tuple[float, Any]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def dsn(self) -> str:
        return self.settings.postgres_dsn.get_secret_value()

    def shared(self, key: str, ttl_s: float, load: Callable[[], T]) -> T:
        """``load()``'s result, shared by every session of this server for ``ttl_s``: what every
        open tab polls (the bots table, the health figures) costs one query per period, not one
        per tab. Blocking: call it on the I/O threads."""
        now = time.monotonic()
        with self._lock:
            found = self._cache.get(key)
        if found is not None and now - found[0] < ttl_s:
            return found[1]
        value = load()
        with self._lock:
            self._cache[key] = (now, value)
        return value


def in_background(
    ctx: AppContext, doc: Document, work: Callable[[], T], then: Callable[[T], None],
    failed: Callable[[Exception], None] | None = None,
) -> Future[T]:  # fmt: skip
    """Run blocking ``work`` on the I/O threads; hand its result to ``then`` (or the exception to
    ``failed``) on the document's next tick: Bokeh callbacks never block on I/O."""

    def done(future: Future[T]) -> None:
        error = future.exception()
        if error is None:
            doc.add_next_tick_callback(partial(then, future.result()))
        elif failed is not None and isinstance(error, Exception):
            doc.add_next_tick_callback(partial(failed, error))

    future = ctx.executor.submit(work)
    future.add_done_callback(done)
    return future


def choices(values: Iterable[str]) -> list[str | tuple[Any, str]]:
    """A Select's options (Bokeh types them as a list of values or (value, label) pairs)."""
    return list(values)
