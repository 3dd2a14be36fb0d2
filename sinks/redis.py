"""Batch writes to Redis: the live bot status and the pub/sub channels the dashboard listens to.

Redis is a live view, not the record. PostgreSQL is the record (candles, signals, fills,
equity); Redis holds what the dashboard shows *now* (a bot's latest status in the hash
``bot:{name}``) and fans out events on channels (``market:{inst_id}``, ``signals:{bot}``,
``status:{bot}``). Anything in Redis can be lost and rebuilt from PostgreSQL and the stream.

A batch of operations (:class:`HashSet`, :class:`Publish`) goes out in ONE pipeline
(``transaction=False``: one round trip, no MULTI/EXEC), in order. ``RedisWriter.write`` blocks
until Redis has answered. While Redis is unreachable (connection refused or lost, timeout, still
loading its dump after a restart) it retries the whole batch with capped exponential backoff, so
the caller (a dataflow step) waits instead of buffering without bound: that is the backpressure.
After ``give_up_after_s`` it raises :class:`RedisUnavailableError`, whose message names the
address with the password hidden. An error Redis itself answers (e.g. ``WRONGTYPE``) is not
retried: it raises ``redis.exceptions.ResponseError`` at once.

Delivery: a batch can be sent twice, after a connection lost mid-pipeline or a Bytewax replay
after a crash (recovery is at-least-once). A ``HSET`` (and its ``EXPIRE``) is idempotent: sending
it twice leaves the same hash. A ``PUBLISH`` is not: a replayed publish reaches the subscribers
twice, so subscribers must tolerate duplicates (e.g. keep the latest message per key/time).
Pub/sub itself is fire-and-forget: a subscriber that is not connected at the time misses the
message for good.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from tcp.services import redact

__all__ = [
    "HashSet",
    "Publish",
    "RedisOp",
    "RedisSink",
    "RedisUnavailableError",
    "RedisWriter",
    "bot_status_key",
    "market_channel",
    "signals_channel",
    "status_channel",
]

log = logging.getLogger(__name__)

#: What makes Redis "unreachable" (retried): refused or lost connections (including ``LOADING``,
#: a ``BusyLoadingError``), socket timeouts.
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, TimeoutError)


# --------------------------------------------------------------------------------------------
# Operations


@dataclass(frozen=True, slots=True)
class HashSet:
    """``HSET key field value ...`` then, when ``ttl_s`` is set, ``EXPIRE key ttl_s``.

    Idempotent. Fields not named are left as they are (HSET merges); the TTL is reset by each
    write, so a hash whose writer stops expires ``ttl_s`` seconds after the last write.
    """

    key: str
    fields: Mapping[str, str]
    ttl_s: int | None = None

    def __post_init__(self) -> None:
        if not self.key:
            msg = "HashSet: the key is empty"
            raise ValueError(msg)
        if not self.fields:
            msg = f"HashSet({self.key!r}): no fields to set (HSET needs at least one)"
            raise ValueError(msg)
        if self.ttl_s is not None and self.ttl_s <= 0:
            msg = f"HashSet({self.key!r}): ttl_s must be a positive number of seconds, got {self.ttl_s}"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Publish:
    """``PUBLISH channel message``. Not idempotent: a replay reaches the subscribers twice."""

    channel: str
    message: bytes | str

    def __post_init__(self) -> None:
        if not self.channel:
            msg = "Publish: the channel is empty"
            raise ValueError(msg)


RedisOp = HashSet | Publish


def _name(kind: str, value: str) -> str:
    if not value:
        msg = f"{kind}: the name is empty"
        raise ValueError(msg)
    return f"{kind}:{value}"


def bot_status_key(bot: str) -> str:
    """The hash holding a bot's live status: ``bot:{bot}``."""
    return _name("bot", bot)


def market_channel(inst_id: str) -> str:
    """The channel of an instrument's live market data (forming candles): ``market:{inst_id}``."""
    return _name("market", inst_id)


def signals_channel(bot: str) -> str:
    """The channel of a bot's signals and fills: ``signals:{bot}``."""
    return _name("signals", bot)


def status_channel(bot: str) -> str:
    """The channel announcing a bot's status changes: ``status:{bot}``."""
    return _name("status", bot)


# --------------------------------------------------------------------------------------------
# Writer


class RedisUnavailableError(RuntimeError):
    """Redis could not be reached for ``give_up_after_s`` seconds; the batch was not (fully) written."""

    def __init__(self, *, address: str, waited_s: float, attempts: int, ops: int, cause: str) -> None:
        self.address, self.waited_s, self.attempts, self.ops = address, waited_s, attempts, ops
        super().__init__(
            f"Redis at {address} unreachable for {waited_s:.1f} s ({attempts} attempts, last error: "
            f"{cause}); {ops} operations not written. Fix: start Redis or correct TCP_REDIS_URL"
        )


class RedisWriter:
    """Writes batches of :data:`RedisOp` to one Redis, one pipeline per batch, retrying while it is down.

    ``url`` is a redis-py URL (``redis://[:password@]host:port/db``). ``give_up_after_s=None``
    retries for ever (a dataflow sink: wait for Redis to come back); a number makes ``write``
    raise :class:`RedisUnavailableError` once that long has passed without success.
    """

    def __init__(
        self,
        url: str,
        *,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
        give_up_after_s: float | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        if retry_initial_s <= 0 or retry_max_s < retry_initial_s:
            msg = (
                f"RedisWriter: need 0 < retry_initial_s <= retry_max_s, "
                f"got {retry_initial_s} and {retry_max_s}"
            )
            raise ValueError(msg)
        self._address = redact(url)
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._give_up_after_s = give_up_after_s
        # The retry policy is ours (backoff, give-up, logging): redis-py itself does not retry.
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=min(timeout_s, 5.0),
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self.ops_written = 0
        self.retries = 0

    @property
    def address(self) -> str:
        """The URL written to, password hidden."""
        return self._address

    def write(self, batch: Sequence[RedisOp]) -> None:
        """Send ``batch`` in one pipeline, in order; returns once Redis has answered all of it."""
        if not batch:
            return
        delay = self._retry_initial_s
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                self._write_once(batch)
                self.ops_written += len(batch)
                return
            except _TRANSIENT as exc:
                cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                waited = time.monotonic() - started
                if self._give_up_after_s is not None and waited >= self._give_up_after_s:
                    raise RedisUnavailableError(
                        address=self._address, waited_s=waited, attempts=attempts, ops=len(batch), cause=cause
                    ) from exc
                self.retries += 1
                pause = delay * (0.5 + random.random() / 2)
                if self._give_up_after_s is not None:  # wake up in time to give up on time
                    pause = min(pause, max(self._give_up_after_s - waited, 0.0) + 0.01)
                log.warning(
                    "Redis write to %s failed (%s); retrying in %.1f s (%d operations held)",
                    self._address,
                    cause,
                    pause,
                    len(batch),
                )
                time.sleep(pause)
                delay = min(delay * 2, self._retry_max_s)

    def _write_once(self, batch: Sequence[RedisOp]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for op in batch:
            if isinstance(op, HashSet):
                mapping: dict[FieldT, EncodableT] = {field: value for field, value in op.fields.items()}
                pipe.hset(op.key, mapping=mapping)
                if op.ttl_s is not None:
                    pipe.expire(op.key, op.ttl_s)
            else:
                pipe.publish(op.channel, op.message)
        pipe.execute(raise_on_error=True)

    def close(self) -> None:
        """Close the connections; the writer must not be used afterwards."""
        self._client.close()


# --------------------------------------------------------------------------------------------
# Bytewax sink


class _Partition(StatelessSinkPartition[list[RedisOp]]):
    def __init__(self, writer: RedisWriter, max_ops: int) -> None:
        self._writer = writer
        self._max_ops = max_ops

    def write_batch(self, items: list[list[RedisOp]]) -> None:
        ops = [op for chunk in items for op in chunk]
        for start in range(0, len(ops), self._max_ops):
            self._writer.write(ops[start : start + self._max_ops])

    def close(self) -> None:
        self._writer.close()


class RedisSink(DynamicSink[list[RedisOp]]):
    """Lists of :data:`RedisOp` into Redis, in order within each worker; one connection per worker.

    Items are lists so that a step can hand over all the operations of one event as one
    dataflow item. Each activation's items are written at once, in pipelines of at most
    ``max_ops`` operations; nothing is held across a snapshot. While Redis is down the worker
    blocks and retries for ever (backpressure). Replays after a crash publish again (see the
    module docstring).
    """

    def __init__(self, url: str, *, max_ops: int = 5_000) -> None:
        if max_ops < 1:
            msg = f"RedisSink: max_ops must be at least 1, got {max_ops}"
            raise ValueError(msg)
        self._url = url
        self._max_ops = max_ops

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Partition:
        return _Partition(RedisWriter(self._url), self._max_ops)
