"""The Parquet lake (the backtests issue): export rate PostgreSQL -> lake, DuckDB read rate.

* :func:`lake_rows`: N trades (9 instruments, one day; prices with up to 8 decimals) are COPYed
  into ``trades`` of the bench database, then:

  - ``export_lake`` of that table (a first run: every row; PostgreSQL -> exact decimals ->
    partitioned Parquet). Baseline: ``COPY (SELECT the same columns ...) TO STDOUT`` read to the
    end by psycopg, the rows not even parsed: the floor of getting them out of PostgreSQL.
  - a DuckDB aggregate over the ``trades`` view of ``tcp sql`` (count, exact sums of px and sz per
    instrument; the view keeps one row per (inst_id, trade_id)), and the same aggregate over the
    files without the de-duplication (context). Baseline: ``pyarrow.parquet.read_table`` of the
    same files (reading them into memory, no aggregate).

Run it alone: ``BENCH_SCALE=0.1 .venv/bin/python bench/run.py --only lake``.
"""

from __future__ import annotations

import io
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Row, scaled  # noqa: E402
from bench.stream_bench import bench_database  # noqa: E402
from tcp.config import Settings  # noqa: E402

TRADES = 2_000_000
START = "2024-03-10 00:00:00+00"
INSTRUMENTS = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "XRP-USDT", "DOGE-USDT", "ADA-USDT", "LTC-USDT",
               "DOT-USDT", "LINK-USDT")  # fmt: skip
_COLUMNS = "trade_id, ts, px, sz, side, count, source, seq_id, origin, received_at, written_at"


def _fill(dsn: str, n: int) -> None:
    import psycopg

    rng = random.Random(3)
    step_us = 86_400_000_000 // n
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE trades")
        with conn.cursor().copy(
            "COPY trades (inst_id, trade_id, ts, px, sz, side, origin) FROM STDIN"
        ) as copy:
            buf = io.StringIO()
            for i in range(n):
                inst = INSTRUMENTS[i % len(INSTRUMENTS)]
                px = f"{40000 + rng.random() * 100:.1f}"
                sz = f"{rng.random() * 2:.8f}"
                side = "buy" if i % 2 else "sell"
                buf.write(f"{inst}\t{i}\t{_ts(i * step_us)}\t{px}\t{sz}\t{side}\tsim\n")
                if i % 100_000 == 99_999:
                    copy.write(buf.getvalue())
                    buf = io.StringIO()
            copy.write(buf.getvalue())
        conn.execute("VACUUM ANALYZE trades")


def _ts(us: int) -> str:
    seconds, micro = divmod(us, 1_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"2024-03-10 {hours:02d}:{minutes:02d}:{secs:02d}.{micro:06d}+00"


def _copy_out(dsn: str) -> int:
    """Baseline: the same rows out of PostgreSQL as text, not even parsed."""
    import psycopg

    size = 0
    with (
        psycopg.connect(dsn) as conn,
        conn.cursor().copy(
            f"COPY (SELECT inst_id, ({START!r}::timestamptz)::date, {_COLUMNS} FROM trades) TO STDOUT"  # noqa: S608
        ) as copy,
    ):
        for chunk in copy:
            size += len(chunk)
    return size


def lake_rows(settings: Settings, n: int | None = None) -> list[Row]:
    import duckdb
    import pyarrow.parquet as pq

    from backtest.lake import export_lake, open_lake

    n = n or scaled(TRADES)
    dsn = bench_database(settings)
    print(f"  filling trades with {n:,} rows ...", flush=True)
    _fill(dsn, n)
    tmp = Path(tempfile.mkdtemp(prefix="tcp-bench-lake-"))
    try:
        started = time.perf_counter()
        _copy_out(dsn)
        copy_s = time.perf_counter() - started
        lake = tmp / "lake"
        started = time.perf_counter()
        run = export_lake(dsn, lake, tables=("trades",))[0]
        export_s = time.perf_counter() - started
        assert run.rows == n, (run.rows, n)

        query = "SELECT inst_id, count(*), sum(px), sum(sz) FROM {} GROUP BY 1"
        con = open_lake(lake)
        raw = f"read_parquet('{lake}/trades/**/*.parquet', hive_partitioning = true)"
        timings: dict[str, float] = {}
        for name, source in (("view", "trades"), ("raw", raw)):
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                result = con.sql(query.format(source)).fetchall()
                best = min(best, time.perf_counter() - started)
            assert sum(r[1] for r in result) == n
            timings[name] = best
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            table = pq.read_table(lake / "trades")
            best = min(best, time.perf_counter() - started)
        assert table.num_rows == n
        files = run.files
        del con, table
        duckdb.default_connection().close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    copy_name = "COPY (SELECT the same columns) TO STDOUT, read to the end by psycopg (not parsed)"
    arrow_name = "pyarrow.parquet.read_table of the same files (read into memory, no aggregate)"
    return [
        Row(f"`tcp export lake`, trades: {n:,} rows -> {files} partitions (exact decimals, zstd): "
            f"{export_s:.2f} s", n / export_s, copy_name, n / copy_s, "rows/s", "-"),
        Row(f"`tcp sql` over the lake: count, exact sum(px) and sum(sz) per instrument, through the de-duplicating "
            f"`trades` view: {timings['view']:.2f} s", n / timings["view"], arrow_name, n / best, "rows/s", "-"),
        Row(f"(context) the same aggregate over the files, without the de-duplication: {timings['raw']:.2f} s",
            n / timings["raw"], arrow_name, n / best, "rows/s", "-"),
    ]  # fmt: skip
