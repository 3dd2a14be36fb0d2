"""Bots benchmarks (the strategies/bots issue): candles through 100 bots, and memory per bot.

* :func:`throughput_rows`: 100 bots (5 strategies x 9 instruments, 1m) over a ``candles`` topic
  pre-filled with N candles per instrument, through the bots dataflow (``run_main``,
  ``tail=False``, timed to its return: every sink flushed) — with all its sinks (PostgreSQL,
  Redis, Kafka events), and with the PostgreSQL and Redis sinks left out (the dataflow's own
  cost). Baseline, same run: the same 100 ``Bot`` objects (strategy + portfolio + a mark at
  every close, what the dataflow computes) fed the same candles in a plain Python loop.
* :func:`memory_rows`: RSS of a process holding 1,000 running bots that have each seen 500
  candles, minus the same process before; and the pickled size of one bot (what a recovery
  snapshot stores per bot).

Run one alone: ``BENCH_SCALE=0.1 .venv/bin/python -m bench.bots_bench``.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Row, scaled  # noqa: E402
from bench.stream_bench import ROOT, bench_database, delete_topics, fresh_settings  # noqa: E402
from tcp.config import Settings  # noqa: E402

INSTRUMENTS = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "XRP-USDT", "DOGE-USDT", "ADA-USDT", "PEPE-USDT", "LTC-USDT",
               "BNB-USDT")  # fmt: skip
STRATEGIES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ema_crossover", {"fast": 12, "slow": 26}),
    ("ema_crossover", {"fast": 5, "slow": 20}),
    ("macd_cross", {"fast": 12, "slow": 26, "signal": 9}),
    ("rsi_reversion", {"period": 14, "oversold": 30, "overbought": 70}),
    ("bollinger_breakout", {"period": 20, "k": 2.0}),
)


def bot_configs(n: int = 100) -> list[Any]:
    from bots.config import BotConfig

    return [
        BotConfig(
            name=f"bench-{i:03d}",
            strategy=STRATEGIES[i % len(STRATEGIES)][0],
            params=STRATEGIES[i % len(STRATEGIES)][1],
            inst_id=INSTRUMENTS[i % len(INSTRUMENTS)],
            timeframe="1m",
            fee=Decimal("0.001"),
            slippage_bps=Decimal(5),
        )  # fmt: skip
        for i in range(n)
    ]


def candle_series(per_instrument: int) -> list[Any]:
    """Random-walk 1m candles of the 9 instruments, interleaved in close-time order."""
    import random

    from dataflows.candle_core import Candle

    rng = random.Random(4)
    start = 1_710_028_800_000
    prices = [40_000.0 / (i + 1) ** 2 for i in range(len(INSTRUMENTS))]
    out = []
    for k in range(per_instrument):
        for i, inst in enumerate(INSTRUMENTS):
            prev = prices[i]
            prices[i] = prev * (1 + rng.gauss(0, 0.002))
            o, c = f"{prev:.8f}", f"{prices[i]:.8f}"
            out.append(Candle(inst, "1m", start + (k + 1) * 60_000, o, max(o, c, key=float), min(o, c, key=float),
                              c, "1.5", f"{1.5 * prices[i]:.8f}", 10))  # fmt: skip
    return out


def plain_loop(configs: list[Any], candles: list[Any]) -> float:
    """Seconds for the same Bot objects over the candles in a plain loop."""
    from bots.bot import Bot

    by_stream: dict[tuple[str, str], list[Bot]] = {}
    for config in configs:
        bot = Bot.create(config)
        bot.state = "running"
        by_stream.setdefault((config.inst_id, config.timeframe), []).append(bot)
    started = time.perf_counter()
    for candle in candles:
        for bot in by_stream.get((candle.inst_id, candle.timeframe), ()):
            bot.on_candle(candle)
    return time.perf_counter() - started


def throughput_rows(settings: Settings, per_instrument: int | None = None) -> list[Row]:
    from bytewax.testing import run_main

    from bench.stream_bench import truncate
    from dataflows.bots import build_flow
    from dataflows.candle_core import encode_candle
    from sinks.kafka import KafkaProducer
    from tcp import topics
    from tcp.topics import ensure_topics

    per_instrument = per_instrument or scaled(9_000, minimum=200)
    configs = bot_configs()
    candles = candle_series(per_instrument)
    dsn = bench_database(settings)
    s = fresh_settings(settings, dsn, "bots")
    ensure_topics(s)
    producer = KafkaProducer(s.kafka_bootstrap, client_id="bench-candles")
    for candle in candles:
        producer.produce(s.topic(topics.CANDLES), encode_candle(candle), candle.key)
    assert producer.flush(60) == 0
    n = len(candles)
    try:
        loop = n / min(plain_loop(configs, candles) for _ in range(2))
        print(f"  plain loop: {loop:,.0f} candles/s", flush=True)

        def flow_rate(**sinks: bool) -> float:
            truncate(dsn)
            started = time.perf_counter()
            run_main(build_flow(s, bots=configs, tail=False, **sinks))
            return n / (time.perf_counter() - started)

        full = flow_rate(write_postgres=True, write_redis=True)
        bare = flow_rate(write_postgres=False, write_redis=False)
        print(f"  dataflow: {full:,.0f} candles/s with its sinks, {bare:,.0f} without", flush=True)
    finally:
        truncate(dsn)
        delete_topics(s)
    what = f"{n:,} 1m candles (9 instruments) through 100 bots (5 strategies)"
    base = "the same 100 Bot objects (strategy + portfolio + mark), plain Python loop"
    return [
        Row(f"bots dataflow, 1 worker, {what}: Kafka in, directory, bot steps, Kafka events out (PostgreSQL and "
            "Redis sinks off, as the loop has none)", bare, base, loop, "candles/s", ">= 0.5x"),
        Row(f"(context) the same with its PostgreSQL and Redis sinks: a mark row per bot per candle "
            f"(~{n * 100 // 9:,} rows) and the rest", full, base, loop, "candles/s", "-"),
    ]  # fmt: skip


def _memory_child(count: int, candles_each: int) -> None:
    """In a subprocess: RSS before and after making ``count`` bots that each saw some candles."""
    import gc

    from bench.stream_bench import _proc_status_mb
    from bots.bot import Bot

    configs = bot_configs(count)
    series = {inst: [c for c in candle_series(candles_each) if c.inst_id == inst] for inst in INSTRUMENTS}
    gc.collect()
    before = _proc_status_mb("VmRSS")
    bots = []
    for config in configs:
        bot = Bot.create(config)
        bot.state = "running"
        for candle in series[config.inst_id]:
            bot.on_candle(candle)
        bots.append(bot)
    gc.collect()
    after = _proc_status_mb("VmRSS")
    pickled = sum(len(pickle.dumps(bot, protocol=pickle.HIGHEST_PROTOCOL)) for bot in bots) / count
    print(json.dumps({"before": before, "after": after, "pickled": pickled}))


def memory_rows(count: int = 1_000, candles_each: int = 500) -> list[Row]:
    proc = subprocess.run([sys.executable, "-m", "bench.bots_bench", "memory-child", str(count), str(candles_each)],
                          cwd=ROOT, capture_output=True, text=True, check=True, timeout=600)  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    per_bot_kb = (result["after"] - result["before"]) * 1024 / count
    return [
        Row(f"memory per running bot ({count:,} bots, each after {candles_each} candles): RSS growth / bots",
            per_bot_kb, "the same process before the bots", result["before"] * 1024, "KB",
            "-", higher_is_better=False, ratio_text=f"{result['pickled'] / 1024:.1f} KB pickled (snapshot)",
            decimals=1),
    ]  # fmt: skip


def main(argv: list[str]) -> int:
    if argv[:1] == ["memory-child"]:
        _memory_child(int(argv[1]), int(argv[2]))
        return 0
    from bench.common import table
    from tcp import services

    settings = services.ensure(Settings.load(), ("kafka", "postgres", "redis"))
    print(table(throughput_rows(settings) + memory_rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
