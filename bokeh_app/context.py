"""What every session of one server process shares: settings, login, the live hub, the I/O threads."""

from __future__ import annotations

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
    #: The pages of each open session (by document), for the data-health view and tests.
    pages: weakref.WeakKeyDictionary[Document, tuple[Any, ...]] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    @property
    def dsn(self) -> str:
        return self.settings.postgres_dsn.get_secret_value()


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
