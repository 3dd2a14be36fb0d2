"""sinks.redis against a real Redis: hashes with TTLs, ordered pub/sub, retries, a server coming back."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from bytewax.dataflow import Dataflow
from bytewax.operators import input as bw_input
from bytewax.operators import output as bw_output
from bytewax.testing import TestingSource, run_main

from sinks.redis import (
    HashSet,
    Publish,
    RedisOp,
    RedisSink,
    RedisUnavailableError,
    RedisWriter,
    bot_status_key,
    market_channel,
    signals_channel,
    status_channel,
)
from tcp import services
from tcp.config import Settings


@pytest.fixture
def redis_url(services_settings: Settings) -> str:
    """The session's Redis (configured or embedded: conftest ensures every service)."""
    url = services_settings.redis_url.get_secret_value()
    assert url, "services.ensure gave no Redis URL"
    return url


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    yield conn
    conn.close()


@pytest.fixture
def bot() -> str:
    """A bot name of this test only: tests share the server, never a key or channel."""
    return f"bot-{uuid.uuid4().hex[:10]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_names() -> None:
    assert bot_status_key("ema-1") == "bot:ema-1"
    assert market_channel("BTC-USDT") == "market:BTC-USDT"
    assert signals_channel("ema-1") == "signals:ema-1"
    assert status_channel("ema-1") == "status:ema-1"
    with pytest.raises(ValueError, match="empty"):
        bot_status_key("")


def test_ops_are_checked() -> None:
    with pytest.raises(ValueError, match="no fields"):
        HashSet("bot:x", {})
    with pytest.raises(ValueError, match="ttl_s"):
        HashSet("bot:x", {"a": "1"}, ttl_s=0)
    with pytest.raises(ValueError, match="channel is empty"):
        Publish("", "m")


def test_hash_set_with_ttl_is_visible_and_idempotent(redis_url: str, client: redis.Redis, bot: str) -> None:
    key = bot_status_key(bot)
    writer = RedisWriter(redis_url)
    try:
        op = HashSet(key, {"state": "running", "equity": "10000.000001234"}, ttl_s=60)
        writer.write([op])
        writer.write([op])  # a replay: same hash
        writer.write([HashSet(key, {"state": "paused"})])  # merges, keeps the other field
        assert client.hgetall(key) == {"state": "paused", "equity": "10000.000001234"}
        assert 0 < client.ttl(key) <= 60
        no_ttl = bot_status_key(f"{bot}-b")
        writer.write([HashSet(no_ttl, {"state": "created"})])
        assert client.ttl(no_ttl) == -1  # exists, no expiry
        assert writer.ops_written == 4 and writer.retries == 0
    finally:
        client.delete(key, bot_status_key(f"{bot}-b"))
        writer.close()


def test_subscriber_gets_published_messages_in_order(redis_url: str, client: redis.Redis, bot: str) -> None:
    channel = signals_channel(bot)
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    confirmed = pubsub.get_message(timeout=5)  # the server has registered the subscription
    assert confirmed is not None and confirmed["type"] == "subscribe"

    writer = RedisWriter(redis_url)
    try:
        batch: list[RedisOp] = [Publish(channel, f"m{i}") for i in range(50)]
        batch.insert(10, HashSet(bot_status_key(bot), {"last": "9"}))  # hashes and publishes mix
        writer.write(batch)
        writer.write([Publish(channel, b"\x00bytes")])
        got: list[str] = []
        deadline = time.monotonic() + 10
        while len(got) < 51 and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1)
            if message is not None and message["type"] == "message":
                got.append(message["data"])
        assert got == [f"m{i}" for i in range(50)] + ["\x00bytes"]
        assert client.hget(bot_status_key(bot), "last") == "9"
    finally:
        pubsub.close()
        client.delete(bot_status_key(bot))
        writer.close()


def test_a_redis_error_is_raised_at_once_not_retried(redis_url: str, client: redis.Redis, bot: str) -> None:
    key = f"str:{bot}"
    client.set(key, "not a hash")
    writer = RedisWriter(redis_url, give_up_after_s=30)
    try:
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            writer.write([HashSet(key, {"a": "1"})])
        assert time.monotonic() - started < 5 and writer.retries == 0
    finally:
        client.delete(key)
        writer.close()


def test_gives_up_with_a_clear_error_naming_the_address_without_password() -> None:
    port = _free_port()  # nothing listens there
    writer = RedisWriter(
        f"redis://:s3cret@127.0.0.1:{port}/0", retry_initial_s=0.1, retry_max_s=0.2, give_up_after_s=0.6
    )
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError) as info:
        writer.write([HashSet("bot:x", {"a": "1"}), Publish("status:x", "up")])
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert elapsed >= 0.6  # it retried until give_up_after_s ...
    assert writer.retries >= 2  # ... several times (0.05-0.1 s, then 0.1-0.2 s pauses)
    assert f"127.0.0.1:{port}" in message and "s3cret" not in message and "***" in message
    assert "2 operations not written" in message and "TCP_REDIS_URL" in message
    assert info.value.attempts == writer.retries + 1
    writer.close()


def test_a_blocked_write_completes_when_redis_comes_back(tmp_path: Path) -> None:
    # A Redis of this test only (its own home: same launcher as `tcp services up`), restartable.
    settings = Settings.load(home=tmp_path, redis_url="")
    url = services.ensure(settings, ("redis",)).redis_url.get_secret_value()
    writer = RedisWriter(url, retry_initial_s=0.1, retry_max_s=0.5, give_up_after_s=60)
    check = redis.Redis.from_url(url, decode_responses=True)
    try:
        writer.write([HashSet("bot:a", {"state": "running"})])
        services.stop(settings, ("redis",))

        errors: list[BaseException] = []
        finished = threading.Event()

        def write() -> None:
            try:
                writer.write([HashSet("bot:b", {"state": "running"}), HashSet("bot:a", {"state": "paused"})])
            except BaseException as exc:
                errors.append(exc)
            finally:
                finished.set()

        thread = threading.Thread(target=write)
        thread.start()
        assert not finished.wait(1.5)  # blocked, retrying
        assert writer.retries >= 1
        assert services.ensure(settings, ("redis",)).redis_url.get_secret_value() == url  # same port
        thread.join(timeout=30)
        assert finished.is_set() and errors == []
        assert check.hgetall("bot:a") == {"state": "paused"} and check.hgetall("bot:b") == {
            "state": "running"
        }
    finally:
        check.close()
        writer.close()
        services.stop(settings, ("redis",))


def test_redis_sink_in_a_dataflow(redis_url: str, client: redis.Redis, bot: str) -> None:
    channel = status_channel(bot)
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    assert pubsub.get_message(timeout=5) is not None
    items: list[list[RedisOp]] = [
        [HashSet(bot_status_key(bot), {"n": str(i)}, ttl_s=300), Publish(channel, str(i))] for i in range(20)
    ]
    flow = Dataflow("redis_sink_test")
    bw_output(
        "out", bw_input("in", flow, TestingSource(items, batch_size=7)), RedisSink(redis_url, max_ops=5)
    )
    try:
        run_main(flow)
        got = []
        while (message := pubsub.get_message(timeout=1)) is not None:
            if message["type"] == "message":
                got.append(message["data"])
        assert got == [str(i) for i in range(20)]
        assert client.hgetall(bot_status_key(bot)) == {"n": "19"}
    finally:
        pubsub.close()
        client.delete(bot_status_key(bot))
