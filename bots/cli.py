"""The ``tcp bots`` commands (wired into ``tcp.cli`` with :func:`register`).

    tcp bots run [--bots FILE.json] [-w N] [-i I -a ADDRS] [--exit-at-end] [--no-recovery]
    tcp bots create FILE.json [--start]
    tcp bots start|pause|resume|stop NAME [NAME ...]
    tcp bots update NAME --params '{"fast": 8, "slow": 21}'
    tcp bots list
    tcp bots supervise [--once] [--every SECONDS]

Commands travel on Kafka ``bots.commands``; what became of each is on ``bots.events`` and in the
``bots`` table (``tcp bots list``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from bots.config import BotConfig, ConfigError, load_bots, validate_strategy
from tcp import services
from tcp.config import Settings
from tcp.observe import serve_metrics

__all__ = ["register"]

_LIFECYCLE = ("start", "pause", "resume", "stop")


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    dataflow_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``tcp bots`` to the CLI; ``dataflow_options(parser)`` adds -w/-i/-a/--exit-at-end/..."""
    p = sub.add_parser("bots", help="virtual bots: the bots dataflow, commands, status, supervisor")
    bots = p.add_subparsers(dest="action", required=True)
    q = bots.add_parser("run", help="the bots dataflow: candles + bots.commands -> signals, fills, bot state")
    q.add_argument("--bots", type=Path, help="a JSON file of bot configs to create and start")
    dataflow_options(q)
    q = bots.add_parser("create", help="create the bots of a JSON file (a list of configs, or one)")
    q.add_argument("file", type=Path)
    q.add_argument("--start", action="store_true", help="start them too")
    for action in _LIFECYCLE:
        q = bots.add_parser(action, help=f"{action} bots")
        q.add_argument("names", nargs="+")
    q = bots.add_parser("update", help="replace a bot's strategy params (the bot must not be running)")
    q.add_argument("name")
    q.add_argument("--params", required=True, help="a JSON object")
    bots.add_parser("list", help="every bot with its state, position, equity and heartbeat")
    q = bots.add_parser("supervise", help="mark stale bots, restart failed ones (rate-limited)")
    q.add_argument("--once", action="store_true", help="one pass, then exit")
    q.add_argument("--every", type=float, default=5.0, help="seconds between passes (default 5)")
    p.set_defaults(func=cmd_bots)


def cmd_bots(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "run":
        return _run(args, settings)
    if args.action == "list":
        return _list(settings)
    if args.action == "supervise":
        return _supervise(args, settings)
    return _send(args, settings)


def _load(path: Path) -> list[BotConfig]:
    configs = load_bots(path)
    for config in configs:
        validate_strategy(config)
    return configs


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from dataflows.bots import build_flow
    from dataflows.entry import prepare
    from tcp.cli import run_dataflow

    try:
        configs = _load(args.bots) if args.bots else []
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = prepare(settings, ("kafka", "postgres", "redis"))
    return run_dataflow("bots", build_flow(settings, bots=configs, tail=not args.exit_at_end), args, settings)


def _send(args: argparse.Namespace, settings: Settings) -> int:
    from bots.commands import make_command, send_commands
    from bots.lifecycle import Command

    commands: list[Command] = []
    try:
        if args.action == "create":
            for config in _load(args.file):
                commands.append(make_command("create", config.name, config=config, user="cli"))
                if args.start:
                    commands.append(make_command("start", config.name, user="cli"))
        elif args.action == "update":
            params = json.loads(args.params)
            if not isinstance(params, dict):
                print("error: --params must be a JSON object", file=sys.stderr)
                return 2
            commands.append(make_command("update", args.name, params=params, user="cli"))
        else:
            commands.extend(make_command(args.action, name, user="cli") for name in args.names)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = services.ensure(settings, ("kafka",))
    from tcp.topics import ensure_topics

    ensure_topics(settings)
    sent = send_commands(settings, commands)
    print(
        f"sent {sent} command(s) to {settings.topic('bots.commands')}; results: `tcp bots list` (and bots.events)"
    )
    return 0


def _list(settings: Settings) -> int:
    import psycopg

    from sinks.migrate import apply_migrations

    settings = services.ensure(settings, ("postgres",))
    dsn = settings.postgres_dsn.get_secret_value()
    apply_migrations(dsn)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT name, state, strategy, inst_id, timeframe, position, equity, realized_pnl, num_trades, "
            "extract(epoch FROM now() - last_heartbeat)::int, stale, reason FROM bots ORDER BY name"
        ).fetchall()
    if not rows:
        print("no bots yet: `tcp bots create FILE.json --start`, or `tcp run --bots FILE.json`")
        return 0
    header = ("name", "state", "strategy", "instrument", "tf", "position", "equity", "realized", "fills",
              "heartbeat", "note")  # fmt: skip
    table = [
        (name, state + (" (stale)" if stale else ""), strategy, inst, tf, str(pos), str(eq or "-"), str(pnl),
         str(n), "-" if age is None else f"{age} s ago", reason or "")
        for name, state, strategy, inst, tf, pos, eq, pnl, n, age, stale, reason in rows
    ]  # fmt: skip
    widths = [max(len(str(r[i])) for r in (header, *table)) for i in range(len(header))]
    for row in (header, *table):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _supervise(args: argparse.Namespace, settings: Settings) -> int:
    from bots.supervisor import Supervisor

    settings = services.ensure(settings, ("kafka", "postgres", "redis"))
    supervisor = Supervisor(settings)
    if not args.once:
        serve_metrics("supervisor", settings)
    if args.once:
        report = supervisor.check()
        print(
            f"stale: {list(report.stale)}; restarted: {list(report.restarted)}; held back: {list(report.held_back)}"
        )
        return 0
    stop = threading.Event()
    try:
        supervisor.run(stop, every_s=args.every)
    except KeyboardInterrupt:
        stop.set()
    return 0
