"""The bots dataflow: final candles and commands -> strategies and virtual bots -> what they did.

    python -m bytewax.run dataflows.bots:flow           (settings from TCP_* variables)
    tcp bots run [--bots FILE.json] [-w N] [-i I -a ...] (the same flow, recovery on)

Steps (each a small function or class below):

1. ``candles_in`` / ``commands_in``: Kafka ``candles`` (final candles only) and
   ``bots.commands``, a consumed batch at a time (dataflows.kafka_io).
2. ``decode``: candles and commands decoded; a command that does not decode is answered on
   ``bots.events`` with the reason (never a crash).
3. ``directory``: ONE stateful step (a single key) that knows every bot's stream
   (inst_id, timeframe). It routes each command to its bot and fans each candle out to the bots
   of its stream, in arrival order, so a bot sees its commands and candles in the order the
   directory saw them. Its work per item is a dict lookup: it is not the bottleneck.
4. ``bots``: one stateful step per bot (keyed by name, so Bytewax spreads bots over workers)
   around :class:`bots.bot.Bot`: strategy, portfolio, lifecycle. It heartbeats every
   ``bot_heartbeat_s`` while running (a wall-clock timer).
5. Outputs: events to Kafka ``bots.events``; PostgreSQL ``signals``, ``bot_trades``,
   ``bot_performance`` and ``bots`` (idempotent upserts on natural keys); Redis: the hash
   ``bot:{name}`` and the channels ``signals:{bot}`` and ``status:{bot}`` (a live view).

Bots come from ``create`` commands, or from ``bots`` given to :func:`build_flow` (``tcp run
--bots FILE``): those are created and started by the directory before the first item, so they
see every candle of the topic (replays are deterministic). State: the directory and every bot
are snapshotted (deep copies) with the Kafka offsets when recovery is on; outputs are
at-least-once, absorbed by the idempotent sinks (a Redis publish may repeat after a crash).
"""

from __future__ import annotations

import functools
import logging
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow, Stream
from bytewax.operators import StatefulLogic
from bytewax.outputs import DynamicSink
from bytewax.testing import TestingSource

from bots.bot import Bot, BotStatus, encode_status
from bots.config import BotConfig, ConfigError
from bots.lifecycle import BotEvent, Command, CommandError, RestartPolicy, decode_command, reject
from bots.lifecycle import encode as encode_event
from bots.portfolio import Fill, Mark
from dataflows.candle_core import Candle, decode_candle
from dataflows.candles import KafkaItem
from dataflows.kafka_io import KafkaBatchSource, KafkaProduceSink, MessageBatch
from sinks.bytewax_pg import PostgresSink, Row
from sinks.postgres import Upsert
from sinks.redis import HashSet, Publish, RedisOp, RedisSink, bot_status_key, signals_channel, status_channel
from strategies.base import Signal, encode_signal
from tcp import topics
from tcp.config import Settings
from tcp.observe import BOT_EQUITY, BOT_HEARTBEAT, BOT_REALIZED_PNL

__all__ = [
    "BOTS_UPSERT",
    "BOT_PERFORMANCE_UPSERT",
    "BOT_TRADES_UPSERT",
    "SIGNALS_UPSERT",
    "BotLogic",
    "Directory",
    "Output",
    "build_flow",
    "route",
]  # and `flow`, lazily

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
#: The directory's single key.
_ALL = "all"
#: Who a bot created from ``build_flow(bots=...)`` is created by, in its events.
INITIAL = "tcp run --bots"

#: An input item: a final candle, a command, or the answer to a command that did not decode.
Item = (
    tuple[Literal["candle"], Candle]
    | tuple[Literal["command"], Command]
    | tuple[Literal["event"], BotEvent]
    | tuple[Literal["hello"], None]  # the first item of a run: the directory starts its bots at once
)


@dataclass(slots=True)
class Output:
    """What the bot step emitted for one batch of items (or a heartbeat), in order."""

    bot: str
    inst_id: str = ""
    timeframe: str = ""
    events: list[BotEvent] = field(default_factory=list)
    signals: list[Signal] = field(default_factory=list)
    fills: list[Fill] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    status: BotStatus | None = None  # the latest, when it changed (or a heartbeat)

    def __bool__(self) -> bool:
        return bool(self.events or self.signals or self.fills or self.marks or self.status)


SIGNALS_UPSERT = Upsert(
    "signals",
    (
        "strategy",
        "params_hash",
        "inst_id",
        "timeframe",
        "ts_close",
        "action",
        "price",
        "indicators",
        "reason",
    ),
    ("strategy", "params_hash", "inst_id", "timeframe", "ts_close"),
    update=False,  # a strategy's signal on a candle never changes
)
BOT_TRADES_UPSERT = Upsert(
    "bot_trades",
    ("bot", "ts", "side", "seq", "inst_id", "timeframe", "price", "size", "notional", "fee", "cash_after",
     "position_after", "realized_pnl"),
    ("bot", "ts", "side"),
    update=False,
)  # fmt: skip
BOT_PERFORMANCE_UPSERT = Upsert(
    "bot_performance",
    ("bot", "ts_close", "close", "cash", "position", "equity", "unrealized_pnl", "realized_pnl", "fees_paid"),
    ("bot", "ts_close"),
    update=False,  # a bot's mark at a candle close is a fact: a replay computes the same one
)
BOTS_UPSERT = Upsert(
    "bots",
    ("name", "strategy", "params", "params_hash", "inst_id", "timeframe", "config", "state", "reason", "cash",
     "position", "avg_entry", "realized_pnl", "equity", "fees_paid", "num_trades", "last_candle",
     "last_heartbeat", "stale", "restarts", "updated_at"),
    ("name",),
)  # fmt: skip


@dataclass(frozen=True)
class BotsOptions:
    """The bots dataflow's knobs, from the settings."""

    heartbeat_ms: int
    restarts: RestartPolicy

    @classmethod
    def from_settings(cls, settings: Settings) -> BotsOptions:
        return cls(
            heartbeat_ms=int(settings.bot_heartbeat_s * 1000),
            restarts=RestartPolicy(settings.bot_restart_max, int(settings.bot_restart_window_s * 1000)),
        )


# --------------------------------------------------------------------------------------------
# Step 2: decode


def decode_candles(batch: MessageBatch) -> list[Item]:
    """The final candles of a batch of the ``candles`` topic (written by the candle dataflow)."""
    items: list[Item] = []
    for value, offset in zip(batch.values, batch.offsets, strict=True):
        try:
            items.append(("candle", decode_candle(value)))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.error("candles[%d]@%d is not a candle (%s): skipped", batch.partition, offset, exc)
    return items


def decode_commands(batch: MessageBatch) -> list[Item]:
    """Commands; one that does not decode becomes its rejection event (on ``bots.events``)."""
    items: list[Item] = []
    for value in batch.values:
        try:
            items.append(("command", decode_command(value)))
        except CommandError as exc:
            event = BotEvent(
                bot=exc.bot or "", command_id=exc.command_id, action="?", ok=False, state=None,
                reason=exc.reason, at=_now_ms(),
            )  # fmt: skip
            items.append(("event", event))
    return items


# --------------------------------------------------------------------------------------------
# Step 3: the directory


@dataclass
class Directory:
    """Which bots exist and which stream each follows; the routing state (a single key)."""

    streams: dict[str, tuple[str, str]] = field(default_factory=dict)  # bot -> (inst_id, timeframe)
    followers: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # stream -> bots

    def add(self, config: BotConfig) -> None:
        stream = (config.inst_id, config.timeframe)
        self.streams[config.name] = stream
        self.followers.setdefault(stream, []).append(config.name)


def route(
    initial: Sequence[BotConfig], directory: Directory | None, items: list[Item]
) -> tuple[Directory, list[tuple[str, list[Item]]]]:
    """Route a batch of items to the bots they concern: ``(bot name, its items in order)``.

    The first call creates and starts the ``initial`` bots. A ``create`` of a new name
    registers it (the bot step validates it and may still reject it: then it never acts); a
    command for an unknown bot goes to that name anyway, to be rejected there with the reason.
    """
    routed: dict[str, list[Item]] = {}
    if directory is None:
        directory = Directory()
        now = _now_ms()
        for config in initial:
            directory.add(config)
            for action in ("create", "start"):
                initial_command = Command(
                    id=f"initial:{config.name}:{action}", action=action, bot=config.name, at=now, user=INITIAL,
                    config=config if action == "create" else None,
                )  # fmt: skip
                routed.setdefault(config.name, []).append(("command", initial_command))
    followers = directory.followers
    for item in items:
        kind = item[0]
        if kind == "candle":
            candle = item[1]
            assert isinstance(candle, Candle)
            for name in followers.get((candle.inst_id, candle.timeframe), ()):
                routed.setdefault(name, []).append(item)
        elif kind == "command":
            command = item[1]
            assert isinstance(command, Command)
            if (
                command.action == "create"
                and command.bot not in directory.streams
                and command.config is not None
            ):
                directory.add(command.config)
            routed.setdefault(command.bot, []).append(item)
        elif kind == "event":
            event = item[1]
            assert isinstance(event, BotEvent)
            routed.setdefault(event.bot, []).append(item)
    return directory, list(routed.items())


# --------------------------------------------------------------------------------------------
# Step 4: one bot


class BotLogic(StatefulLogic[list[Item], Output, bytes]):
    """One bot as a Bytewax stateful logic. Snapshot: the :class:`Bot` pickled."""

    def __init__(self, options: BotsOptions, resume: bytes | None) -> None:
        self._options = options
        self._bot: Bot | None = None if resume is None else pickle.loads(resume)  # noqa: S301  # our own
        self._beat = 0  # wall-clock time of the last status output

    def on_item(self, value: list[Item]) -> tuple[list[Output], bool]:
        now = _now_ms()
        out = Output("")
        changed = False
        for item in value:
            before = None if self._bot is None else self._bot.state
            if item[0] == "event":
                out.events.append(item[1])
                changed = True
            elif item[0] == "command":
                out.events.append(self._command(item[1], now))
                changed = True
            elif item[0] == "candle" and self._bot is not None:
                step = self._bot.on_candle(item[1])
                if step.signal is not None:
                    out.signals.append(step.signal)
                if step.fill is not None:
                    out.fills.append(step.fill)
                    changed = True
                if step.mark is not None:
                    out.marks.append(step.mark)
            if self._bot is not None and self._bot.state != before:
                changed = True
                if self._bot.state == "failed":
                    failed = self._bot
                    log.warning(
                        "bot %s failed: %s",
                        failed.name,
                        failed.reason,
                        extra={"bot": failed.name, "inst_id": failed.config.inst_id},
                    )
        bot = self._bot
        if bot is None:
            if out.events:
                out.bot = out.events[0].bot
            return ([out] if out else []), StatefulLogic.DISCARD
        out.bot, out.inst_id, out.timeframe = bot.name, bot.config.inst_id, bot.config.timeframe
        # The status (bots row, Redis hash) when something a user sees changed; otherwise the
        # heartbeat carries it (every bot_heartbeat_s), and the end of a finite input.
        if changed:
            out.status = _observed(bot.status(now=now))
            self._beat = now
        return ([out] if out else []), StatefulLogic.RETAIN

    def _command(self, command: Command, now: int) -> BotEvent:
        if self._bot is not None:
            return self._bot.on_command(command, at=now, policy=self._options.restarts)
        if command.action != "create" or command.config is None:
            return reject(command, None, f"no bot named {command.bot!r} (create it first)", at=now)
        try:
            self._bot = Bot.create(command.config, at=now)
        except (ConfigError, ValueError) as exc:
            return reject(command, None, str(exc), at=now)
        return BotEvent(bot=command.bot, command_id=command.id, action="create", ok=True, state="created",
                        reason=None, at=now)  # fmt: skip

    def on_notify(self) -> tuple[list[Output], bool]:
        """The heartbeat: the bot's status, with the time, while it runs."""
        bot = self._bot
        if bot is None:
            return [], StatefulLogic.DISCARD
        now = _now_ms()
        self._beat = now
        status = _observed(bot.status(now=now))
        return [
            Output(bot.name, bot.config.inst_id, bot.config.timeframe, status=status)
        ], StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list[Output], bool]:
        """The end of a finite input (``--exit-at-end``): the final status of the bot."""
        return self.on_notify()

    def notify_at(self) -> datetime | None:
        if self._bot is None or self._bot.state != "running":
            return None
        return _EPOCH + (self._beat + self._options.heartbeat_ms) * _MS

    def snapshot(self) -> bytes:
        """The bot pickled (cheaper than a deep copy; Bytewax asks at every epoch)."""
        assert self._bot is not None  # DISCARDed otherwise
        return pickle.dumps(self._bot, protocol=pickle.HIGHEST_PROTOCOL)


# --------------------------------------------------------------------------------------------
# Step 5: outputs


def _observed(status: BotStatus) -> BotStatus:
    """``status``, after setting the bot's gauges (heartbeat, equity, realized P&L)."""
    name = status.name
    BOT_HEARTBEAT.labels(name).set(status.heartbeat / 1000)
    if status.equity is not None:
        BOT_EQUITY.labels(name).set(float(status.equity))
    BOT_REALIZED_PNL.labels(name).set(float(status.realized_pnl))
    return status


@functools.lru_cache(maxsize=4096)  # the bots of a stream share their candles' close times
def _ts(ms: int | None) -> datetime | None:
    return None if ms is None else _EPOCH + ms * _MS


def signal_row(signal: Signal) -> Row:
    return (
        signal.strategy, signal.params_hash, signal.inst_id, signal.timeframe, _ts(signal.ts_close),
        signal.action, signal.price, msgspec.json.encode(signal.indicators).decode(), signal.reason,
    )  # fmt: skip


def fill_row(fill: Fill, inst_id: str, timeframe: str) -> Row:
    return (
        fill.bot, _ts(fill.ts), fill.side, fill.seq, inst_id, timeframe, fill.price, fill.size, fill.notional,
        fill.fee, fill.cash_after, fill.position_after, fill.realized_pnl,
    )  # fmt: skip


def mark_row(mark: Mark) -> Row:
    return (
        mark.bot, _ts(mark.ts_close), mark.close, mark.cash, mark.position, mark.equity, mark.unrealized_pnl,
        mark.realized_pnl, mark.fees_paid,
    )  # fmt: skip


def status_row(status: BotStatus) -> Row:
    return (
        status.name, status.strategy, msgspec.json.encode(status.params).decode(), status.params_hash,
        status.inst_id, status.timeframe, status.config, status.state, status.reason, status.cash,
        status.position, status.avg_entry, status.realized_pnl, status.equity, status.fees_paid,
        status.num_trades, _ts(status.last_candle), _ts(status.heartbeat), False, status.restarts,
        _ts(status.updated_at),
    )  # fmt: skip


def status_hash(status: BotStatus) -> dict[str, str]:
    """The Redis hash ``bot:{name}``: every field as text ('' for none)."""
    fields = msgspec.structs.asdict(status)
    fields["params"] = msgspec.json.encode(status.params).decode()
    return {key: "" if value is None else str(value) for key, value in fields.items()}


def redis_ops(output: Output, status_ttl_s: int) -> list[RedisOp]:
    """What the dashboard sees live of one output: the bot's channels and its status hash."""
    ops: list[RedisOp] = []
    channel = signals_channel(output.bot) if output.signals or output.fills else ""
    for signal in output.signals:
        ops.append(Publish(channel, b'{"kind":"signal","signal":' + encode_signal(signal) + b"}"))
    for fill in output.fills:
        ops.append(Publish(channel, b'{"kind":"fill","fill":' + msgspec.json.encode(fill) + b"}"))
    if output.status is not None:
        ops.append(HashSet(bot_status_key(output.bot), status_hash(output.status), ttl_s=status_ttl_s))
        ops.append(Publish(status_channel(output.bot), encode_status(output.status)))
    return ops


def build_flow(
    settings: Settings,
    *,
    bots: Sequence[BotConfig] = (),
    tail: bool = True,
    write_postgres: bool = True,
    write_redis: bool = True,
    outputs_to: DynamicSink[Output] | None = None,
) -> Dataflow:
    """The bots dataflow over the services in ``settings`` (already ensured and migrated).

    ``write_postgres=False`` / ``write_redis=False`` leave those sinks out (benchmarks, tests,
    replays); ``outputs_to`` also hands every :class:`Output` to that sink (``tcp replay``).
    """
    options = BotsOptions.from_settings(settings)
    initial = tuple(bots)
    events_topic = settings.topic(topics.BOTS_EVENTS)
    flow = Dataflow("bots")

    candles_source = KafkaBatchSource(settings.kafka_bootstrap, settings.topic(topics.CANDLES), tail=tail)
    candle_batches = op.input("candles_in", flow, candles_source)
    command_batches = op.input(
        "commands_in",
        flow,
        KafkaBatchSource(settings.kafka_bootstrap, settings.topic(topics.BOTS_COMMANDS), tail=tail),
    )
    # One item at start-up, so that the directory starts the given bots before any candle comes
    # (TestingSource: a finite, recoverable source; after a restart it has nothing left to send).
    first: list[list[Item]] = [[("hello", None)]]
    hello: Stream[list[Item]] = op.input("hello", flow, TestingSource(first))
    # Lists all the way: Bytewax's cost is per item, so a consumed batch stays one item, and the
    # directory hands each bot one list per batch.
    items = op.merge(
        "items",
        hello,
        op.filter_map("decode_candles", candle_batches, lambda batch: decode_candles(batch) or None),
        op.filter_map("decode_commands", command_batches, lambda batch: decode_commands(batch) or None),
    )
    keyed = op.key_on("one_directory", items, lambda _items: _ALL)
    routed = op.stateful_flat_map("directory", keyed, lambda state, batch: route(initial, state, batch))
    by_bot = op.map("by_bot", routed, lambda kv: kv[1])  # (bot name, its items): keyed by bot
    outputs_keyed = op.stateful("bots", by_bot, lambda resume: BotLogic(options, resume))
    outputs: Stream[Output] = op.map("drop_key", outputs_keyed, lambda kv: kv[1])
    if outputs_to is not None:
        op.output("outputs_out", outputs, outputs_to)

    def events(o: Output) -> list[KafkaItem] | None:
        return [(events_topic, e.bot.encode(), encode_event(e)) for e in o.events] or None

    op.output(
        "events_out",
        op.flat_map("events", op.filter_map("event_items", outputs, events), lambda batch: batch),
        KafkaProduceSink(
            settings.kafka_bootstrap, client_id="tcp-bots", while_waiting=candles_source.check_topics
        ),
    )
    if write_postgres:
        dsn = settings.postgres_dsn.get_secret_value()
        signals = op.filter_map("signal_rows", outputs, lambda o: [signal_row(x) for x in o.signals] or None)
        op.output("signals_pg", signals, PostgresSink(dsn, SIGNALS_UPSERT))
        fills = op.filter_map(
            "fill_rows", outputs, lambda o: [fill_row(x, o.inst_id, o.timeframe) for x in o.fills] or None
        )
        op.output("bot_trades_pg", fills, PostgresSink(dsn, BOT_TRADES_UPSERT))
        marks = op.filter_map("mark_rows", outputs, lambda o: [mark_row(x) for x in o.marks] or None)
        op.output("bot_performance_pg", marks, PostgresSink(dsn, BOT_PERFORMANCE_UPSERT))
        statuses = op.filter_map(
            "status_rows", outputs, lambda o: None if o.status is None else [status_row(o.status)]
        )
        op.output("bots_pg", statuses, PostgresSink(dsn, BOTS_UPSERT))
    if write_redis:
        ttl = max(60, 10 * options.heartbeat_ms // 1000)
        ops = op.filter_map("redis_ops", outputs, lambda o: redis_ops(o, ttl) or None)
        op.output("redis_out", ops, RedisSink(settings.redis_url.get_secret_value()))
    return flow


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def __getattr__(name: str) -> Dataflow:
    """``dataflows.bots:flow`` for ``python -m bytewax.run``: built on first access, from TCP_*."""
    if name != "flow":
        raise AttributeError(name)
    from dataflows.entry import flow_from_env

    return flow_from_env(build_flow, ("kafka", "postgres", "redis"))
