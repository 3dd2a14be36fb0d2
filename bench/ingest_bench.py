"""Ingest benchmarks (issue 2): decode+validate trades, and produce trades into Kafka."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from confluent_kafka import Producer

from bench.common import Row, best_rate
from bench.stream_bench import delete_topics
from connectors.base import Batch
from connectors.ingest import run_ingest
from tcp.config import Settings
from tcp.schemas import Trade, decode_trade, encode
from tcp.topics import ensure_topics

INSTRUMENTS = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "DOGE-USDT", "PEPE-USDT", "TON-USDT")


def make_trades(n: int) -> list[Trade]:
    """Plausible trades with varied prices/sizes (deterministic)."""
    out = []
    for i in range(n):
        inst = INSTRUMENTS[i % len(INSTRUMENTS)]
        out.append(
            Trade(
                inst_id=inst,
                trade_id=500_000_000 + i,
                px=f"{42000 + (i * 7919) % 5000}.{i % 10}",
                sz=f"0.{1 + (i * 104729) % 99_999_999:08d}",
                side="buy" if i % 3 else "sell",
                ts=1_700_000_000_000 + i // 4,
                origin="sim",
                received_at=1_700_000_000_000 + i // 4,
                count=1 + i % 4,
            )
        )
    return out


def decode_rows(n: int = 500_000) -> list[Row]:
    lines = [encode(t) for t in make_trades(n)]

    def stdlib() -> int:
        loads = json.loads
        for line in lines:
            loads(line)
        return n

    def ours() -> int:
        decode = decode_trade
        for line in lines:
            decode(line)
        return n

    base = best_rate(stdlib)
    value = best_rate(ours)
    return [
        Row(
            "decode + validate Trade JSON (msgspec typed decoder)",
            value,
            "stdlib json.loads, no validation",
            base,
            "trades/s",
            ">= 1.5x",
        )
    ]


class _ListSource:
    name = "bench"

    def __init__(self, trades: list[Trade], batch: int = 1000) -> None:
        self._trades, self._batch = trades, batch

    async def batches(self) -> AsyncIterator[Batch]:
        for i in range(0, len(self._trades), self._batch):
            yield list(self._trades[i : i + self._batch])


def produce_rows(settings: Settings, n: int = 300_000) -> list[Row]:
    trades = make_trades(n)
    values = [(encode(t), t.inst_id.encode()) for t in trades]
    made: list[Settings] = []

    def fresh() -> Settings:
        s = settings.model_copy(update={"topic_prefix": f"bench-{time.time_ns()}-{len(made) + 1}."})
        ensure_topics(s, ("okx.trades", "okx.trades.dlq"))
        made.append(s)
        return s

    def bare() -> int:
        s = fresh()
        topic = s.topic("okx.trades")
        producer = Producer(
            {
                "bootstrap.servers": s.kafka_bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "queue.buffering.max.messages": 200_000,
            }
        )
        for i, (value, key) in enumerate(values):
            while True:
                try:
                    producer.produce(topic, value, key)
                    break
                except BufferError:
                    producer.poll(0.05)
            if i % 1000 == 0:
                producer.poll(0)
        producer.flush(60)
        return n

    def ours() -> int:
        s = fresh()
        stats = asyncio.run(run_ingest(_ListSource(trades), s))
        assert stats.trades == n, stats
        return n

    try:
        base = best_rate(bare, 2)
        value = best_rate(ours, 2)
    finally:
        for s in made:  # the embedded broker keeps topics in memory
            delete_topics(s)
    return [
        Row(
            "ingest into Kafka: encode + dedupe + produce with delivery reports",
            value,
            "bare confluent-kafka produce loop, pre-encoded",
            base,
            "trades/s",
            ">= 0.7x",
        )
    ]
