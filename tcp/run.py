"""``tcp run``: the whole platform live, or a recorded file end to end.

    tcp run [--input FILE [--speed N|max]] [--bots FILE.json] [--exit-at-end]

Each dataflow runs as a process of its own (Bytewax workers are threads sharing the GIL, so
processes are what uses more cores): ``tcp candles run``, ``tcp archive run`` (when
``archive_trades``) and ``tcp bots run``, with Bytewax recovery on. This process ingests (OKX
live by default, or the file), and runs the bot supervisor.

``--exit-at-end`` (with ``--input``) runs the stages one after the other, each to the end of its
input: ingest the file into ``okx.trades``; the candle and archive dataflows to the end of that
topic (every window closes); then the bots dataflow to the end of ``candles``. When it returns,
every trade has gone all the way through and every sink has flushed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tcp.config import Settings

__all__ = ["Stage", "cmd_demo", "cmd_run", "register"]

log = logging.getLogger(__name__)


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], *, speed: Callable[[str], str]
) -> None:
    p = sub.add_parser("run", help="everything live: ingest, candles, archive, bots, supervisor")
    p.add_argument("--input", type=Path, help="replay this file (OKX frames as JSON lines, or a trade CSV)")
    p.add_argument("--speed", type=speed, default="max", help="replay speed: 1 = real time, max (default)")
    p.add_argument(
        "--simulate", action="store_true", help="live simulated trades (wall-clock pace) instead of OKX"
    )
    p.add_argument("--bots", type=Path, help="a JSON file of bot configs to create and start")
    p.add_argument(
        "--dashboard", type=int, metavar="PORT", help="also serve the dashboard on this port (live runs)"
    )
    p.add_argument(
        "--exit-at-end",
        action="store_true",
        help="with --input: stop once every trade went all the way through and every sink flushed",
    )
    p.set_defaults(func=cmd_run)


class Stage:
    """One dataflow as a child process (``python -m tcp.cli <flow> run ...``)."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "tcp.cli", *args], env=env)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (its state is in the recovery store), then SIGKILL if it does not go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from bots.config import ConfigError, load_bots, validate_strategy
    from dataflows.entry import prepare

    if args.exit_at_end and args.input is None:
        print("error: --exit-at-end needs --input FILE (a live feed has no end)", file=sys.stderr)
        return 2
    if args.input is not None and getattr(args, "simulate", False):
        print("error: --input and --simulate are two inputs: choose one", file=sys.stderr)
        return 2
    if args.bots is not None:
        try:
            for config in load_bots(args.bots):
                validate_strategy(config)
        except (ConfigError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    settings = prepare(settings, ("kafka", "postgres", "redis"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCP_")} | settings.as_env()
    bots_args = ["bots", "run", *(["--bots", str(args.bots)] if args.bots else [])]
    flows = [("candles", ["candles", "run"])]
    if settings.archive_trades:
        flows.append(("archive", ["archive", "run"]))
    if args.exit_at_end:
        return _end_to_end(args, settings, env, flows, bots_args)
    stages = [*flows, ("bots", bots_args)]
    if getattr(args, "dashboard", None):
        stages.append(("dashboard", ["dashboard", "--port", str(args.dashboard)]))
    return _live(args, settings, env, stages)


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    from tcp.cli import ingest_okx, ingest_replay, ingest_simulate

    if args.input is not None:
        return ingest_replay(settings, args.input, args.speed)
    if getattr(args, "simulate", False):
        return ingest_simulate(settings, settings.instruments, seed=int(time.time()), rate=1.0)
    return ingest_okx(settings, settings.instruments)


def _end_to_end(
    args: argparse.Namespace,
    settings: Settings,
    env: dict[str, str],
    flows: list[tuple[str, list[str]]],
    bots_args: list[str],
) -> int:
    started = time.monotonic()
    print(f"1/3 ingest {args.input} -> {settings.topic('okx.trades')}", flush=True)
    code = _ingest(args, settings)
    if code:
        return code
    print(f"2/3 {' + '.join(name for name, _ in flows)} dataflows to the end of okx.trades", flush=True)
    stages = [Stage(name, [*flow, "--exit-at-end"], env) for name, flow in flows]
    codes = {stage.name: stage.proc.wait() for stage in stages}
    if any(codes.values()):
        print(f"error: a dataflow failed: {codes}", file=sys.stderr)
        return 1
    print("3/3 bots dataflow to the end of candles", flush=True)
    code = Stage("bots", [*bots_args, "--exit-at-end"], env).proc.wait()
    if code:
        print(f"error: the bots dataflow failed (exit {code})", file=sys.stderr)
        return 1
    print(f"done in {time.monotonic() - started:.1f} s", flush=True)
    return 0


def _live(
    args: argparse.Namespace, settings: Settings, env: dict[str, str], flows: list[tuple[str, list[str]]]
) -> int:
    from bots.supervisor import Supervisor

    stages = [Stage(name, flow, env) for name, flow in flows]
    stop = threading.Event()
    supervisor = threading.Thread(
        target=Supervisor(settings).run, args=(stop,), name="supervisor", daemon=True
    )
    supervisor.start()
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        code = _ingest(args, settings)
        if code:
            return code
        print("input done; the dataflows keep running (Ctrl-C stops everything)", flush=True)
        while all(stage.proc.poll() is None for stage in stages):
            time.sleep(0.5)
        failed = [stage.name for stage in stages if stage.proc.poll() is not None]
        print(f"error: dataflow(s) stopped: {', '.join(failed)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()
        for stage in stages:
            stage.stop()


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """``make demo``: services up, the bundled sample through ``tcp run --exit-at-end`` with the
    demo bots, what PostgreSQL holds, then (unless ``--no-serve``) live simulated trades and the
    dashboard until Ctrl-C."""
    from importlib import resources

    from tcp import services

    ready = services.ensure(settings)
    # Each demo run gets its own topics and recovery store: replaying the sample twice into one
    # topic would be a stream of duplicates. PostgreSQL upserts make the rows identical run after run.
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ready = ready.model_copy(
        update={
            "topic_prefix": f"demo-{stamp}.",
            "recovery_dir": ready.home.resolve() / "recovery" / f"demo-{stamp}",
        }
    )
    print("TCP Dashboard demo")
    print(f"  Kafka       {ready.kafka_bootstrap}  (embedded Tansu unless TCP_KAFKA_BOOTSTRAP is set)")
    print(f"  PostgreSQL  {services.redact(ready.postgres_dsn.get_secret_value())}")
    print(f"  Redis       {services.redact(ready.redis_url.get_secret_value())}")
    print(f"  state       {ready.home}\n")
    data = resources.files("tcp") / "data"
    with (
        resources.as_file(data / "sample-trades.jsonl.gz") as sample,
        resources.as_file(data / "demo-bots.json") as bots,
    ):
        run_args = argparse.Namespace(input=sample, speed="max", bots=bots, exit_at_end=True)
        code = cmd_run(run_args, ready)
        if code:
            return code
        _summary(ready)
        if args.no_serve:
            return 0
        return _serve_live(ready, bots, args.port)


def _serve_live(settings: Settings, bots: Path, port: int) -> int:
    """After the recorded sample: simulated trades live (wall-clock pace) through the same
    dataflows, which go on from where the sample ended (same topics, same recovery), and the
    dashboard on ``port``. Controls need a login: a password is made up unless
    TCP_DASHBOARD_PASSWORD is set."""
    import secrets

    from pydantic import SecretStr

    password = settings.dashboard_password
    if password is None:
        password = SecretStr(secrets.token_urlsafe(9))
        settings = settings.model_copy(update={"dashboard_password": password})
    print(f"\nThe dashboard: http://127.0.0.1:{port}/  (log in as {settings.dashboard_user} / "
          f"{password.get_secret_value()} for the bot controls)", flush=True)  # fmt: skip
    print(
        "Live now: simulated trades at wall-clock pace through the same dataflows. Ctrl-C stops.", flush=True
    )
    live_args = argparse.Namespace(
        input=None, speed="max", simulate=True, bots=bots, exit_at_end=False, dashboard=port
    )
    return cmd_run(live_args, settings)


def _summary(settings: Settings) -> None:
    import psycopg

    with psycopg.connect(settings.postgres_dsn.get_secret_value()) as conn:
        candles = conn.execute(
            "SELECT timeframe, count(*), count(DISTINCT inst_id) FROM candles GROUP BY timeframe "
            "ORDER BY min(extract(epoch FROM ts_close))"
        ).fetchall()
        bots = conn.execute(
            "SELECT b.name, b.strategy, b.inst_id, b.state, b.num_trades, b.equity, "
            "(SELECT count(*) FROM signals s WHERE s.strategy = b.strategy AND s.params_hash = b.params_hash "
            " AND s.inst_id = b.inst_id AND s.timeframe = b.timeframe) "
            "FROM bots b ORDER BY b.name"
        ).fetchall()
        trades = conn.execute("SELECT count(*) FROM trades").fetchone()
    print("\nPostgreSQL now holds:")
    for timeframe, count, instruments in candles:
        print(f"  candles {timeframe:>4}: {count:6,} over {instruments} instruments")
    print(f"  trades (the archive): {trades[0] if trades else 0:,}")
    for name, strategy, inst_id, state, fills, equity, signals in bots:
        print(
            f"  bot {name:<9} {strategy:<18} {inst_id:<10} {state:<8} {signals:3} signals, {fills:3} fills, equity {equity}"
        )
    print(
        "\nWhere to look: tables candles, trades, signals, bots, bot_trades, bot_performance in PostgreSQL;"
        "\n`tcp bots list`; `tcp export candles --out candles.parquet`; Redis hashes bot:<name>."
        "\nNext: `tcp run` streams live OKX trades through everything; `tcp services down` stops the"
        "\nembedded services."
    )
