"""`make bench`: run every benchmark and write BENCHMARKS.md (machine, date, baselines, ratios).

Each figure stands beside a baseline measured in the same run, on the same machine: absolute
times on a shared 2-core machine are noisy, ratios much less so.

    .venv/bin/python bench/run.py                      # everything, the issues' sizes -> BENCHMARKS.md
    BENCH_SCALE=0.05 .venv/bin/python bench/run.py     # quick check: 5% sizes, printed only
    .venv/bin/python bench/run.py --only batch,latency # some sections, printed only

BENCHMARKS.md is written only by a full run at scale 1; ``--only X --write`` replaces the
sections run (each then says when it was measured) and leaves the rest of the file as it is.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (  # noqa: E402
    backtest_bench,
    bots_bench,
    candles_bench,
    dashboard_bench,
    ingest_bench,
    lake_bench,
    scaling_bench,
    stream_bench,
)
from bench.common import (  # noqa: E402
    SCALE_ENV,
    Row,
    machine,
    scale,
    scaled,
    split_sections,
    table,
    write_section,
)
from tcp import services  # noqa: E402
from tcp.config import Settings  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
#: Sections written by other commands (``make drill``: bench/drills.py), kept by a full run.
KEPT_SECTIONS = ("Fault drills",)
SECTIONS = (
    "ingest", "batch", "stream", "scaling", "latency", "rss", "bots", "backtest", "lake", "dashboard",
)  # fmt: skip
#: Sections that need no Kafka, PostgreSQL or Redis.
LOCAL_SECTIONS = frozenset({"backtest"})

BATCH_NOTES = """\
Both sides read the same generated file (9 instruments, one day, OKX's formats) and build the
six default timeframes. Ours is exactly `tcp candles build`: `ReplaySource` (the OKX frame parser
or the CSV reader, validating every trade), `build_from_batches` (exact decimals, event order,
dedupe, flat candles) and `write_parquet`. The baseline is stdlib `json.loads` (or `str.split`)
per line and a dict of float candles: no validation, no dedupe, no flat candles, no output file.
The issue's target (>= 1.0x) is set against stdlib json + a dict loop: the JSON lines row. The CSV
row is context against a stricter baseline (`str.split`, which is far cheaper than `json.loads`):
there, checking every price and size as a positive decimal (~0.35 us per distinct string) and
exact Decimal aggregation cost more than the baseline's whole loop.
"""

STREAM_NOTES = """\
One worker (`bytewax.testing.run_main`), `build_flow(settings, tail=False)`, from the start of a
topic (6 partitions) pre-filled with generated trades (9 instruments, one day); timed from
`run_main` to its return, so every candle (and archived trade) is committed in PostgreSQL (a
database of its own, truncated before each run). The baseline is the same pipeline built with
Bytewax's own pieces: `KafkaSource` (`fetch.queue.backoff.ms=10`), `decode_trade` per message,
`key_on`, ONE `fold_window` (`EventClock` on the trade's ts with the same lateness,
`TumblingWindower` of 1m aligned to the epoch, exact Decimal OHLCV folded in timestamp order),
the same PostgreSQL upsert sink and Kafka sink for its candles, and with `archive_trades` one
archive row per trade into the same `trades` sink. It builds 1 timeframe where ours builds 6, and
no flat candles, dedupe or revisions, so the ratio is conservative. Same broker, same database,
same machine, same run; the PostgreSQL server and the embedded broker share the 2 cores. Ours is
the best of 2 runs, the baseline 1 run (run between ours): worth a few % in our favour.
"""

SCALING_NOTES = """\
The real CLI, `tcp candles run --exit-at-end --no-recovery`, as subprocesses over an `okx.trades`
topic of 6 partitions (a topic prefix of its own) pre-filled with generated trades in time order,
in three layouts: 1x1 (one process, `-w 1`), 1x2 (one process, `-w 2`: two worker threads under one
GIL) and 2x1 (two processes `-w 1 -i 0|1 -a` two free local ports: a Bytewax cluster). Two data
sets: the stream section's 9 instruments over a day (weighted like the live set: Kafka's
partitioner puts them in 4 of the 6 partitions, one holding about half the trades) and 120
synthetic instruments round robin over 2 h (even partitions). Each run writes into the bench
database's `candles` (truncated before it), to Kafka `candles` and to Redis, like a deployment;
each layout runs twice, interleaved, and the faster run is shown. Timed from the spawn to the exit
of every process (start-up included: interpreter, imports, services check, migrations, the
cluster's connection), and from the earliest "reading from" log line of the Kafka source (the input
starts) to that exit: start-up excluded, but not the first fetch, the end-of-partition detection
and the shut-down, a fixed cost measured by running each layout over an empty 6-partition topic
(the "less the fixed cost" figure subtracts it). CPU-s: user + system time of the layout's
processes, start-up included; "machine busy": the share of both cores' time that was busy during
the run (/proc/stat: the dataflow, the services and anything else on the machine). The baseline is
1x1 in the same run. The candles of every run are compared with the first 1x1 run's, row by row,
every column as PostgreSQL's text (NUMERIC exactly as stored): the bench stops if they differ or if
the 1m candles do not count every trade. All processes share this machine's 2 cores with the Kafka
broker (embedded Tansu), PostgreSQL and Redis (and whatever else runs on the machine: see the load
average above), so a second process or worker competes with the services it feeds: these are
figures for this box, not for a cluster of machines.
"""

LATENCY_NOTES = """\
The flow runs in a subprocess (`tail=True`, recovery off, timeframes 1s + the six defaults,
archive on) while this process produces trades with event ts = now through the project's
producer (9 instruments, weighted as the live set). For every 1s candle closing after a 3 s
warm-up, latency = the moment its PostgreSQL write committed (`PostgresWriter.write` returned,
recorded in the subprocess) minus `ts_close + lateness` (the earliest moment the candle may be
final). 1s candles are allowed by `tcp.timeframes` and keep the run short. Baseline: the same
measurement of the Bytewax windowing pipeline (1s tumbling windows, `wait_for_system_duration` =
the same lateness, archive on).
"""

RSS_NOTES = """\
A subprocess imports everything, records its RSS (the baseline), then runs the whole dataflow
(`run_main`, `tail=False`, archive on) over a topic of 1,000 synthetic instruments with trades
spread over 2 h of event time (longer than the 1 h retention of final candles, so the state is
at its steady size). Peak = VmHWM of that process. (`ru_maxrss` is printed too, but on Linux it
survives `execve` and starts at the forking parent's size, so in a subprocess of this large
process it overstates.) The candle core alone (`CandleBook`) is measured the same way.
"""


BOTS_NOTES = """\
100 bots (5 strategy configs x 9 instruments, 1m) over a `candles` topic pre-filled with 9,000
random-walk candles per instrument (81,000 candles, ~810,000 bot-candles; a run of the dataflow
also pays about 1 s of start-up and shut-down: 12 Kafka consumers, topic-id checks, end of input). The dataflow is `dataflows.bots.build_flow(bots=...,
tail=False)` in one worker (`run_main`), timed to its return (every sink flushed): with its sinks
(PostgreSQL: a mark row per bot per candle, i.e. ~900,000 `bot_performance` rows, plus signals,
fills and bot rows; Redis; Kafka events), and with the PostgreSQL and Redis sinks left out. The
baseline is the same 100 `Bot` objects (the same strategy instances, portfolio and mark at every
close) fed the same candles in a plain Python loop in this process. Memory: a subprocess creates
1,000 running bots that each saw 500 candles; RSS growth per bot, and the pickled size per bot
(what a recovery snapshot stores).
"""

BACKTEST_NOTES = """\
`ema_crossover` 12/26 and one bot (fee 0.001, 5 bps, all-in) over generated 1m candles (a random
walk on a 0.1 tick; volumes with 8 decimals, so volume, quote volume and vwap are nearly all
distinct) in a Parquet file written like `tcp candles build` (decimal128 columns). The engine is
`backtest.engine.run_backtest`: DuckDB read, every price and volume turned into its exact decimal
string, the live `Bot` (strategy + portfolio) candle by candle, the exact equity curve and the
metrics; best of 2. The baseline is the same logic (both EMAs, the crossover, the fill rule) as a
plain float loop over the closes, already in a numpy array, timed in the same run: no file, no
exact decimals, no `Candle` objects. The sweep is `run_sweep` with 2 worker processes (each reads
the candles once), timed to its return; its baseline is the engine in this one process.
"""


def _check_ratio_targets(rows: list[Row]) -> list[Row]:
    """``met`` for rows whose target is just a ratio (``>= 1.5x``)."""
    for row in rows:
        match = re.fullmatch(r">= ([0-9.]+)x", row.target.strip())
        if row.met is None and match:
            row.met = row.ratio >= float(match.group(1))
    return rows


LAKE_NOTES = """\
2,000,000 trades (9 instruments, one day) COPYed into `trades` of the bench database. Export:
`export_lake` (what `tcp export lake` runs), a first run that takes every row: server-side
cursor, exact decimals (decimal128(38, 18)), one zstd Parquet file per instrument and day.
Baseline: `COPY (SELECT ...) TO STDOUT` of the same columns read to the end, not parsed (the
floor of getting the rows out of PostgreSQL). Reads: DuckDB over the lake, `count(*)` and the
exact `sum(px)` and `sum(sz)` per instrument, through the `trades` view of `tcp sql` (one row per
(inst_id, trade_id): a window over all rows) and, for context, over the files directly; best of
3. Baseline: `pyarrow.parquet.read_table` of the same files.
"""


DASHBOARD_NOTES = """\
`tcp dashboard` in a subprocess over 10,000 final 1m candles (`TCP_DASHBOARD_CANDLES=10000`),
Debian's headless Chromium driven by Selenium. First render: from `driver.get` to the candlestick
glyph holding all 10,000 candles plus two animation frames: the very first load in a fresh browser
(context), then the best of 5 with the browser's cache warm (scripts cached and compiled, as for
a user coming back: the target's row); baseline: the same figures and rows as a standalone Bokeh
HTML file, measured the same way. Live delay: live trades (100/s, 9 instruments)
through `tcp candles run` (1s candles, lateness 500 ms), which produces each final candle to the
`candles` topic and publishes it on Redis in the same step; the page switched to BTC-USDT 1s;
delay = when BokehJS streamed the candle into the chart (stamped in the page) minus the candle's
Kafka message timestamp; baseline: a plain Kafka consumer of the `candles` topic in the bench
process, the same candles.
Server CPU: the server process's CPU time over 20 s of live updates (a forming candle every
0.2 s, a final one every second) with 50 `bokeh.client` sessions open, against 1 session.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the benchmarks; write BENCHMARKS.md")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--scale", type=float, help=f"size factor (default ${SCALE_ENV} or 1)")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md even for a partial run")
    args = parser.parse_args(argv)
    if args.scale is not None:
        os.environ[SCALE_ENV] = str(args.scale)
    only = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    full = set(only) == set(SECTIONS) and scale() == 1.0

    local = set(only) <= LOCAL_SECTIONS
    settings = Settings.load() if local else services.ensure(Settings.load(), ("kafka", "postgres", "redis"))
    load_before = os.getloadavg()
    started = time.monotonic()
    sections: list[str] = []

    def section(name: str, title: str, notes: str, produce: Callable[[], list[Row]]) -> None:
        if name not in only:
            return
        print(f"{title} ...", flush=True)
        rows = _check_ratio_targets(produce())
        sections.append(
            f"## {title}\n\n{notes}\n" + table(rows) if notes else f"## {title}\n\n" + table(rows)
        )

    def ingest() -> list[Row]:
        rows = ingest_bench.decode_rows(scaled(500_000))
        print("  produce into Kafka ...", flush=True)
        return rows + ingest_bench.produce_rows(settings, scaled(300_000))

    section("ingest", "Ingest (issue 2)", "", ingest)
    section(
        "batch",
        "Candles, batch mode: `tcp candles build`",
        BATCH_NOTES,
        lambda: candles_bench.batch_rows(scaled(1_000_000)),
    )
    section(
        "stream",
        "Candles, streaming: Kafka -> candles -> PostgreSQL, one worker",
        STREAM_NOTES,
        lambda: stream_bench.throughput_rows(settings),
    )
    section(
        "scaling",
        "Scaling: the candle dataflow as 1x1, 1x2 and 2x1 (processes x workers), 6 partitions",
        SCALING_NOTES,
        lambda: scaling_bench.scaling_rows(settings),
    )
    section(
        "latency",
        "Candles, latency: window end (+ lateness) -> row committed in PostgreSQL",
        LATENCY_NOTES,
        lambda: stream_bench.latency_rows(settings),
    )
    section(
        "rss",
        "Candles, memory: 1,000 instruments x 6 timeframes",
        RSS_NOTES,
        lambda: stream_bench.rss_rows(settings),
    )

    section(
        "bots",
        "Strategies and bots: 100 bots in the bots dataflow (issue 4)",
        BOTS_NOTES,
        lambda: bots_bench.throughput_rows(settings) + bots_bench.memory_rows(),
    )
    section(
        "backtest",
        "Backtests: the engine over 1,000,000 candles, and sweeps",
        BACKTEST_NOTES,
        lambda: backtest_bench.engine_rows() + backtest_bench.sweep_rows(),
    )
    section(
        "lake",
        "The Parquet lake: export from PostgreSQL, DuckDB reads",
        LAKE_NOTES,
        lambda: lake_bench.lake_rows(settings),
    )
    section(
        "dashboard",
        "The dashboard: first render, live delay, server CPU",
        DASHBOARD_NOTES,
        lambda: dashboard_bench.dashboard_rows(settings),
    )

    load_after = os.getloadavg()
    kafka_mode = "configured" if Settings.load().kafka_bootstrap else "embedded Tansu, in memory"
    pg_mode = "configured" if Settings.load().postgres_dsn.get_secret_value() else "embedded PostgreSQL 18"
    text = (
        "# Benchmarks\n\n"
        "Written by `make bench` (bench/run.py); do not edit by hand.\n\n"
        f"Machine: {machine()}.\n"
        f"Load average (1 min) {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end; "
        f"{(time.monotonic() - started) / 60:.1f} min in all.\n"
        + (
            ""
            if local
            else f"Kafka: {settings.kafka_bootstrap} ({kafka_mode}). PostgreSQL: {pg_mode}, database "
            f"`{stream_bench.BENCH_DB}`.\n"
        )
        + (f"Scale: {scale()} ({SCALE_ENV}); sections: {', '.join(only)}.\n" if not full else "")
        + "\n"
        + "\n\n".join(sections)
        + "\n"
    )
    if full:
        if OUT.exists():
            _, old = split_sections(OUT.read_text())
            text += "".join(f"\n{old[title]}\n" for title in KEPT_SECTIONS if title in old)
        OUT.write_text(text)
        print(f"written to {OUT}")
    elif args.write:
        # Only the sections run replace theirs; each says when and where it was measured, since
        # the file's header belongs to the last full run.
        for part in sections:
            title, body = part[3:].split("\n", 1)
            when = f"(This section: re-run alone, {machine()}; scale {scale()}.)"
            write_section(OUT, title, f"{when}\n\n{body.strip()}")
        print(f"sections written to {OUT}")
    else:
        print("(partial or scaled run: BENCHMARKS.md left as it is; --write to write it)")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
