"""The OKX connector against a fake OKX (tests/fake_okx.py) and the real Kafka of the test services.

The fake speaks OKX's protocol over real sockets; nothing here mocks Kafka, the WebSocket
client or HTTP. Timings are shortened (pings after 0.2-1 s instead of 25 s) so every test
stays within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from connectors.base import Batch
from connectors.dedupe import RecentTradeIds
from connectors.ingest import run_ingest
from connectors.okx import OkxRestClient, OkxRestError, OkxSourceError, OkxTradeSource, subscribe_requests
from connectors.okx.parse import RestError, parse_rest_trades
from tcp import topics
from tcp.config import Settings
from tcp.schemas import Trade, decode_trade
from tests.drill_util import record, size
from tests.fake_okx import FakeOkx
from tests.kafka_util import read_topic

BTC, ETH = "BTC-USDT", "ETH-USDT"


@pytest.fixture
def okx() -> Iterator[FakeOkx]:
    with FakeOkx((BTC, ETH)) as fake:
        yield fake


def fast_rest(fake: FakeOkx) -> OkxRestClient:
    return OkxRestClient(fake.rest_url, retry_base_s=0.02, retry_max_s=0.1, timeout_s=2.0)


def make_source(fake: FakeOkx, instruments: tuple[str, ...] = (BTC, ETH), **options: Any) -> OkxTradeSource:
    """A source with test-sized timings, pointed at the fake."""
    defaults: dict[str, Any] = {
        "ping_after_s": 1.0,
        "pong_timeout_s": 1.0,
        "backoff_base_s": 0.02,
        "backoff_max_s": 0.2,
        "rest": fast_rest(fake),
    }
    return OkxTradeSource(
        ws_url=fake.ws_url, rest_url=fake.rest_url, instruments=instruments, **{**defaults, **options}
    )


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    """Wait (without blocking the loop) until ``condition()`` holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def collecting(source: OkxTradeSource) -> AsyncIterator[list[Trade]]:
    """Iterate the source in a task, collecting its trades; cancel it (like Ctrl-C) at the end."""
    trades: list[Trade] = []

    async def consume() -> None:
        batch: Batch
        async for batch in source.batches():
            trades.extend(item for item in batch if isinstance(item, Trade))

    task = asyncio.create_task(consume())
    try:
        yield trades
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def at_most_per_second(times: list[float], limit: int) -> bool:
    """No window of one second holds more than ``limit`` of the timestamps."""
    times = sorted(times)
    return all(sum(1 for u in times[i:] if u - t < 1.0) <= limit for i, t in enumerate(times))


async def stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# --- end to end: WebSocket -> ingest -> Kafka ------------------------------------------------------


@pytest.mark.drill
def test_drops_mid_stream_lose_nothing_and_duplicate_nothing(okx: FakeOkx, settings: Settings) -> None:
    """Drops of the WebSocket mid-stream (make drill: every 10 s, 6 times): after the backfill
    from REST every generated trade id is in Kafka exactly once."""
    drops, every_s = size(3, 6), size(0.5, 10.0)
    source = make_source(okx)
    seen = RecentTradeIds()

    async def scenario() -> None:
        ingest = asyncio.create_task(run_ingest(source, settings, dedupe=seen))
        await eventually(lambda: okx.subscribed(BTC) and okx.subscribed(ETH), what="subscriptions")
        okx.start_stream(interval_s=0.01)  # ~100 trades/s per instrument, generated while disconnected too
        for _ in range(drops):
            await asyncio.sleep(every_s)
            assert okx.drop_all() == 1
        await asyncio.sleep(0.5)
        okx.stop_stream()
        generated = okx.all_trade_ids()

        def all_in() -> bool:
            return all((inst_id, i) in seen for inst_id, ids in generated.items() for i in ids)

        await eventually(all_in, timeout_s=5.0, what="every generated trade to reach the ingest")
        await stop(ingest)  # run_ingest flushes the producer on the way out

    asyncio.run(scenario())
    gc.collect()  # the cancelled ingest's producer sits in a reference cycle: free it while Kafka is up

    generated = okx.all_trade_ids()
    expected = {(inst_id, i) for inst_id, ids in generated.items() for i in ids}
    messages = read_topic(settings, topics.TRADES, expect=len(expected))
    trades = [decode_trade(m.value() or b"") for m in messages]
    counts = Counter((t.inst_id, t.trade_id) for t in trades)
    record("OKX WebSocket dropped mid-stream (fake OKX), gaps backfilled from REST", runs=drops,
           compared=len(expected), lost=len(expected - set(counts)),
           duplicated=sum(n - 1 for n in counts.values()) + len(set(counts) - expected),
           detail=f"a drop every {every_s:g} s at ~100 trades/s per instrument; {source.stats.reconnects} reconnects, "
           f"{source.stats.backfilled} trades backfilled; every trade id in okx.trades once")  # fmt: skip
    assert set(counts) == expected
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:10]
    assert all(m.key() == decode_trade(m.value() or b"").inst_id.encode() for m in messages)
    assert len(expected) > 100
    # The gaps really were filled from REST, after real reconnects, within OKX's connection limit.
    assert {t.origin for t in trades} == {"ws", "rest"}
    assert source.stats.reconnects == drops and source.stats.backfilled > 0
    assert source.stats.backfill_failures == 0 and source.stats.dead_letters == 0
    assert at_most_per_second(okx.connection_attempts, 3)


def test_unknown_instrument_60018_does_not_stop_the_others(settings: Settings) -> None:
    with FakeOkx((BTC, ETH)) as okx:
        source = make_source(okx, (BTC, "NOPE-USDT", ETH))

        async def scenario() -> list[dict[str, Any]]:
            ingest = asyncio.create_task(run_ingest(source, settings))
            await eventually(lambda: okx.subscribed(BTC) and okx.subscribed(ETH) and bool(source.unavailable))
            pushed = okx.push_trades(10)
            okx.drop_all()  # the next connection must not ask for NOPE-USDT again
            await eventually(
                lambda: source.stats.connections == 2 and okx.subscribed(BTC) and okx.subscribed(ETH)
            )
            pushed += okx.push_trades(5)
            await asyncio.sleep(0.3)
            await stop(ingest)
            return pushed

        pushed = asyncio.run(scenario())
        gc.collect()  # as above: free the cancelled ingest's producer now

    assert source.stats.errors == {"60018": 1}
    assert source.unavailable == {"NOPE-USDT"} and source.instruments == (BTC, ETH)
    last_request = okx.subscribe_requests[-1]
    assert [arg["instId"] for arg in last_request["args"]] == [BTC, ETH]
    messages = read_topic(settings, topics.TRADES, expect=len(pushed))
    got = {(t.inst_id, t.trade_id) for t in (decode_trade(m.value() or b"") for m in messages)}
    assert got == {(item["instId"], int(item["tradeId"])) for item in pushed}


# --- keep-alive, notice, reconnect limits -------------------------------------------------------------


def test_missing_pong_means_dead_connection_and_reconnect(okx: FakeOkx) -> None:
    source = make_source(okx, ping_after_s=0.2, pong_timeout_s=0.3)

    async def scenario() -> list[Trade]:
        async with collecting(source) as trades:
            await eventually(lambda: okx.subscribed(BTC) and okx.subscribed(ETH))
            okx.push_trades(3)
            await eventually(lambda: okx.pings >= 1, what="a first ping")
            await asyncio.sleep(0.05)  # its pong arrives: the connection is fine
            assert source.stats.pong_timeouts == 0
            okx.answer_pings = False  # now the connection looks alive but is not
            await eventually(lambda: source.stats.pong_timeouts >= 1, what="a pong timeout")
            okx.answer_pings = True
            await eventually(
                lambda: source.stats.connections >= 2 and okx.subscribed(BTC) and okx.subscribed(ETH)
            )
            okx.push_trades(3)
            await eventually(lambda: len({t.trade_id for t in trades}) >= 12, what="all trades")
            return list(trades)

    trades = asyncio.run(scenario())
    assert source.stats.pings >= 2 and source.stats.pong_timeouts == 1 and source.stats.reconnects == 1
    assert {(t.inst_id, t.trade_id) for t in trades} == {
        (i, n) for i, ids in okx.all_trade_ids().items() for n in ids
    }


def test_notice_64008_reconnects_proactively_without_gap(okx: FakeOkx) -> None:
    source = make_source(okx)

    async def scenario() -> list[Trade]:
        async with collecting(source) as trades:
            await eventually(lambda: okx.subscribed(BTC) and okx.subscribed(ETH))
            okx.push_trades(5)
            started = time.monotonic()
            assert okx.send_notice() == 1
            okx.push_trades(5)  # maybe before, maybe after the new connection: no matter
            await eventually(lambda: source.stats.connections == 2, what="the proactive reconnect")
            assert time.monotonic() - started < 0.5  # no backoff after a notice
            await eventually(lambda: okx.subscribed(BTC) and okx.subscribed(ETH))
            okx.push_trades(5)
            await eventually(lambda: len({(t.inst_id, t.trade_id) for t in trades}) >= 30, what="all trades")
            return list(trades)

    trades = asyncio.run(scenario())
    assert source.stats.notices == 1 and source.stats.reconnects == 1
    assert okx.connections == 2
    assert {(t.inst_id, t.trade_id) for t in trades} == {
        (i, n) for i, ids in okx.all_trade_ids().items() for n in ids
    }


def test_cancel_closes_the_connection_and_stops_every_task(okx: FakeOkx) -> None:
    source = make_source(okx)

    async def scenario() -> None:
        async with collecting(source):
            await eventually(lambda: okx.subscribed(BTC) and okx.subscribed(ETH))
            okx.start_stream(interval_s=0.01)
            await asyncio.sleep(0.2)
            okx.drop_all()
            await eventually(lambda: source.stats.connections == 2)  # a backfill is starting
        # collecting() has cancelled the consuming task, as Ctrl-C does.
        okx.stop_stream()
        assert asyncio.all_tasks() == {asyncio.current_task()}
        await eventually(lambda: okx.open_connections == 0, what="the fake to see the close")

    asyncio.run(scenario())
    assert okx.client_close_codes == [1006, 1000]  # cut by the test, then closed properly


def test_pings_keep_a_quiet_connection_open() -> None:
    with FakeOkx((BTC,), idle_timeout_s=0.6) as okx:
        source = make_source(okx, (BTC,), ping_after_s=0.2, pong_timeout_s=0.3)

        async def scenario() -> None:
            async with collecting(source):
                await eventually(lambda: okx.subscribed(BTC))
                await asyncio.sleep(1.5)  # no trades at all: only the pings keep it open

        asyncio.run(scenario())
    assert okx.connections == 1 and okx.close_codes == []
    assert source.stats.pings >= 4 and source.stats.pong_timeouts == 0


def test_never_more_than_three_connections_per_second() -> None:
    with FakeOkx((BTC,)) as okx:
        okx.refuse_connections = True  # every attempt fails at once: only the limiter holds it back
        source = make_source(okx, (BTC,), backoff_base_s=0.001, backoff_max_s=0.001)

        async def scenario() -> None:
            async with collecting(source):
                await asyncio.sleep(2.3)

        asyncio.run(scenario())
    assert 6 <= len(okx.connection_attempts) <= 9
    assert source.stats.connect_failures == len(okx.connection_attempts)
    assert at_most_per_second(okx.connection_attempts, 3)


def test_all_instruments_unknown_is_an_error() -> None:
    with FakeOkx((BTC,)) as okx:
        source = make_source(okx, ("NOPE-USDT",))

        async def scenario() -> None:
            async for _ in source.batches():
                pass

        with pytest.raises(OkxSourceError, match="NOPE-USDT"):
            asyncio.run(asyncio.wait_for(scenario(), 5))


def test_quiet_instrument_gets_an_anchor_so_its_gap_is_filled() -> None:
    # History: trades from the last 50 s; no re-sent last trade, so no WebSocket trade at all.
    with FakeOkx((BTC, ETH), history=200, resend_last_on_subscribe=False) as okx:
        source = make_source(okx)

        async def scenario() -> list[Trade]:
            async with collecting(source) as trades:
                await eventually(lambda: len(source._anchors) == 2, what="anchors")
                okx.drop_all()
                okx.push_trades(4, ETH)  # while disconnected, and ETH had no trade on this connection
                await eventually(lambda: sum(t.inst_id == ETH and t.origin == "rest" for t in trades) >= 4)
                return list(trades)

        trades = asyncio.run(scenario())
    new_eth = okx.trade_ids(ETH)[-4:]
    assert {t.trade_id for t in trades if t.inst_id == ETH} >= set(new_eth)


def test_fake_closes_an_idle_connection_with_4004() -> None:
    """The fake's own keep-alive rule, which the ping tests rely on."""
    with FakeOkx((BTC,), idle_timeout_s=0.3) as okx:

        async def scenario() -> int | None:
            async with connect(okx.ws_url) as ws:
                await ws.send(subscribe_requests([BTC])[0])
                ack = json.loads(await ws.recv())
                assert ack["event"] == "subscribe" and ack["arg"] == {"channel": "trades", "instId": BTC}
                assert ack["id"] == "sub1" and ack["connId"]
                await ws.send("ping")
                assert await ws.recv() == "pong"
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 2)
                return closed.value.rcvd.code if closed.value.rcvd else None

        assert asyncio.run(scenario()) == 4004


def test_subscribe_requests_stay_under_64_kb() -> None:
    instruments = [f"COIN{i}-USDT-SWAP" for i in range(6000)]
    requests = subscribe_requests(instruments)
    assert len(requests) > 1
    assert all(len(r.encode()) < 64 * 1024 for r in requests)
    decoded = [json.loads(r) for r in requests]
    assert [a["instId"] for d in decoded for a in d["args"]] == instruments
    assert len({d["id"] for d in decoded}) == len(requests)
    assert all(d["op"] == "subscribe" and {a["channel"] for a in d["args"]} == {"trades"} for d in decoded)


# --- REST ---------------------------------------------------------------------------------------------


def test_backfill_pages_back_to_the_last_seen_id() -> None:
    with FakeOkx((BTC,), history=350) as okx:
        ids = okx.trade_ids(BTC)
        rest = fast_rest(okx)

        async def scenario() -> tuple[list[Trade], list[Trade], list[Trade]]:
            return (
                await rest.backfill(BTC, ids[20]),
                await rest.backfill(BTC, ids[-1]),
                await rest.backfill(BTC, ids[0] - 1),
            )

        gap, nothing, everything = asyncio.run(scenario())
    assert [t.trade_id for t in gap] == ids[21:]  # ascending, exactly the missing ones
    assert nothing == []
    assert [t.trade_id for t in everything] == ids  # four pages, the last one short
    assert all(t.origin == "rest" and t.inst_id == BTC for t in gap)
    assert rest.stats.retries == 0 and okx.rest_rate_limited == 0


def test_rest_retries_rate_limit_answers() -> None:
    with FakeOkx((BTC,), history=5) as okx:
        okx.inject_rest_errors(2)  # HTTP 429 {"code":"50011"}
        okx.inject_rest_errors(1, status=200)  # OKX also says 50011 with HTTP 200
        okx.inject_rest_errors(
            1, status=503, body={"code": "50001", "msg": "Service temporarily unavailable"}
        )
        rest = fast_rest(okx)
        trades = asyncio.run(rest.history_trades(BTC))
    assert [t.trade_id for t in trades] == okx.trade_ids(BTC)[::-1]
    assert rest.stats.retries == 4 and rest.stats.rate_limited == 3


def test_rest_limiter_keeps_under_20_requests_per_2_s() -> None:
    with FakeOkx((BTC,), history=5) as okx:
        rest = fast_rest(okx)

        async def scenario() -> float:
            started = time.monotonic()
            await asyncio.gather(*(rest.history_trades(BTC) for _ in range(25)))
            return time.monotonic() - started

        elapsed = asyncio.run(scenario())
    assert okx.rest_rate_limited == 0 and rest.stats.retries == 0
    assert elapsed >= 2.0  # the 21st request had to wait for the window


def test_rest_final_errors_are_raised_without_retrying() -> None:
    with FakeOkx((BTC,)) as okx:
        rest = fast_rest(okx)
        with pytest.raises(OkxRestError) as error:
            asyncio.run(rest.history_trades("NOPE-USDT"))
    assert error.value.code == "51001" and rest.stats.requests == 1


def test_rest_network_errors_are_retried_then_raised() -> None:
    with FakeOkx((BTC,)) as okx:
        url = okx.rest_url
    rest = OkxRestClient(url, max_attempts=3, retry_base_s=0.01, timeout_s=1.0)  # the fake is gone
    with pytest.raises(OkxRestError, match="network error"):
        asyncio.run(rest.history_trades(BTC))
    assert rest.stats.requests == 3 and rest.stats.retries == 2


def test_fake_rest_speaks_okx() -> None:
    """The fake's REST answers: its rate limit and its 404 body (numeric code) as OKX sends them."""
    with FakeOkx((BTC,), history=3) as okx:

        def get(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(okx.rest_url + path, timeout=2) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        answers = [get(f"/api/v5/market/history-trades?instId={BTC}&limit=2") for _ in range(22)]
        status, body = get("/api/v5/market/nope")
    assert [s for s, _ in answers[:20]] == [200] * 20
    assert answers[20][0] == 429 and json.loads(answers[20][1]) == {
        "msg": "Too Many Requests",
        "code": "50011",
    }
    assert len(json.loads(answers[0][1])["data"]) == 2
    not_found = parse_rest_trades(body)
    assert status == 404 and isinstance(not_found, RestError) and not_found.code == "404"
