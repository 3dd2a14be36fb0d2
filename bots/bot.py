"""One virtual bot: its config, its strategy, its portfolio and its lifecycle state, together.

``Bot`` is the unit both the live bots dataflow (dataflows/bots.py) and the backtest engine
drive: feed it final candles (``on_candle``) and commands (``on_command``); it answers with what
happened (a :class:`Step`: the signal, the fill, the mark) or the command's event. It does no
I/O and reads no clock (callers pass the time), and it pickles (the dataflow snapshots it).

What each state does with a candle:

* ``running``: the strategy sees it; a signal fills by the fill rule (bots/portfolio.py); the
  portfolio is marked at the close.
* ``paused``: the strategy still sees it (its indicators stay warm) and its signals are
  recorded, but nothing fills; the portfolio is still marked.
* ``created``, ``stopped``, ``failed``: nothing happens.

A candle of another instrument or timeframe is ignored, and so is one whose ``ts_close`` is not
after the last candle seen (a duplicate, or a revision of a candle already acted on: a bot
never trades twice on one candle). A strategy that raises fails the bot (state ``failed``, the
error as the reason) instead of the dataflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from bots.config import BotConfig, ConfigError, validate_strategy, with_params
from bots.lifecycle import BotEvent, Command, RestartPolicy, State, process_command, reject
from bots.portfolio import Fill, Mark, Portfolio, fmt
from dataflows.candle_core import Candle
from strategies.base import Signal, Strategy, StrategyConfig
from strategies.registry import make_strategy

__all__ = ["SUPERVISOR", "Bot", "BotStatus", "Step", "decode_status", "encode_status"]

#: The supervisor's name in commands (``Command.user``): its restarts are rate-limited.
SUPERVISOR = "supervisor"


@dataclass(frozen=True, slots=True)
class Step:
    """What one candle did to a bot: the signal (if any), the fill (if the signal filled), the mark."""

    signal: Signal | None = None
    fill: Fill | None = None
    mark: Mark | None = None


_NOTHING = Step()


class BotStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A bot's live status: the ``bots`` table row, the Redis hash ``bot:{name}`` and the
    ``status:{name}`` message. Money as canonical decimal strings; times epoch ms.

    ``heartbeat`` is the wall-clock time the bots dataflow last reported the bot alive;
    ``last_candle`` the ts_close of the last candle it acted on; ``equity`` is as of that candle.
    """

    name: str
    strategy: str
    params: dict[str, bool | int | float | str]
    params_hash: str
    inst_id: str
    timeframe: str
    config: str  # the BotConfig as JSON
    state: State
    reason: str | None
    cash: str
    position: str
    avg_entry: str | None
    realized_pnl: str
    equity: str | None
    fees_paid: str
    num_trades: int
    last_candle: int | None
    heartbeat: int
    restarts: int
    updated_at: int


_status_encoder = msgspec.json.Encoder()
_status_decoder = msgspec.json.Decoder(BotStatus)


def encode_status(status: BotStatus) -> bytes:
    return _status_encoder.encode(status)


def decode_status(data: bytes | str) -> BotStatus:
    return _status_decoder.decode(data)


@dataclass(slots=True)
class Bot:
    """A bot's whole state. Make one with :meth:`create` (it validates the strategy params)."""

    config: BotConfig
    strategy: Strategy[StrategyConfig]
    portfolio: Portfolio
    state: State = "created"
    reason: str | None = None
    last_ts_close: int | None = None
    last_mark: Mark | None = None
    restarts: list[int] = field(default_factory=list)  # supervisor restarts (epoch ms)
    updated_at: int = 0

    @classmethod
    def create(cls, config: BotConfig, *, at: int = 0) -> Bot:
        """A new bot in state ``created``; ``ConfigError`` if its strategy or params are invalid."""
        validate_strategy(config)
        return cls(
            config, make_strategy(config.strategy, config.params), Portfolio.for_config(config), updated_at=at
        )

    @property
    def name(self) -> str:
        return self.config.name

    # ---- candles --------------------------------------------------------------------------

    def on_candle(self, candle: Candle, *, mark: bool = True) -> Step:
        """Process one FINAL candle of any stream (others than the bot's are ignored).

        ``mark=False`` skips valuing the portfolio at the close (no :class:`Mark`): a backtest
        values it for all candles at once afterwards (equity = cash + position x close between
        fills), which is the same arithmetic at a fraction of the cost.
        """
        if self.state not in ("running", "paused"):
            return _NOTHING
        config = self.config
        if candle.inst_id != config.inst_id or candle.timeframe != config.timeframe:
            return _NOTHING
        if self.last_ts_close is not None and candle.ts_close <= self.last_ts_close:
            return _NOTHING
        self.last_ts_close = candle.ts_close
        try:
            signal = self.strategy.on_candle(candle)
        except Exception as exc:  # a strategy's bug fails its bot, never the dataflow
            self.fail(f"strategy {config.strategy!r} raised {type(exc).__name__}: {exc}", at=candle.ts_close)
            return _NOTHING
        fill = None
        if signal is not None and self.state == "running":
            fill = self.portfolio.apply_for(config, signal.action, candle.close, candle.ts_close)
        if not mark:
            return Step(signal, fill) if signal is not None else _NOTHING
        valued = self.portfolio.mark(candle.close, candle.ts_close)
        self.last_mark = valued
        return Step(signal, fill, valued)

    # ---- lifecycle ------------------------------------------------------------------------

    def on_command(self, command: Command, *, at: int, policy: RestartPolicy | None = None) -> BotEvent:
        """Apply a command to this bot (``create`` is :meth:`create`'s job: here it is rejected).

        A supervisor's ``start`` of a failed bot counts as a restart and is refused beyond
        ``policy`` (3 an hour by default). ``update`` replaces the params and starts the
        strategy afresh (it warms up again).
        """
        if command.action == "create":
            return reject(
                command, self.state, f"bot {self.name!r} exists already (state {self.state})", at=at
            )
        restart = command.user == SUPERVISOR and command.action == "start" and self.state == "failed"
        if restart:
            policy = policy or RestartPolicy()
            if not policy.allow(self.restarts, at):
                reason = (
                    f"bot {self.name!r} was restarted {policy.max_restarts} times in the last "
                    f"{policy.window_ms // 60_000} min: not again before {policy.allowed_at(self.restarts, at)} (epoch ms)"
                )
                return reject(command, self.state, reason, at=at)
        new_config = self.config
        if command.action == "update":
            try:
                new_config = with_params(self.config, command.params or {})
                validate_strategy(new_config)
            except (ConfigError, ValueError) as exc:
                return reject(command, self.state, str(exc), at=at)
        event = process_command(self.state, command, at=at)
        if not event.ok or event.state is None:
            return event
        if command.action == "update":
            self.config = new_config
            self.strategy = make_strategy(new_config.strategy, new_config.params)
        if restart:
            self.restarts = [*policy.recent(self.restarts, at), at] if policy else [at]
        self.state = event.state
        self.reason = None
        self.updated_at = at
        return event

    def status(self, *, now: int) -> BotStatus:
        """The bot's status as of wall-clock ``now`` (its heartbeat)."""
        config, portfolio, mark = self.config, self.portfolio, self.last_mark
        return BotStatus(
            name=config.name,
            strategy=config.strategy,
            params=dict(config.params),
            params_hash=self.strategy.params_hash,
            inst_id=config.inst_id,
            timeframe=config.timeframe,
            config=config.model_dump_json(),
            state=self.state,
            reason=self.reason,
            cash=fmt(portfolio.cash),
            position=fmt(portfolio.position),
            avg_entry=None if portfolio.avg_entry is None else fmt(portfolio.avg_entry),
            realized_pnl=fmt(portfolio.realized_pnl),
            equity=None if mark is None else mark.equity,
            fees_paid=fmt(portfolio.fees_paid),
            num_trades=portfolio.num_trades,
            last_candle=self.last_ts_close,
            heartbeat=now,
            restarts=len(self.restarts),
            updated_at=self.updated_at,
        )

    def fail(self, reason: str, *, at: int) -> None:
        """The bot failed (its strategy raised): it stops acting until restarted."""
        self.state = "failed"
        self.reason = reason
        self.updated_at = at
