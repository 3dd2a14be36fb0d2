"""Bot lifecycle: states, user commands (JSON) and the events answering them (``bots.events``).

States and what moves between them (commands by users, ``fail``/``restart`` by the supervisor)::

    (none) --create--> created --start--> running --pause--> paused
                                          running <--resume-- paused
    created, running, paused, failed --stop--> stopped --start--> running
    created, running, paused --fail--> failed --restart--> running   (supervisor)
                                       failed --start--> running     (by hand)

``update`` (replace the params) is allowed whenever the bot is not running: created, paused,
stopped or failed; it does not change the state. Everything is pure: no I/O, no clock
(callers pass the time).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Final, Literal, get_args

import msgspec
from pydantic import ValidationError

from bots.config import BotConfig, check_bot_name, describe_validation_error

__all__ = [
    "ACTIONS",
    "Action",
    "BotEvent",
    "Command",
    "CommandError",
    "RestartPolicy",
    "State",
    "SupervisorAction",
    "decode_command",
    "decode_event",
    "encode",
    "is_stale",
    "process_command",
    "reject",
    "transition",
]

State = Literal["created", "running", "paused", "stopped", "failed"]
Action = Literal["create", "start", "pause", "resume", "stop", "update"]
SupervisorAction = Literal["fail", "restart"]

ACTIONS: Final[tuple[str, ...]] = get_args(Action)

#: action -> (the states it is allowed in, the state it leads to; None = unchanged).
_RULES: Final[dict[str, tuple[tuple[State, ...], State | None]]] = {
    "start": (("created", "stopped", "failed"), "running"),
    "pause": (("running",), "paused"),
    "resume": (("paused",), "running"),
    "stop": (("created", "running", "paused", "failed"), "stopped"),
    "update": (("created", "paused", "stopped", "failed"), None),
    "fail": (("created", "running", "paused"), "failed"),
    "restart": (("failed",), "running"),
}


class CommandError(ValueError):
    """A command that cannot be decoded or applied. ``reason`` is the human-readable why.

    ``command_id`` and ``bot`` are filled in when they could be read, so a rejection event can
    still name them.
    """

    def __init__(self, reason: str, *, command_id: str | None = None, bot: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command_id = command_id
        self.bot = bot


def _join(states: Iterable[str]) -> str:
    items = list(states)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def transition(bot: str, state: State | None, action: Action | SupervisorAction) -> State:
    """The state after ``action`` on a bot in ``state`` (``None``: the bot does not exist).

    Raises ``CommandError`` with the precise reason when the action is not allowed, e.g.
    ``cannot pause bot 'x': it is stopped (pause needs running)``.
    """
    if action == "create":
        if state is not None:
            msg = f"cannot create bot {bot!r}: it already exists (it is {state})"
            raise CommandError(msg, bot=bot)
        return "created"
    rule = _RULES.get(action)
    if rule is None:
        msg = f"unknown action {action!r} for bot {bot!r}"
        raise CommandError(msg, bot=bot)
    allowed, target = rule
    if state is None:
        msg = f"cannot {action} bot {bot!r}: there is no such bot (create it first)"
        raise CommandError(msg, bot=bot)
    if state not in allowed:
        already = " already" if target == state else ""
        msg = f"cannot {action} bot {bot!r}: it is{already} {state} ({action} needs {_join(allowed)})"
        raise CommandError(msg, bot=bot)
    return state if target is None else target


def _bot_config_hook(kind: type, obj: object) -> object:
    """msgspec decoding hook: a JSON object -> a validated ``BotConfig``."""
    if kind is BotConfig:
        try:
            return BotConfig.model_validate(obj)
        except ValidationError as exc:
            raise ValueError(describe_validation_error(exc)) from None
    msg = f"cannot decode {kind!r}"
    raise NotImplementedError(msg)


def _bot_config_json(obj: object) -> object:
    """msgspec encoding hook: a ``BotConfig`` -> its JSON object (decimals as exact strings)."""
    if isinstance(obj, BotConfig):
        return obj.model_dump(mode="json")
    msg = f"cannot encode {type(obj).__name__}"
    raise NotImplementedError(msg)


_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_EpochMs = Annotated[int, msgspec.Meta(ge=0)]


class Command(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A user's command to one bot, as JSON on the commands topic.

    ``id`` is unique per command (chosen by the client; it makes retries idempotent and is
    echoed in the event). ``config`` is required by ``create`` (and its ``name`` must be
    ``bot``) and ``params`` by ``update`` (they replace the bot's params); other actions take
    neither. ``at`` is when it was issued (epoch ms); ``user`` is free text.
    """

    id: _Id
    action: Action
    bot: str
    at: _EpochMs
    user: str | None = None
    config: BotConfig | None = None
    params: dict[str, int | float | str | bool] | None = None

    def __post_init__(self) -> None:
        check_bot_name(self.bot)
        if self.action == "create":
            if self.config is None:
                msg = "a create command needs a config"
                raise ValueError(msg)
            if self.config.name != self.bot:
                msg = f"the config's name {self.config.name!r} differs from the command's bot {self.bot!r}"
                raise ValueError(msg)
        elif self.config is not None:
            msg = f"a {self.action} command takes no config (only create does)"
            raise ValueError(msg)
        if self.action == "update":
            if self.params is None:
                msg = "an update command needs params"
                raise ValueError(msg)
        elif self.params is not None:
            msg = f"a {self.action} command takes no params (only update does)"
            raise ValueError(msg)


class BotEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What happened to a command (or a supervisor action), on the events topic.

    ``ok`` says whether it was applied; ``state`` is the bot's state after it (``None`` if the
    bot does not exist); ``reason`` says why it was rejected (or why the supervisor acted).
    ``action`` is a string, not an ``Action``: a rejected command may carry any action.
    """

    bot: str
    command_id: str | None
    action: str
    ok: bool
    state: State | None
    reason: str | None
    at: _EpochMs


_encoder = msgspec.json.Encoder(enc_hook=_bot_config_json)
_command_decoder = msgspec.json.Decoder(Command, dec_hook=_bot_config_hook, float_hook=Decimal)
_event_decoder = msgspec.json.Decoder(BotEvent)

#: JSON bytes of a Command or BotEvent (a command's config included).
encode = _encoder.encode
decode_event = _event_decoder.decode


def _peek(raw: bytes | str) -> tuple[str | None, str | None, object]:
    """Best effort: the ``id``, ``bot`` and ``action`` of a command that failed to decode."""
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None
    command_id, bot = data.get("id"), data.get("bot")
    return (
        command_id if isinstance(command_id, str) else None,
        bot if isinstance(bot, str) else None,
        data.get("action"),
    )


def decode_command(raw: bytes | str) -> Command:
    """Parse and validate one command; ``CommandError`` with a readable reason otherwise."""
    try:
        return _command_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        command_id, bot, action = _peek(raw)
        reason = str(exc)
        if reason.startswith("Invalid enum value") and reason.endswith("`$.action`"):
            reason = f"unknown action {action!r}: expected one of {', '.join(ACTIONS)}"
        msg = f"invalid command: {reason}"
        raise CommandError(msg, command_id=command_id, bot=bot) from None
    except msgspec.DecodeError as exc:
        msg = f"invalid command: malformed JSON: {exc}"
        raise CommandError(msg) from None


def process_command(state: State | None, command: Command, *, at: int) -> BotEvent:
    """Apply ``command`` to a bot in ``state``; the event says the outcome and the new state.

    A rejected command leaves the state as it was (the event's ``state``) with ``ok=False``.
    """
    try:
        new_state: State | None = transition(command.bot, state, command.action)
    except CommandError as exc:
        return reject(command, state, exc.reason, at=at)
    return BotEvent(
        bot=command.bot,
        command_id=command.id,
        action=command.action,
        ok=True,
        state=new_state,
        reason=None,
        at=at,
    )


def reject(command: Command, state: State | None, reason: str, *, at: int) -> BotEvent:
    """The event of a command refused for ``reason``; the bot stays in ``state``."""
    return BotEvent(
        bot=command.bot,
        command_id=command.id,
        action=command.action,
        ok=False,
        state=state,
        reason=reason,
        at=at,
    )


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """The supervisor restarts a failed bot at most ``max_restarts`` times per ``window_ms``.

    The window is the half-open interval ``(now - window_ms, now]``: a restart exactly
    ``window_ms`` ago no longer counts.
    """

    max_restarts: int = 3
    window_ms: int = 3_600_000

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            msg = f"max_restarts must be >= 0, got {self.max_restarts}"
            raise ValueError(msg)
        if self.window_ms <= 0:
            msg = f"window_ms must be > 0, got {self.window_ms}"
            raise ValueError(msg)

    def recent(self, restarts: Iterable[int], now_ms: int) -> list[int]:
        """The restart times (epoch ms) that fall in the window ending at ``now_ms``, sorted."""
        return sorted(t for t in restarts if now_ms - self.window_ms < t <= now_ms)

    def allow(self, restarts: Iterable[int], now_ms: int) -> bool:
        """Whether another restart is allowed now, given the times of the previous ones."""
        return len(self.recent(restarts, now_ms)) < self.max_restarts

    def allowed_at(self, restarts: Iterable[int], now_ms: int) -> int:
        """The earliest time (>= ``now_ms``) at which a restart is allowed."""
        recent = self.recent(restarts, now_ms)
        if len(recent) < self.max_restarts:
            return now_ms
        if self.max_restarts == 0:
            msg = "max_restarts is 0: restarts are never allowed"
            raise ValueError(msg)
        return recent[len(recent) - self.max_restarts] + self.window_ms


def is_stale(last_heartbeat_ms: int | None, now_ms: int, stale_after_ms: int) -> bool:
    """A bot is stale when its last heartbeat is more than ``stale_after_ms`` old (or never came)."""
    if stale_after_ms <= 0:
        msg = f"stale_after_ms must be > 0, got {stale_after_ms}"
        raise ValueError(msg)
    return last_heartbeat_ms is None or now_ms - last_heartbeat_ms > stale_after_ms
