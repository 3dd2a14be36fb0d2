"""Scaling figures (the deploy issue): the candle dataflow as 1x1, 1x2 and 2x1 (processes x workers).

An ``okx.trades`` topic of 6 partitions (a topic prefix of its own) is filled with generated
trades, in time order: the stream section's 9 instruments over a day (weighted like the live
set, so a few partitions hold most of the trades), then, in a second topic, 120 synthetic
instruments round robin over 2 h (spread evenly over partitions and workers). For each, the real
CLI runs over the topic from the start to its end in each layout, twice, interleaved:

* 1x1: one ``tcp candles run --exit-at-end --no-recovery -w 1``;
* 1x2: one process with ``-w 2``;
* 2x1: two processes ``-w 1 -i 0 -a A0,A1`` and ``-w 1 -i 1 -a A0,A1`` (free local ports).

Each run writes into the bench database's ``candles`` (truncated before it) and produces its
candles to the same Kafka topics and Redis (the trades topic is shared, so the prefix is too).
Timed from the spawn to the exit of every process, and from the first partition opened (the
source's "reading from" log line, the earliest of all processes) to that exit: the second leaves
out the interpreter start-up, the imports, the services check, the migrations and the cluster's
connection, but not the first fetch, the end of input and the shut-down, which are measured
apart as each layout's fixed cost over an empty topic. The CPU time of the processes
(``RUSAGE_CHILDREN``) is reported too, and how busy the whole machine was (/proc/stat: the
dataflow, the services and anything else). The candles of every run are compared with the first
run's (1x1) row by row, every column as PostgreSQL's text (NUMERIC exactly as stored): the bench
raises if they differ, or if the candles do not count every trade.

Run it alone: ``BENCH_SCALE=0.05 .venv/bin/python -m bench.scaling_bench``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Row, scaled  # noqa: E402
from bench.stream_bench import (  # noqa: E402
    bench_database,
    delete_topics,
    fill_topic,
    fresh_settings,
    topic_messages,
    truncate,
)
from tcp.config import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 6
_OPENED = re.compile(r"\[(\d+)\]: reading from ")

__all__ = [
    "DATA_SETS",
    "LAYOUTS",
    "DataSet",
    "Layout",
    "LayoutRun",
    "candle_texts",
    "run_layout",
    "scaling_rows",
]


@dataclass(frozen=True)
class Layout:
    """A Bytewax cluster: ``processes`` x ``workers`` (threads per process)."""

    processes: int
    workers: int

    @property
    def name(self) -> str:
        return f"{self.processes}x{self.workers}"

    def commands(self) -> list[list[str]]:
        """The arguments of ``tcp candles run`` for each process (free local ports for ``-a``)."""
        base = ["--exit-at-end", "--no-recovery", "-w", str(self.workers)]
        if self.processes == 1:
            return [base]
        addresses = ",".join(f"127.0.0.1:{_free_port()}" for _ in range(self.processes))
        return [[*base, "-i", str(i), "-a", addresses] for i in range(self.processes)]


LAYOUTS = (Layout(1, 1), Layout(1, 2), Layout(2, 1))


@dataclass(frozen=True)
class LayoutRun:
    layout: Layout
    #: From the spawn of the processes to the exit of the last one.
    total_s: float
    #: From the first partition opened (any process) to the exit of the last one.
    input_s: float
    #: User + system CPU time of the processes.
    cpu_s: float
    #: The Kafka partitions each process read (from the sources' "reading from" lines).
    opened: list[list[int]]
    #: The share of the machine's CPU time (all cores) that was busy during the run, anyone's.
    machine_busy: float


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat (all cores)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]  # user .. steal
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _child_env(settings: Settings, home: Path) -> dict[str, str]:
    """Exactly these settings as TCP_* (nothing inherited), JSON logs at INFO (timestamps to parse)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCP_")}
    env.update(settings.as_env())
    env.update(TCP_HOME=str(home), TCP_LOG_FORMAT="json", TCP_LOG_LEVEL="INFO")
    return env


def _partitions_opened(log: str) -> tuple[float | None, list[int]]:
    """The epoch seconds of the first "reading from" line of the Kafka source in a JSON log, and
    the partitions it names."""
    first = None
    parts = []
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        match = _OPENED.search(record.get("msg", ""))
        if record.get("logger") == "dataflows.kafka_io" and match:
            at = datetime.fromisoformat(record["ts"]).timestamp()
            first = at if first is None else min(first, at)
            parts.append(int(match.group(1)))
    return first, sorted(parts)


def run_layout(settings: Settings, layout: Layout, workdir: Path, timeout_s: float = 600.0) -> LayoutRun:
    """Run ``tcp candles run`` as ``layout`` over ``settings``' topic until every process has exited.

    Raises (with the end of each process's log) if one fails or the cluster does not end in
    ``timeout_s``."""
    home = workdir / f"home-{layout.name}"
    home.mkdir(parents=True, exist_ok=True)
    env = _child_env(settings, home)
    logs = [workdir / f"candles-{layout.name}-{i}.log" for i in range(layout.processes)]
    procs: list[subprocess.Popen[bytes]] = []
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before = _cpu_jiffies()
    started = time.time()
    try:
        for args, log in zip(layout.commands(), logs, strict=True):
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "tcp.cli", "candles", "run", *args],
                        env=env,
                        cwd=ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + timeout_s
        codes = [proc.wait(max(0.1, deadline - time.monotonic())) for proc in procs]
        ended = time.time()
    except subprocess.TimeoutExpired:
        codes = None
        ended = time.time()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_after = _cpu_jiffies()
    texts = [log.read_text(errors="replace") for log in logs]
    if codes is None or any(codes):
        tails = "\n".join(f"---- {log.name}\n{text[-3000:]}" for log, text in zip(logs, texts, strict=True))
        what = f"did not end within {timeout_s:.0f} s" if codes is None else f"exit codes {codes}"
        msg = f"candle dataflow {layout.name}: {what}\n{tails}"
        raise RuntimeError(msg)
    opened = [_partitions_opened(text) for text in texts]
    firsts = [at for at, _parts in opened if at is not None]
    if not firsts:
        msg = f"candle dataflow {layout.name}: no 'reading from' line in the logs (TCP_LOG_LEVEL=INFO?)"
        raise RuntimeError(msg)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    busy = (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1])
    return LayoutRun(
        layout, ended - started, ended - min(firsts), cpu, [parts for _at, parts in opened], busy
    )


def candle_texts(dsn: str) -> list[str]:
    """Every final candle in ``candles`` as PostgreSQL's text of the row (NUMERIC exactly as
    stored, scale included), sorted; ``written_at`` (when it was written) left out."""
    import psycopg

    from dataflows.candles import CANDLE_COLUMNS

    columns = ", ".join(CANDLE_COLUMNS)
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        rows = conn.execute(
            f"SELECT row({columns})::text FROM candles ORDER BY inst_id, timeframe, ts_close"  # noqa: S608
        ).fetchall()
    return [row[0] for row in rows]


def counted_trades(dsn: str, timeframe: str) -> int:
    """The trades the candles of ``timeframe`` count (every trade is in one candle per timeframe)."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(trade_count), 0) FROM candles WHERE timeframe = %s", (timeframe,)
        ).fetchone()
    return int(row[0]) if row else 0


def first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"row {i}: {x} != {y}"
    return f"{len(a)} rows against {len(b)}"


@dataclass(frozen=True)
class DataSet:
    """What fills the topic: ``topic_messages(n, instruments, span_ms)``."""

    name: str
    instruments: int
    span_ms: int


#: The stream section's 9 instruments (weighted like the live set: a few partitions hold most
#: trades), and many small instruments that spread evenly over the partitions and the workers.
DATA_SETS = (
    DataSet("9 instruments, one day (the stream section's)", 9, 86_400_000),
    DataSet("120 synthetic instruments, round robin, 2 h", 120, 7_200_000),
)


@dataclass(frozen=True)
class Measured:
    data: DataSet
    #: The share of the trades in each partition.
    shares: list[float]
    #: Per layout, the faster (from spawn to exit) of its runs.
    best: dict[str, LayoutRun]
    candles: int


def measure(settings: Settings, dsn: str, data: DataSet, n: int, repeat: int, workdir: Path) -> Measured:
    """Every layout ``repeat`` times (interleaved) over a topic filled with ``data``; raises if a
    run's candles differ from the first run's (1x1) or do not count every trade."""
    s = fresh_settings(settings, dsn, "scaling", topic_partitions=PARTITIONS)
    best: dict[str, LayoutRun] = {}
    reference: list[str] | None = None
    try:
        print(f"  filling {s.topic('okx.trades')} ({PARTITIONS} partitions) with {n:,} trades: {data.name} ...",
              flush=True)  # fmt: skip
        counts = fill_topic(s, topic_messages(n, instruments=data.instruments, span_ms=data.span_ms))
        for _ in range(repeat):
            for layout in LAYOUTS:
                truncate(dsn)
                run = run_layout(s, layout, workdir, timeout_s=max(300.0, n / 2_000))
                texts = candle_texts(dsn)
                counted = counted_trades(dsn, s.timeframes[0])
                print(
                    f"  {layout.name}: {run.total_s:.2f} s from spawn ({n / run.total_s:,.0f} trades/s), "
                    f"{run.input_s:.2f} s from the first partition opened ({n / run.input_s:,.0f} trades/s), "
                    f"{run.cpu_s:.1f} CPU-s, machine {run.machine_busy:.0%} busy; {len(texts):,} candles "
                    f"counting {counted:,} trades; "
                    f"partitions read {run.opened}",
                    flush=True,
                )
                if counted != n:
                    msg = f"{layout.name}: the {s.timeframes[0]} candles count {counted:,} trades, not {n:,}"
                    raise RuntimeError(msg)
                if reference is None:
                    reference = texts
                elif texts != reference:
                    diff = first_difference(texts, reference)
                    msg = f"the candles of {layout.name} differ from those of {LAYOUTS[0].name}: {diff}"
                    raise RuntimeError(msg)
                if layout.name not in best or run.total_s < best[layout.name].total_s:
                    best[layout.name] = run
    finally:
        truncate(dsn)
        delete_topics(s)
    assert reference is not None
    return Measured(data, [counts.get(p, 0) / n for p in range(PARTITIONS)], best, len(reference))


def scaling_rows(settings: Settings, n: int | None = None, repeat: int = 2) -> list[Row]:
    """trades/s of each layout against 1x1 in the same run, per data set; the fixed cost of each
    layout over an empty topic. Raises if the candles of two runs differ."""
    n = n if n is not None else scaled(1_000_000)
    dsn = bench_database(settings)
    fixed: dict[str, LayoutRun] = {}
    with tempfile.TemporaryDirectory(prefix="tcp-scaling-") as tmp:
        workdir = Path(tmp)
        measured = [measure(settings, dsn, data, n, repeat, workdir) for data in DATA_SETS]
        empty = fresh_settings(settings, dsn, "scaling-empty", topic_partitions=PARTITIONS)
        try:
            for layout in LAYOUTS:
                fixed[layout.name] = run = run_layout(empty, layout, workdir)
                print(
                    f"  {layout.name} over an empty topic: {run.total_s:.2f} s from spawn, {run.input_s:.2f} s "
                    f"from the first partition opened, {run.cpu_s:.1f} CPU-s",
                    flush=True,
                )
        finally:
            delete_topics(empty)
    rows = [row for m in measured for row in _rows(n, m, fixed)]
    base = fixed[LAYOUTS[0].name]
    for layout in LAYOUTS:
        run = fixed[layout.name]
        rows.append(
            Row(
                f"(context) fixed cost of {layout.name}: over an empty {PARTITIONS}-partition topic, from the first "
                f"partition opened to exit (first fetch, end of every partition, shut-down); the start-up before "
                f"it took {run.total_s - run.input_s:.1f} s",
                run.input_s,
                "1x1, same run",
                base.input_s,
                "s",
                "-",
                higher_is_better=False,
                ratio_text="(baseline)" if run is base else None,
                decimals=2,
            )
        )
    return rows


def _rows(n: int, m: Measured, fixed: dict[str, LayoutRun]) -> list[Row]:
    base = m.best[LAYOUTS[0].name]
    shares = "/".join(f"{share:.0%}" for share in m.shares)
    rows = []
    for layout in LAYOUTS:
        run = m.best[layout.name]
        split = ""
        if len(run.opened) > 1:
            read = [sum(m.shares[p] for p in parts) for parts in run.opened]
            split = (
                "; the processes read " + " and ".join(f"{share:.0%}" for share in read) + " of the trades"
            )
        where = f"{m.data.name}: `tcp candles run` {layout.name}"
        first = f" ({n:,} trades; the {PARTITIONS} partitions hold {shares})" if run is base else ""
        net = n / max(1e-9, run.input_s - fixed[layout.name].input_s)
        rows.append(
            Row(
                f"{where}{first}, from spawn to exit (start-up included); {run.cpu_s:.1f} CPU-s, machine "
                f"{run.machine_busy:.0%} busy{split}",
                n / run.total_s,
                f"1x1, same run ({base.cpu_s:.1f} CPU-s)",
                n / base.total_s,
                "trades/s",
                "-",
                ratio_text="(baseline)" if run is base else None,
            )
        )
        rows.append(
            Row(
                f"{where}, from the first partition opened to exit (start-up excluded); {net:,.0f} trades/s "
                "less the fixed cost below",
                n / run.input_s,
                "1x1, same run",
                n / base.input_s,
                "trades/s",
                "-",
                ratio_text="(baseline)" if run is base else None,
            )
        )
    rows.append(
        Row(
            f"{m.data.name}: candles identical: yes ({m.candles:,} rows): every run of 1x2 and 2x1 against 1x1, "
            "every column as PostgreSQL's text (NUMERIC exactly as stored)",
            m.candles,
            "1x1",
            m.candles,
            "rows",
            "identical",
            met=True,
            ratio_text="identical",
        )
    )
    return rows


def main() -> int:
    from bench.common import table
    from tcp import services

    settings = services.ensure(Settings.load(), ("kafka", "postgres", "redis"))
    print(table(scaling_rows(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
