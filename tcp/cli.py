"""The `tcp` command: one entry point, with subcommands.

    tcp services up|down|status
    tcp ingest okx | replay FILE [--speed N|max] | simulate [...]
    tcp candles run [-w N] [-i I -a ADDRS] [--exit-at-end] | build --input FILE --output OUT.parquet
    tcp archive run [-w N] [-i I -a ADDRS] [--exit-at-end]
    tcp bots run [--bots FILE] | create FILE [--start] | start|pause|resume|stop NAME.. | update | list | supervise
    tcp dlq [--limit N]
    tcp db migrate | backup --out FILE | restore FILE [--clean]
    tcp export candles|signals|bot-trades|bot-performance --out FILE.parquet [filters]
    tcp run [--input FILE [--speed N|max]] [--bots FILE.json] [--exit-at-end]
    tcp backtest run --strategy NAME --params JSON --candles FILE_OR_DIR --inst-id ID --timeframe TF --out DIR
    tcp backtest sweep --strategy NAME --grid JSON --candles FILE_OR_DIR --inst-id ID --timeframe TF --out DIR
    tcp demo

The environment is read once, here (``Settings.load``); everything below gets the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tcp import services
from tcp.config import Settings
from tcp.observe import (
    Endpoint,
    configure_logging,
    endpoints,
    scrape,
    serve_metrics,
    summary_rows,
    watch_counts,
)

if TYPE_CHECKING:  # the CLI imports the heavy modules lazily, per command
    from bytewax.dataflow import Dataflow

    from connectors.base import TradeSource
    from connectors.ingest import IngestStats

__all__ = ["main"]

log = logging.getLogger("tcp")


# --------------------------------------------------------------------------------------------
# Progress on a terminal


class Progress:
    """Prints one status line: rewritten in place on a terminal, every 10 s into a log file."""

    def __init__(self, label: str, *, stream: TextIO = sys.stderr) -> None:
        self._label = label
        self._stream = stream
        self._tty = stream.isatty()
        self._last_plain = 0.0

    def __call__(self, stats: IngestStats) -> None:
        line = f"{self._label}: {stats.line()}"
        if self._tty:
            self._stream.write("\r\x1b[2K" + line)
            self._stream.flush()
        elif time.monotonic() - self._last_plain >= 10:
            self._last_plain = time.monotonic()
            self._stream.write(line + "\n")

    def done(self, stats: IngestStats) -> None:
        if self._tty:
            self._stream.write("\n")
        self._stream.write(f"{self._label} done: {stats.line()}\n")


# --------------------------------------------------------------------------------------------
# services


def _cmd_services(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "up":
        from sinks.migrate import apply_migrations
        from tcp.topics import ensure_topics

        ready = services.ensure(settings)
        ensure_topics(ready)  # ready for use: topics made, tables migrated
        apply_migrations(ready.postgres_dsn.get_secret_value())
        print(f"kafka     {ready.kafka_bootstrap}")
        print(f"postgres  {services.redact(ready.postgres_dsn.get_secret_value())}")
        print(f"redis     {services.redact(ready.redis_url.get_secret_value())}")
        print(f"state     {ready.home}")
        return 0
    if args.action == "down":
        stopped = services.stop(settings)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    rows = services.status(settings)
    print(f"{'service':<10}{'mode':<26}{'up':<5}{'pid':<8}address")
    for row in rows:
        print(
            f"{row.service:<10}{row.mode:<26}{'yes' if row.up else 'no':<5}{row.pid or '-'!s:<8}{row.address}"
        )
    running = endpoints(settings)
    if running:
        print()
        for line in summary_rows((e, _scraped(e)) for e in running):
            print(line)
    return 0 if all(row.up for row in rows) else 1


def _scraped(endpoint: Endpoint) -> dict[str, float] | str:
    try:
        return scrape(endpoint)
    except OSError as exc:
        return str(exc)


# --------------------------------------------------------------------------------------------
# ingest


def _ingest(settings: Settings, source_factory: Callable[[Settings], TradeSource], label: str) -> int:
    from connectors.ingest import IngestStats, run_ingest
    from tcp.topics import ensure_topics

    settings = services.ensure(settings, ("kafka",))
    ensure_topics(settings)
    serve_metrics("ingest", settings)
    source = source_factory(settings)
    progress = Progress(label)
    stats = IngestStats()
    try:
        asyncio.run(run_ingest(source, settings, progress=progress, stats=stats))
    except KeyboardInterrupt:
        progress.done(stats)
        print("interrupted: everything counted above was flushed to Kafka", file=sys.stderr)
        return 130
    progress.done(stats)
    return 0


def ingest_okx(settings: Settings, instruments: Sequence[str]) -> int:
    """Live OKX trades into Kafka until Ctrl-C."""
    from connectors.okx import OkxTradeSource

    def source(s: Settings) -> OkxTradeSource:
        okx = OkxTradeSource.from_settings(s, instruments=tuple(instruments))
        watch_counts(lambda: {"tcp_reconnects": okx.stats.reconnects, "tcp_backfilled_trades": okx.stats.backfilled,
                              "tcp_backfill_failures": okx.stats.backfill_failures})  # fmt: skip
        return okx

    return _ingest(settings, source, "okx")


def ingest_replay(settings: Settings, path: Path, speed: str) -> int:
    """A recorded file into Kafka at ``speed`` ("max" or a factor of real time)."""
    from connectors.replay import ReplaySource

    factor = None if speed == "max" else float(speed)
    return _ingest(settings, lambda s: ReplaySource(Path(path), speed=factor), f"replay {path}")


def _cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    if args.source == "okx":
        return ingest_okx(settings, args.instruments.split(",") if args.instruments else settings.instruments)
    if args.source == "replay":
        return ingest_replay(settings, Path(args.file), args.speed)
    instruments = tuple(args.instruments.split(",")) if args.instruments else settings.instruments
    rate = None if args.rate == "max" else float(args.rate)
    return ingest_simulate(settings, instruments, seed=args.seed, trades=args.trades, rate=rate)


def ingest_simulate(
    settings: Settings,
    instruments: Sequence[str],
    *,
    seed: int = 0,
    trades: int | None = None,
    rate: float | None = 1.0,
) -> int:
    """Simulated trades into Kafka (``rate`` 1: event time follows the wall clock; ``None``: as fast as possible)."""
    from connectors.simulate import SimulatedSource

    return _ingest(
        settings,
        lambda s: SimulatedSource(instruments=tuple(instruments), seed=seed, trades=trades, rate=rate),
        "simulate",
    )


def _parse_speed(value: str) -> str:
    if value == "max":
        return value
    try:
        speed = float(value)
    except ValueError:
        speed = -1.0
    if speed <= 0:
        msg = f"--speed takes a positive number or 'max', not {value!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


# --------------------------------------------------------------------------------------------
# candles


def _cmd_candles(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "build":
        return _candles_build(args, settings)
    return _candles_run(args, settings)


def _candles_build(args: argparse.Namespace, settings: Settings) -> int:
    """Batch mode: the same candle code over a file; needs no services."""
    from connectors.replay import ReplaySource
    from dataflows.build import build_from_batches, write_parquet

    timeframes = tuple(args.timeframes.split(",")) if args.timeframes else settings.timeframes
    started = time.monotonic()
    source = ReplaySource(Path(args.input))
    try:
        result = build_from_batches(source.iter_batches(), timeframes, args.empty)
    except ValueError as exc:
        print(f"error: {args.input}: {exc}", file=sys.stderr)
        return 2
    write_parquet(result.candles, args.output)
    elapsed = time.monotonic() - started
    print(
        f"{result.trades:,} trades -> {len(result.candles):,} candles ({', '.join(timeframes)}) "
        f"in {elapsed:.1f} s ({result.trades / max(elapsed, 1e-9):,.0f} trades/s); "
        f"{result.dead_letters:,} dead letters; written to {args.output}"
    )
    return 0


def _candles_run(args: argparse.Namespace, settings: Settings) -> int:
    """The streaming candle dataflow, with Bytewax recovery on (unless --no-recovery)."""
    from dataflows.candles import build_flow
    from dataflows.entry import prepare

    settings = prepare(settings, ("kafka", "postgres", "redis"))
    return run_dataflow("candles", build_flow(settings, tail=not args.exit_at_end), args, settings)


def _cmd_archive(args: argparse.Namespace, settings: Settings) -> int:
    """The trade archive dataflow (okx.trades -> PostgreSQL trades), recovery on."""
    from dataflows.archive import build_flow
    from dataflows.entry import prepare

    settings = prepare(settings)
    return run_dataflow("archive", build_flow(settings, tail=not args.exit_at_end), args, settings)


def run_dataflow(name: str, flow: Dataflow, args: argparse.Namespace, settings: Settings) -> int:
    """Run ``flow`` as this process of a Bytewax cluster (``-w``, ``-i``, ``-a``), with recovery
    in ``<recovery_dir>/<name>`` unless ``--no-recovery``. Returns the exit code."""
    from datetime import timedelta

    from bytewax.recovery import RecoveryConfig
    from bytewax.run import cli_main

    from dataflows.kafka_io import TopicResetError

    serve_metrics(name, settings)
    addresses = args.addresses.split(",") if args.addresses else None
    recovery = None
    directory = None
    if not args.no_recovery:
        directory = (settings.recovery_dir or settings.home.resolve() / "recovery") / name
        # One recovery partition per worker in the cluster is Bytewax's usual layout.
        _init_recovery_dir(directory, args.workers * (len(addresses) if addresses else 1))
        recovery = RecoveryConfig(str(directory))
        log.info("%s: recovery in %s, snapshot every %.1f s", name, directory, settings.snapshot_interval_s)
    try:
        cli_main(
            flow,
            workers_per_process=args.workers,
            process_id=process_index(args.process_id, socket.gethostname()),
            addresses=addresses,
            epoch_interval=timedelta(seconds=settings.snapshot_interval_s),
            recovery_config=recovery,
        )
    except Exception as exc:
        # Bytewax wraps what a step raises in its own error: find the reset under it.
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, TopicResetError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(f"error: {cause}\nThe recovery directory is {directory}.", file=sys.stderr)
        return 2
    return 0


def _init_recovery_dir(directory: Path, partitions: int) -> None:
    """Create Bytewax's recovery partitions in ``directory`` unless it has them already.

    An existing empty directory (a mounted volume, one made by hand) is initialised too. The
    partitions are made in a scratch directory inside it and moved in, so a crash or a SIGKILL
    during the initialisation never leaves a half-made store behind (it is made again).
    """
    import shutil
    import tempfile

    from bytewax.recovery import init_db_dir

    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".init-*"):  # left by an initialisation that was killed
        shutil.rmtree(stale, ignore_errors=True)
    if any(directory.glob("part-*.sqlite3")):
        return
    scratch = Path(tempfile.mkdtemp(prefix=".init-", dir=directory))
    init_db_dir(scratch, partitions)
    for part in sorted(scratch.iterdir()):
        part.rename(directory / part.name)
    scratch.rmdir()


# --------------------------------------------------------------------------------------------
# dlq


def _cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from confluent_kafka import Consumer, TopicPartition

    from tcp.schemas import decode_dead_letter
    from tcp.topics import DLQ

    settings = services.ensure(settings, ("kafka",))
    topic = settings.topic(DLQ)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": "tcp-dlq-reader",
            "enable.auto.commit": False,
            "fetch.queue.backoff.ms": 10,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            print(f"no topic {topic} yet")
            return 0
        consumer.assign([TopicPartition(topic, p, 0) for p in metadata.partitions])
        shown = 0
        idle_since = time.monotonic()
        while shown < args.limit and time.monotonic() - idle_since < 2.0:
            for msg in consumer.consume(500, 0.3):
                if msg.error() is not None or shown >= args.limit:
                    continue
                letter = decode_dead_letter(msg.value() or b"")
                raw = letter.raw if letter.raw is not None else f"<{len(letter.raw_bytes())} bytes, base64>"
                if letter.cut:
                    raw = f"<{letter.raw_size:,} bytes, sha256 {letter.raw_sha256}; the first ones:> {raw}"
                print(f"{letter.where}  {letter.reason}\n    {raw[:200]}")
                shown += 1
                idle_since = time.monotonic()
        print(f"{shown} dead letter(s) shown from {topic}")
    finally:
        consumer.close()
    return 0


# --------------------------------------------------------------------------------------------
# demo


# --------------------------------------------------------------------------------------------


def _process_id(text: str) -> int | str:
    if text == "hostname":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        msg = f"-i takes a process index (0, 1, ...) or 'hostname', not {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def process_index(value: int | str | None, hostname: str) -> int | None:
    """``-i``'s value; ``hostname``: the number ending ``hostname`` (``candles-2`` -> 2)."""
    if value != "hostname":
        return None if value is None else int(value)
    head, _, tail = hostname.rpartition("-")
    if not head or not tail.isdigit():
        msg = f"-i hostname: the host name {hostname!r} does not end in -<number> (a StatefulSet pod name)"
        raise ValueError(msg)
    return int(tail)


def dataflow_options(q: argparse.ArgumentParser) -> None:
    """The options of every dataflow command: cluster layout, end of input, recovery."""
    q.add_argument("-w", "--workers", type=int, default=1, help="worker threads in this process (default 1)")
    q.add_argument(
        "-i",
        "--process-id",
        type=_process_id,
        default=None,
        help="this process's index in a cluster; 'hostname': the number ending the host name "
        "(a Kubernetes StatefulSet pod candles-2 is process 2)",
    )
    q.add_argument("-a", "--addresses", help="comma-separated host:port of every process in the cluster")
    q.add_argument(
        "--exit-at-end", action="store_true", help="stop at the end of the topic (closes every window)"
    )
    q.add_argument(
        "--no-recovery", action="store_true", help="do not snapshot state (restarts from the start)"
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``tcp`` parser; with ``command``, only the subcommands that one needs are imported."""
    parser = argparse.ArgumentParser(
        prog="tcp", description="TCP Dashboard: crypto trading research platform"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("services", help="start, stop or show the Kafka/PostgreSQL/Redis services")
    p.add_argument("action", choices=("up", "down", "status"))
    p.set_defaults(func=_cmd_services)

    p = sub.add_parser("ingest", help="bring trades into Kafka (okx.trades)")
    ingest = p.add_subparsers(dest="source", required=True)
    q = ingest.add_parser(
        "okx", help="live trades from the OKX WebSocket, with REST backfill after reconnects"
    )
    q.add_argument("--instruments", help="comma-separated instrument ids (default: TCP_INSTRUMENTS)")
    q = ingest.add_parser(
        "replay", help="replay OKX WebSocket frames (JSON lines) or an OKX trade CSV export"
    )
    q.add_argument("file")
    q.add_argument(
        "--speed",
        type=_parse_speed,
        default="max",
        help="1 = real time, 10 = ten times faster, max (default)",
    )
    q = ingest.add_parser("simulate", help="generate realistic trades (seeded)")
    q.add_argument("--instruments", help="comma-separated instrument ids (default: TCP_INSTRUMENTS)")
    q.add_argument("--seed", type=int, default=42)
    q.add_argument(
        "--trades", type=int, default=None, help="stop after this many trades (default: run until Ctrl-C)"
    )
    q.add_argument("--rate", default="200", help="trades per second in all, or max (default 200)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("candles", help="build candles: streaming from Kafka (run) or from a file (build)")
    candles = p.add_subparsers(dest="action", required=True)
    q = candles.add_parser("run", help="the candle dataflow: okx.trades -> candles (Kafka, PostgreSQL)")
    dataflow_options(q)
    q = candles.add_parser("build", help="batch mode: candles from a trades file into Parquet, no services")
    q.add_argument("--input", required=True, help="OKX WebSocket frames (JSON lines) or an OKX trade CSV")
    q.add_argument("--output", required=True, help="the Parquet file to write")
    q.add_argument("--timeframes", help="comma-separated, e.g. 1m,5m,1h (default: TCP_TIMEFRAMES)")
    q.add_argument("--empty", choices=("flat", "skip"), default="flat", help="intervals without trades")
    p.set_defaults(func=_cmd_candles)

    p = sub.add_parser("archive", help="archive raw trades: okx.trades -> PostgreSQL table trades")
    archive = p.add_subparsers(dest="action", required=True)
    dataflow_options(archive.add_parser("run", help="the trade archive dataflow"))
    p.set_defaults(func=_cmd_archive)

    p = sub.add_parser("dlq", help="show dead letters (okx.trades.dlq) with their reasons")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=_cmd_dlq)

    takes: dict[str, dict[str, object]] = {
        "": {},
        "dataflow_options": {"dataflow_options": dataflow_options},
        "speed": {"speed": _parse_speed},
    }
    for module, function, options in _extra_registrations(command):
        getattr(importlib.import_module(module), function)(sub, **takes[options])

    p = sub.add_parser(
        "demo", help="start what is missing, run the demo end to end, then serve the dashboard live"
    )
    p.add_argument("--port", type=int, default=5006, help="the dashboard's port (5006)")
    p.add_argument(
        "--no-serve", action="store_true", help="stop after the end-to-end run (no live part, no dashboard)"
    )
    p.set_defaults(func=_cmd_demo)
    return parser


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from tcp.run import cmd_demo

    return cmd_demo(args, settings)


#: Subcommands registered by other packages: (command, module, its register function, what else
#: it takes). Their modules import Bokeh, DuckDB, pyarrow ... (~140 MB and ~1 s together): a
#: process runs `tcp candles run` without them. All are registered for --help and unknown words.
_EXTRA_COMMANDS = (
    ("export", "backtest.cli", "register", ""),
    ("sql", "backtest.cli", "register", ""),
    ("backtest", "backtest.commands", "register_backtest", ""),
    ("replay", "backtest.replay", "register_replay", ""),
    ("dashboard", "bokeh_app.server", "register", ""),
    ("bots", "bots.cli", "register", "dataflow_options"),
    ("run", "tcp.run", "register", "speed"),
    ("db", "sinks.db_cli", "register", ""),
)
_CORE_COMMANDS = ("services", "ingest", "candles", "archive", "dlq", "demo")


def _extra_registrations(command: str | None) -> list[tuple[str, str, str]]:
    """What to import and register for ``command`` (None: everything), each module once."""
    if command in _CORE_COMMANDS:
        return []
    chosen = [row for row in _EXTRA_COMMANDS if command is None or row[0] == command] or list(_EXTRA_COMMANDS)
    return list(dict.fromkeys((module, function, options) for _, module, function, options in chosen))


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand word of a command line (the first word not starting with '-')."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(_command_in(sys.argv[1:] if argv is None else argv)).parse_args(argv)
    settings = Settings.load()
    configure_logging(args.command, settings, verbose=args.verbose)
    try:
        return int(args.func(args, settings))
    except services.ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
