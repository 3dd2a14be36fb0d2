"""The ``tcp export`` and ``tcp sql`` commands (wired into ``tcp.cli`` with :func:`register`).

    tcp export candles|signals|bot-trades|bot-performance --out FILE.parquet
        [--inst-id ID] [--timeframe TF] [--start T] [--end T] [--bot NAME] [--strategy NAME]
        [--decimals auto|decimal|string]
    tcp export lake [--lake DIR] [--tables trades,candles,...]     (incremental; backtest/lake.py)
    tcp export topic TOPIC --from T --to T [--out DIR]            (a Kafka range into the lake)
    tcp sql "SELECT ..." [--lake DIR] [--out FILE.parquet|FILE.csv] [--max-rows N]

Times are ISO-8601 (no offset means UTC) or epoch milliseconds; the range is
``start <= t < end``. See :mod:`backtest.export` for the columns and filters of each table.
Prints ``N rows -> FILE`` and returns 0; a bad filter prints ``error: ...`` and returns 2.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast, get_args

from backtest.export import EXPORT_TABLES, check_filters, export_table, parse_time
from backtest.lake import LAKE_TABLES, LakeRun, LakeTable, export_lake, export_topic, lake_dir, open_lake
from dataflows.build import DecimalMode
from tcp import services
from tcp.config import Settings

__all__ = ["cmd_export", "cmd_sql", "register"]


def _time(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``export`` to the ``tcp`` subcommands (``func=cmd_export``)."""
    p = sub.add_parser(
        "export",
        help="write a PostgreSQL table (candles, signals, bot fills or equity) to Parquet",
        description="Export what is in PostgreSQL to a Parquet file, in primary-key order. "
        "The time range is start <= t < end.",
    )
    p.add_argument("table", choices=(*EXPORT_TABLES, "lake", "topic"),
                   help="a table to one file; lake: every table, incrementally, into the lake; "
                   "topic: a Kafka topic's range into the lake")  # fmt: skip
    p.add_argument("topic", nargs="?", help="with `topic`: the topic to copy, e.g. okx.trades")
    p.add_argument("--out", type=Path, help="the Parquet file to write (topic: the lake directory)")
    p.add_argument("--lake", type=Path, help="the lake directory (default: TCP_LAKE_DIR or <home>/lake)")
    p.add_argument(
        "--tables", help=f"with `lake`: comma-separated, of {','.join(LAKE_TABLES)} (default: all)"
    )
    p.add_argument("--from", dest="since", type=_time, help="with `topic`: message time from (inclusive)")
    p.add_argument("--to", dest="until", type=_time, help="with `topic`: message time until (exclusive)")
    p.add_argument("--inst-id", help="only this instrument (candles, signals, bot-trades)")
    p.add_argument("--timeframe", help="only this timeframe (candles, signals, bot-trades)")
    p.add_argument(
        "--start", type=_time, help="from this time, inclusive: ISO-8601 (no offset = UTC) or epoch ms"
    )
    p.add_argument("--end", type=_time, help="until this time, exclusive: ISO-8601 or epoch ms")
    p.add_argument("--bot", help="only this bot (bot-trades, bot-performance)")
    p.add_argument("--strategy", help="only this strategy (signals)")
    p.add_argument(
        "--decimals",
        choices=get_args(DecimalMode),
        default="auto",
        help="candles' prices: decimal128(38, 18), or exact strings when a value does not fit (auto)",
    )
    p.set_defaults(func=cmd_export)

    q = sub.add_parser(
        "sql",
        help="query the Parquet lake with DuckDB (views named after the tables)",
        description="Run one DuckDB query over the lake: views trades, candles, signals, bot_trades and "
        "bot_performance (one row per natural key; inst_id and date from the partitions). Prices are "
        "exact: DECIMAL(38, 18), or strings where a value did not fit (CAST them).",
    )
    q.add_argument("query", help='e.g. "SELECT inst_id, count(*) FROM trades GROUP BY 1"')
    q.add_argument("--lake", type=Path, help="the lake directory (default: TCP_LAKE_DIR or <home>/lake)")
    q.add_argument(
        "--out", type=Path, help="write the result to FILE.parquet or FILE.csv instead of printing"
    )
    q.add_argument("--max-rows", type=int, default=40, help="rows printed (default 40)")
    q.set_defaults(func=cmd_sql)


def _lake(args: argparse.Namespace, settings: Settings) -> Path:
    return args.lake or lake_dir(settings.home, settings.lake_dir)


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    """PostgreSQL up (configured or embedded), migrations applied, then the export."""
    from sinks.migrate import apply_migrations

    if args.table == "lake":
        return _export_lake(args, settings)
    if args.table == "topic":
        return _export_topic(args, settings)
    if args.out is None:
        print("error: --out FILE.parquet is required", file=sys.stderr)
        return 2
    table, out = args.table, args.out
    inst_id, timeframe, start, end = args.inst_id, args.timeframe, args.start, args.end
    bot, strategy = args.bot, args.strategy
    try:  # before starting anything
        check_filters(
            table, inst_id=inst_id, timeframe=timeframe, start=start, end=end, bot=bot, strategy=strategy
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = services.ensure(settings, ("postgres",))
    dsn = settings.postgres_dsn.get_secret_value()
    apply_migrations(dsn)
    try:
        rows = export_table(
            dsn,
            table,
            out,
            inst_id=inst_id,
            timeframe=timeframe,
            start=start,
            end=end,
            bot=bot,
            strategy=strategy,
            decimals=args.decimals,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{rows} rows -> {out}")
    return 0


def _export_lake(args: argparse.Namespace, settings: Settings) -> int:
    from sinks.migrate import apply_migrations

    tables = tuple(t.strip() for t in args.tables.split(",") if t.strip()) if args.tables else LAKE_TABLES
    unknown = [t for t in tables if t not in LAKE_TABLES]
    if unknown:
        print(f"error: unknown table(s) {', '.join(unknown)}: expected some of {', '.join(LAKE_TABLES)}",
              file=sys.stderr)  # fmt: skip
        return 2
    root = _lake(args, settings)
    settings = services.ensure(settings, ("postgres",))
    dsn = settings.postgres_dsn.get_secret_value()
    apply_migrations(dsn)

    def show(run: LakeRun) -> None:
        print(
            f"{run.table:<16} {run.rows:>10,} new rows in {run.files:,} files (written before {run.bound.isoformat()})"
        )

    try:
        export_lake(dsn, root, tables=cast("tuple[LakeTable, ...]", tables), progress=show)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"lake: {root}")
    return 0


def _export_topic(args: argparse.Namespace, settings: Settings) -> int:
    if not args.topic or args.since is None or args.until is None:
        print("error: tcp export topic TOPIC --from TIME --to TIME [--out DIR]", file=sys.stderr)
        return 2
    root = args.out or _lake(args, settings)
    settings = services.ensure(settings, ("kafka",))
    since, until = _ms(args.since), _ms(args.until)
    try:
        result = export_topic(settings.kafka_bootstrap, args.topic, root, since_ms=since, until_ms=until)
    except (ValueError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result.rows:,} trades -> {root}/trades ({result.files} files); {result.outside:,} messages outside "
          f"the range, {result.invalid:,} not valid trades (not written)")  # fmt: skip
    return 0


def _ms(value: datetime) -> int:
    return (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def cmd_sql(args: argparse.Namespace, settings: Settings) -> int:
    """``tcp sql``: 0; 2 when there is no lake or the query fails (DuckDB's message)."""
    import duckdb

    root = _lake(args, settings)
    try:
        con = open_lake(root)
        relation = con.sql(args.query)
    except (FileNotFoundError, duckdb.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if relation is None:  # a statement without a result (e.g. SET)
        return 0
    try:
        if args.out is not None:
            suffix = args.out.suffix.lower()
            if suffix not in (".parquet", ".csv"):
                print("error: --out must end in .parquet or .csv", file=sys.stderr)
                return 2
            if suffix == ".parquet":
                relation.write_parquet(str(args.out), compression="zstd")
            else:
                relation.write_csv(str(args.out))
            print(f"{relation.shape[0]:,} rows -> {args.out}")
            return 0
        relation.show(max_rows=args.max_rows, max_width=160)
    except duckdb.Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
