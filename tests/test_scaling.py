"""Scaling out does not change the candles (docs/scaling.md).

The candle dataflow as users run it, ``tcp candles run --exit-at-end``, over one 6-partition
``okx.trades`` topic in three layouts: 1 process x 1 worker, 1 process x 2 workers, and a
cluster of 2 processes x 1 worker (``-i 0|1 -a ...``). Each writes into a database of its own;
the candles must be identical to the last digit (every column as PostgreSQL's text, so even the
scale of a NUMERIC counts) and equal to the reference aggregation (tests/reference_candles.py).
The sources' logs also show that the cluster split the partitions: each read once, by one
process, and each process read some (two independent processes reading everything would write
the same candles too: the upserts are idempotent).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from dataflows.candles import CANDLE_COLUMNS
from tcp.config import Settings
from tcp.topics import ensure_topics
from tests.reference_candles import generate_arrivals, reference_candles
from tests.test_candles_flow import (
    ALL,
    REPLAY_LATENESS_MS,
    assert_same,
    candle_processes,
    db_rows,
    expected,
    free_port,
    produce_trades,
    with_db,
)

pytestmark = pytest.mark.services

PARTITIONS = 6
OPENED = re.compile(r"okx\.trades\[(\d+)\]: reading from ")


def candle_texts(dsn: str) -> list[str]:
    """Every candle row as PostgreSQL's text (NUMERIC exactly as stored), in key order."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        rows = conn.execute(
            f"SELECT row({', '.join(CANDLE_COLUMNS)})::text FROM candles "  # noqa: S608
            "ORDER BY inst_id, timeframe, ts_close"
        ).fetchall()
    return [row[0] for row in rows]


def layouts() -> dict[str, list[list[str]]]:
    """``tcp candles run`` arguments per process, per layout (processes x workers)."""
    addresses = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    return {
        "1x1": [["-w", "1"]],
        "1x2": [["-w", "2"]],
        "2x1": [["-w", "1", "-i", str(i), "-a", addresses] for i in (0, 1)],
    }


def test_1x1_1x2_and_a_2_process_cluster_write_identical_candles_equal_to_the_reference(
    settings: Settings, make_database: Callable[[], str], tmp_path: Path
) -> None:
    s = settings.model_copy(
        update={
            "topic_prefix": f"{settings.topic_prefix}scaling.",
            "topic_partitions": PARTITIONS,
            "candle_lateness_ms": REPLAY_LATENESS_MS,
        }
    )
    ensure_topics(s)
    # Four instruments, out-of-order arrivals within the lateness, duplicates, a UTC midnight.
    trades = [a.trade for a in generate_arrivals(20_000, seed=23)]
    produce_trades(s, trades)
    want = expected(reference_candles(trades, ALL))

    texts: dict[str, list[str]] = {}
    timings: dict[str, float] = {}
    for name, commands in layouts().items():
        dsn = make_database()
        workdir = tmp_path / name
        workdir.mkdir()
        started = time.monotonic()
        with candle_processes(
            with_db(s, dsn), workdir, [["--exit-at-end", *args] for args in commands], log_level="INFO"
        ) as procs:
            codes = [proc.wait(90) for proc in procs]
        timings[name] = time.monotonic() - started
        assert codes == [0] * len(commands), name

        opened = [
            [int(part) for part in OPENED.findall((workdir / f"candles-run-{i}.log").read_text())]
            for i in range(len(commands))
        ]
        assert sorted(part for parts in opened for part in parts) == list(range(PARTITIONS)), (name, opened)
        assert all(opened), f"{name}: a process of the cluster read no partition: {opened}"

        assert_same(db_rows(dsn), want, f"candles with {name}")
        texts[name] = candle_texts(dsn)

    assert len(texts["1x1"]) == len(want)
    assert texts["1x2"] == texts["1x1"]
    assert texts["2x1"] == texts["1x1"]
    print("\nlayouts:", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
