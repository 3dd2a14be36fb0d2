"""OKX public REST for trades: ``history-trades`` pages and the gap backfill after a reconnect.

Standard library only (``urllib.request`` run in a worker thread): one GET every few minutes
does not justify an HTTP client dependency. Requests go through a sliding-window limiter set
to OKX's 20 requests / 2 s for this endpoint; a refusal (``50011`` / HTTP 429), a 5xx, a body
that is not OKX JSON or a network error is retried with capped exponential backoff and jitter.
Any other OKX error code is final and raised as :class:`OkxRestError`.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import random
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from connectors.okx.parse import BAD_RESPONSE, RestError, RestTrades, parse_rest_trades
from connectors.okx.ratelimit import SlidingWindowLimiter
from tcp.schemas import DeadLetter, Trade

__all__ = ["HISTORY_TRADES_PATH", "OkxRestClient", "OkxRestError", "RestStats"]

log = logging.getLogger(__name__)

HISTORY_TRADES_PATH = "/api/v5/market/history-trades"
#: history-trades: "limit ≤ 100, 20 requests / 2 s". The window gets a small margin, so requests
#: that arrive bunched by the network still fit the server's window.
HISTORY_LIMIT = 100
HISTORY_RATE = (20, 2.1)
_USER_AGENT = "tcp-dashboard/0.1 (+okx connector)"


class OkxRestError(RuntimeError):
    """A REST request failed for good: an OKX error code, or retries exhausted."""

    def __init__(self, code: str, msg: str, *, url: str) -> None:
        self.code, self.msg, self.url = code, msg, url
        super().__init__(f"OKX REST {url}: code {code}: {msg}")


@dataclass
class RestStats:
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    dead_letters: int = 0


def _http_get(url: str, timeout_s: float) -> tuple[int, bytes]:
    """Blocking GET: (HTTP status, body). HTTP error statuses are answers too (OKX puts JSON in them)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # scheme checked in __init__
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _retry_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Capped exponential backoff with jitter (half to all of the step), ``attempt`` from 1."""
    step = min(max_s, base_s * 2 ** (attempt - 1))
    return step * random.uniform(0.5, 1.0)


class OkxRestClient:
    """Async client for OKX's public trade history, safe to share between tasks of one loop."""

    def __init__(
        self,
        base_url: str,
        *,
        limiter: SlidingWindowLimiter | None = None,
        timeout_s: float = 10.0,
        max_attempts: int = 6,
        retry_base_s: float = 0.5,
        retry_max_s: float = 10.0,
        max_backfill_trades: int = 100_000,
    ) -> None:
        scheme = urllib.parse.urlsplit(base_url).scheme
        if scheme not in ("http", "https"):
            msg = f"OKX REST base URL must be http(s)://..., got {base_url!r}"
            raise ValueError(msg)
        self.base_url = base_url.rstrip("/")
        self.limiter = limiter or SlidingWindowLimiter(*HISTORY_RATE)
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.max_backfill_trades = max_backfill_trades
        self.stats = RestStats()
        self._dead_letters: list[DeadLetter] = []

    def take_dead_letters(self) -> list[DeadLetter]:
        """The dead letters found in pages since the last call (items that failed validation)."""
        taken, self._dead_letters = self._dead_letters, []
        return taken

    async def history_trades(
        self, inst_id: str, *, after: int | None = None, limit: int = HISTORY_LIMIT
    ) -> list[Trade]:
        """One page of ``history-trades`` by tradeId, newest first; ``after`` = only ids older than it."""
        params = {"instId": inst_id, "type": "1", "limit": str(max(1, min(limit, HISTORY_LIMIT)))}
        if after is not None:
            params["after"] = str(after)
        url = f"{self.base_url}{HISTORY_TRADES_PATH}?{urllib.parse.urlencode(params)}"
        page = await self._get_trades(url, inst_id)
        if page.dead_letters:
            self.stats.dead_letters += len(page.dead_letters)
            self._dead_letters.extend(page.dead_letters)
        return page.trades

    async def latest_trade_id(self, inst_id: str) -> int | None:
        """The newest tradeId of the instrument (None when it has no trades in the history)."""
        trades = await self.history_trades(inst_id, limit=1)
        return max((t.trade_id for t in trades), default=None)

    async def backfill(self, inst_id: str, after_trade_id: int) -> list[Trade]:
        """Every trade newer than ``after_trade_id``, in ascending tradeId order (origin ``rest``).

        Pages back from the newest trade (``after`` = older than the page's oldest id) until a
        page reaches ``after_trade_id`` or the history ends. At most ``max_backfill_trades`` are
        fetched: after a very long outage the newest ones are kept and the rest is logged as lost.
        """
        found: dict[int, Trade] = {}
        cursor: int | None = None
        while len(found) < self.max_backfill_trades:
            page = await self.history_trades(inst_id, after=cursor)
            if not page:
                break
            found.update((t.trade_id, t) for t in page if t.trade_id > after_trade_id)
            oldest = min(t.trade_id for t in page)
            if oldest <= after_trade_id or (cursor is not None and oldest >= cursor):
                break
            cursor = oldest
        else:
            log.error(
                "backfill of %s stopped at %d trades: trades between id %d and %s are not fetched",
                inst_id,
                len(found),
                after_trade_id,
                cursor,
                extra={"inst_id": inst_id},
            )
        return [found[trade_id] for trade_id in sorted(found)]

    async def _get_trades(self, url: str, inst_id: str) -> RestTrades:
        """GET a trades page, retrying what is worth retrying; raise OkxRestError otherwise."""
        problem = RestError(BAD_RESPONSE, "no attempt made")
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                self.stats.retries += 1
                await asyncio.sleep(_retry_delay(attempt - 1, self.retry_base_s, self.retry_max_s))
            await self.limiter.acquire()
            self.stats.requests += 1
            try:
                status, body = await asyncio.to_thread(_http_get, url, self.timeout_s)
            except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
                problem = RestError(BAD_RESPONSE, f"network error: {exc}")
                log.warning("OKX REST %s: %s (attempt %d of %d)", url, exc, attempt, self.max_attempts)
                continue
            result = parse_rest_trades(body, inst_id=inst_id)
            if isinstance(result, RestTrades):
                return result
            problem = result
            if not self._retryable(status, result):
                break
            log.warning(
                "OKX REST %s: HTTP %d code %s %s (attempt %d of %d)",
                url,
                status,
                result.code,
                result.msg,
                attempt,
                self.max_attempts,
            )
        raise OkxRestError(problem.code, problem.msg, url=url)

    def _retryable(self, status: int, error: RestError) -> bool:
        if error.rate_limited or status == 429:
            self.stats.rate_limited += 1
            return True
        return status >= 500 or error.code == BAD_RESPONSE
