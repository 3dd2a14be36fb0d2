"""The ``tcp export`` command (wired into ``tcp.cli`` with :func:`register`).

    tcp export candles|signals|bot-trades|bot-performance --out FILE.parquet
        [--inst-id ID] [--timeframe TF] [--start T] [--end T] [--bot NAME] [--strategy NAME]
        [--decimals auto|decimal|string]

Times are ISO-8601 (no offset means UTC) or epoch milliseconds; the range is
``start <= t < end``. See :mod:`backtest.export` for the columns and filters of each table.
Prints ``N rows -> FILE`` and returns 0; a bad filter prints ``error: ...`` and returns 2.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import get_args

from backtest.export import EXPORT_TABLES, check_filters, export_table, parse_time
from dataflows.build import DecimalMode
from tcp import services
from tcp.config import Settings

__all__ = ["cmd_export", "register"]


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
    p.add_argument("table", choices=EXPORT_TABLES)
    p.add_argument("--out", required=True, type=Path, help="the Parquet file to write")
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


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    """PostgreSQL up (configured or embedded), migrations applied, then the export."""
    from sinks.migrate import apply_migrations

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

