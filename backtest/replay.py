"""``tcp replay``: the live dataflows over a recorded trades topic, written as backtest results.

    tcp replay [--topic okx.trades] [--from T] [--to T] --bots FILE.json --out DIR [--no-report]

A replay is not a simulation of the live platform: it IS the live code, run over the recorded
topic from its first message to its end.

1. The candle dataflow (:func:`dataflows.candles.build_flow`) reads the topic with
   ``tail=False`` (from the start, ending at the end of every partition), keeping the trades of
   ``--from <= ts < --to`` (trade time). Its candles go to Kafka topics of the replay's own
   (prefix ``replay-<id>.``), so nothing live sees them; nothing goes to PostgreSQL or Redis.
2. The bots dataflow (:func:`dataflows.bots.build_flow`) reads those candles from the start,
   with the bots of ``FILE.json`` created and started before the first candle (as
   ``tcp run --bots`` does), and hands every bot's output to this module.
3. For each bot: its signals, fills and marks (the portfolio valued at every close), with the
   candles of its stream as the bot saw them (the first emission of each close: a revision
   re-emitted after a late trade is ignored by a bot), become a
   :class:`backtest.engine.BacktestResult` and are written to ``DIR/<bot name>/`` as
   ``tcp backtest run`` writes them (signals.parquet, trades.parquet, equity.parquet,
   metrics.json, report.html).

Both dataflows run in this process, one after the other (``bytewax.testing.run_main``: one
worker, no recovery: a replay that fails is simply run again). The replay's topics are deleted
at the end. tests/test_run.py checks that for the same trades ``tcp replay``,
``tcp run --exit-at-end`` and ``tcp backtest run`` over the built candles agree on every signal
and fill.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bytewax.testing import TestingSink, run_main
from confluent_kafka.admin import AdminClient

from backtest.commands import time_arg
from backtest.engine import (
    BacktestError,
    BacktestResult,
    CandleSet,
    StrategyFailedError,
    assemble,
    epoch_ms,
    write_outputs,
)
from bots.config import BotConfig, ConfigError, load_bots
from bots.portfolio import Fill, Mark
from dataflows import bots as bots_flow
from dataflows import candles as candles_flow
from dataflows.candle_core import Candle
from strategies.base import Signal
from tcp import services, topics
from tcp.config import Settings
from tcp.topics import ensure_topics

__all__ = ["ReplayResult", "register_replay", "replay"]

log = logging.getLogger(__name__)

#: The topics a replay writes and reads besides the recorded trades (created, then deleted).
_OWN_TOPICS = (topics.CANDLES, topics.CANDLES_LIVE, topics.LATE, topics.DLQ, topics.BOTS_COMMANDS,
               topics.BOTS_EVENTS)  # fmt: skip


@dataclass(slots=True)
class _BotRun:
    """What one bot did in the bots dataflow, in order."""

    signals: list[Signal] = field(default_factory=list)
    fills: list[Fill] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    state: str = "created"
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """A replay: every bot's result (by name), how many final candles the candle dataflow made,
    and how many messages of the topic it dead-lettered (not trades: see ``tcp dlq``)."""

    results: dict[str, BacktestResult]
    candles: int
    dead_letters: int


def _stream_candles(outputs: Sequence[candles_flow.Output]) -> dict[tuple[str, str], list[Candle]]:
    """The final candles per stream, as a bot sees them: the first emission of each close
    (later ones, revisions, have a ``ts_close`` that is not after the last one seen)."""
    streams: dict[tuple[str, str], list[Candle]] = {}
    for kind, item in outputs:
        if kind != "final":
            continue
        assert isinstance(item, Candle)
        seen = streams.setdefault((item.inst_id, item.timeframe), [])
        if not seen or item.ts_close > seen[-1].ts_close:
            seen.append(item)
    return streams


def _bot_runs(outputs: Sequence[bots_flow.Output]) -> dict[str, _BotRun]:
    runs: dict[str, _BotRun] = {}
    for out in outputs:
        run = runs.setdefault(out.bot, _BotRun())
        run.signals += out.signals
        run.fills += out.fills
        run.marks += out.marks
        if out.status is not None:
            run.state, run.reason = out.status.state, out.status.reason
    return runs


def _result(config: BotConfig, run: _BotRun | None, candles: list[Candle], source: str) -> BacktestResult:
    if run is None or run.state == "created":
        msg = f"bot {config.name!r} did not start in the replay"
        raise BacktestError(msg)
    if run.state == "failed":
        msg = f"bot {config.name!r} failed in the replay: {run.reason}"
        raise StrategyFailedError(msg)
    if not candles:
        msg = f"bot {config.name!r}: the replay made no {config.inst_id} {config.timeframe} candles"
        raise BacktestError(msg)
    series = CandleSet.from_candles(candles, source=source)
    marked = [mark.ts_close for mark in run.marks]
    if marked != series.ts_close.tolist():  # the bot marks every candle of its stream it acts on
        msg = f"bot {config.name!r} marked {len(marked)} closes for {len(series)} candles of its stream"
        raise BacktestError(msg)
    return assemble(config, series, run.signals, run.fills, [mark.equity for mark in run.marks])


def replay(
    settings: Settings,
    *,
    bots: Sequence[BotConfig],
    topic: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    out: Path | None = None,
    report: bool = True,
) -> ReplayResult:
    """Run the candle and bots dataflows over ``topic`` (default: the settings' trades topic)
    and return every bot's result; with ``out``, write each to ``out/<bot name>/``.

    ``settings`` must point at a reachable Kafka (``services.ensure``). Raises
    ``StrategyFailedError`` when a bot's strategy raised, ``BacktestError`` when the topic is
    missing or a bot's stream has no candles in the range.
    """
    if not bots:
        msg = "no bots to replay: give a JSON file of bot configs (--bots)"
        raise BacktestError(msg)
    source = topic or settings.topic(topics.TRADES)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    if source not in admin.list_topics(timeout=10).topics:
        msg = f"topic {source!r} does not exist on {settings.kafka_bootstrap}"
        raise BacktestError(msg)
    own = settings.model_copy(update={"topic_prefix": f"replay-{uuid.uuid4().hex[:12]}."})
    ensure_topics(own, _OWN_TOPICS)
    try:
        candle_outputs: list[candles_flow.Output] = []
        flow = candles_flow.build_flow(
            own, tail=False, write_postgres=False, write_redis=False, trades_topic=source,
            since_ms=since_ms, until_ms=until_ms, outputs_to=TestingSink(candle_outputs),
        )  # fmt: skip
        run_main(flow)
        bot_outputs: list[bots_flow.Output] = []
        run_main(
            bots_flow.build_flow(
                own,
                bots=bots,
                tail=False,
                write_postgres=False,
                write_redis=False,
                outputs_to=TestingSink(bot_outputs),
            )  # fmt: skip
        )
        dead_count = _count(own.kafka_bootstrap, own.topic(topics.DLQ))
    finally:
        _delete_topics(admin, [own.topic(name) for name in _OWN_TOPICS])
    streams = _stream_candles(candle_outputs)
    runs = _bot_runs(bot_outputs)
    where = f"kafka:{source}"
    results = {
        c.name: _result(c, runs.get(c.name), streams.get((c.inst_id, c.timeframe), []), where) for c in bots
    }
    if out is not None:
        for name, result in results.items():
            write_outputs(result, out / name, report=report)
    return ReplayResult(results, sum(len(c) for c in streams.values()), dead_count)


def _count(bootstrap: str, topic: str) -> int:
    """The number of messages in ``topic`` (read to the end of every partition)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"tcp-replay-{uuid.uuid4().hex[:8]}",
         "enable.partition.eof": True, "enable.auto.commit": False, "fetch.queue.backoff.ms": 10}
    )  # fmt: skip
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        open_parts, count = set(parts), 0
        deadline = time.monotonic() + 60
        while open_parts and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                error = msg.error()
                if error is None:
                    count += 1
                elif error.code() == KafkaError._PARTITION_EOF:
                    open_parts.discard(msg.partition())
        return count
    finally:
        consumer.close()


def _delete_topics(admin: AdminClient, names: list[str]) -> None:
    for name, future in admin.delete_topics(names, operation_timeout=15).items():
        try:
            future.result()
        except Exception as exc:  # a leftover topic is harmless; say so and go on
            log.warning("could not delete the replay topic %s: %s", name, exc)


# --------------------------------------------------------------------------------------------
# The command


def register_replay(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``replay`` to the ``tcp`` subcommands."""
    p = sub.add_parser(
        "replay",
        help="run the live candle and bots dataflows over a recorded trades topic, into backtest files",
        description="Replay a recorded trades topic from its start through the live candle and bots "
        "dataflows; every bot's signals, fills, equity, metrics and report go to OUT/<bot name>/ "
        "(the files of `tcp backtest run`). Nothing live is touched: the replay's own topics are "
        "deleted at the end, nothing is written to PostgreSQL or Redis.",
    )
    p.add_argument("--topic", help="the trades topic to replay (default: the configured okx.trades)")
    p.add_argument(
        "--from", dest="since", type=time_arg, help="trades from this time (inclusive): ISO-8601 or epoch ms"
    )
    p.add_argument("--to", dest="until", type=time_arg, help="trades before this time (exclusive)")
    p.add_argument(
        "--bots", required=True, type=Path, help="a JSON file of bot configs (as for tcp run --bots)"
    )
    p.add_argument("--out", required=True, type=Path, help="the directory for the results (one per bot)")
    p.add_argument("--no-report", action="store_true", help="leave out report.html")
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    """``tcp replay``: 0 done; 2 for bad input (bot file, topic, range); 1 when a bot failed."""
    try:
        configs = load_bots(args.bots)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    since = None if args.since is None else epoch_ms(args.since)
    until = None if args.until is None else epoch_ms(args.until)
    if since is not None and until is not None and since >= until:
        print("error: --from must be before --to", file=sys.stderr)
        return 2
    settings = services.ensure(settings, ("kafka",))
    started = time.perf_counter()
    try:
        result = replay(settings, bots=configs, topic=args.topic, since_ms=since, until_ms=until,
                        out=args.out, report=not args.no_report)  # fmt: skip
    except StrategyFailedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BacktestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    print(f"{result.candles:,} final candles, {result.dead_letters:,} dead letters, in {elapsed:.1f} s")
    for name, r in result.results.items():
        m = r.metrics
        print(f"  {name}: {r.candles:,} candles, {len(r.signals):,} signals, {m.num_trades:,} fills, "
              f"total return {m.total_return:.2%} -> {args.out / name}")  # fmt: skip
    return 0
