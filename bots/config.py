"""Bot configuration: one frozen, validated model per virtual bot, and the JSON file that lists them.

A bot runs one strategy (``strategy`` + ``params``) on one instrument and timeframe, with a
virtual portfolio that starts with ``initial_cash`` of the quote currency. Every field is
checked here except ``params``, which belongs to the strategy: ``validate_strategy`` checks it
against the strategy's own config model.

Sizing (how much a buy spends; fees included, see bots/portfolio.py):

* ``"all-in"`` (default): all the cash;
* ``{"fraction": x}`` with ``0 < x <= 1``: that fraction of the cash;
* ``{"quote": amount}`` with ``amount > 0``: that amount of quote currency, or all the cash if
  there is less.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from tcp.schemas import is_inst_id
from tcp.timeframes import timeframe_name

__all__ = [
    "NAME_MAX_LENGTH",
    "BotConfig",
    "ConfigError",
    "FractionSizing",
    "ParamValue",
    "QuoteSizing",
    "Sizing",
    "check_bot_name",
    "describe_validation_error",
    "load_bots",
    "parse_bots",
    "validate_strategy",
    "with_params",
]

NAME_MAX_LENGTH = 64
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


class ConfigError(ValueError):
    """A bot configuration (or a file of them) is invalid; the message says where and why."""


def check_bot_name(name: str) -> str:
    """Return ``name`` if it is a valid bot name: 1 to 64 characters from ``A-Z a-z 0-9 . _ -``."""
    if not name:
        msg = "a bot name must not be empty"
        raise ValueError(msg)
    if len(name) > NAME_MAX_LENGTH:
        msg = f"bot name {name[:20]!r}... is {len(name)} characters long; at most {NAME_MAX_LENGTH} allowed"
        raise ValueError(msg)
    bad = sorted(set(name) - _NAME_CHARS)
    if bad:
        msg = (
            f"bot name {name!r} contains {''.join(bad)!r}: only letters, digits, '.', '_' and '-' are allowed"
        )
        raise ValueError(msg)
    return name


def _param_value(value: object) -> object:
    """Strategy parameters are flat JSON scalars: numbers (finite), strings or booleans."""
    if isinstance(value, Decimal):  # JSON read with parse_float=Decimal (load_bots, commands)
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        msg = f"a parameter must be a finite number, got {value!r}"
        raise ValueError(msg)
    if not isinstance(value, bool | int | float | str):
        msg = f"a parameter must be a number, a string or a boolean, got {type(value).__name__}"
        raise ValueError(msg)
    return value


#: One strategy parameter value.
ParamValue = Annotated[bool | int | float | str, BeforeValidator(_param_value)]


class FractionSizing(BaseModel):
    """Each buy spends ``fraction`` of the cash (fee included)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fraction: Annotated[Decimal, Field(gt=0, le=1, allow_inf_nan=False)]


class QuoteSizing(BaseModel):
    """Each buy spends ``quote`` units of the quote currency (fee included), or all the cash if less."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quote: Annotated[Decimal, Field(gt=0, allow_inf_nan=False)]


def _sizing_tag(value: object) -> str | None:
    if value == "all-in":
        return "all-in"
    if isinstance(value, FractionSizing) or isinstance(value, dict) and "fraction" in value:
        return "fraction"
    if isinstance(value, QuoteSizing) or isinstance(value, dict) and "quote" in value:
        return "quote"
    return None


#: How much a buy spends: ``"all-in"``, ``{"fraction": x}`` or ``{"quote": amount}``.
Sizing = Annotated[
    Annotated[Literal["all-in"], Tag("all-in")]
    | Annotated[FractionSizing, Tag("fraction")]
    | Annotated[QuoteSizing, Tag("quote")],
    Discriminator(
        _sizing_tag,
        custom_error_type="invalid_sizing",
        custom_error_message='sizing must be "all-in", {"fraction": x} with 0 < x <= 1, or {"quote": amount}',
    ),
]


class BotConfig(BaseModel):
    """One virtual bot. Frozen; unknown keys are rejected.

    ``fee`` is a rate of the notional, paid in quote currency on every fill; ``slippage_bps``
    moves every fill price against the bot by that many basis points (1 bp = 0.01 %).
    ``timeframe`` is stored in its canonical spelling (``1H`` -> ``1h``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    strategy: Annotated[str, Field(min_length=1, max_length=64)]
    params: dict[str, ParamValue] = Field(default_factory=dict)
    inst_id: str
    timeframe: str
    initial_cash: Annotated[Decimal, Field(gt=0, allow_inf_nan=False)] = Decimal(10000)
    fee: Annotated[Decimal, Field(ge=0, lt=Decimal("0.1"), allow_inf_nan=False)] = Decimal("0.001")
    slippage_bps: Annotated[Decimal, Field(ge=0, le=1000, allow_inf_nan=False)] = Decimal(0)
    sizing: Sizing = "all-in"
    long_only: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_bot_name(value)

    @field_validator("inst_id")
    @classmethod
    def _inst_id(cls, value: str) -> str:
        if not is_inst_id(value):
            msg = f"{value!r} is not an instrument id: expected upper-case parts joined by '-', like BTC-USDT"
            raise ValueError(msg)
        return value

    @field_validator("timeframe")
    @classmethod
    def _timeframe(cls, value: str) -> str:
        return timeframe_name(value)  # raises ValueError with the reason

    @field_validator("long_only")
    @classmethod
    def _long_only(cls, value: bool) -> bool:
        if not value:
            msg = "long_only=false is not supported yet: short selling is not implemented, bots are long-only"
            raise ValueError(msg)
        return value


def with_params(config: BotConfig, params: dict[str, ParamValue]) -> BotConfig:
    """A copy of ``config`` whose params are replaced (not merged) by ``params``, validated."""
    data = config.model_dump()
    data["params"] = params
    return BotConfig.model_validate(data)


def describe_validation_error(error: ValidationError, *, root: str = "") -> str:
    """The problems as ``field.path: message``, joined by ``"; "``; paths start at ``root`` if given."""
    parts = []
    for item in error.errors():
        loc = ".".join([root] * bool(root) + [str(part) for part in item["loc"]]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {message}")
    return "; ".join(parts)


def _reject_constant(name: str) -> object:
    msg = f"{name} is not a number in JSON"
    raise ValueError(msg)


def parse_bots(text: str, *, source: str = "<string>") -> list[BotConfig]:
    """Bot configs from JSON text holding a list of config objects, or a single one.

    Raises ``ConfigError`` naming ``source``, the item's index (and name when it has one) and
    the field; bot names must be unique. Numbers are read exactly (no float rounding).
    """
    try:
        data = json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        msg = f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise ConfigError(msg) from exc
    except ValueError as exc:
        msg = f"{source}: invalid JSON: {exc}"
        raise ConfigError(msg) from exc
    items = data if isinstance(data, list) else [data]
    configs: list[BotConfig] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            msg = f"{source}: bot [{index}]: expected a JSON object, got {type(item).__name__}"
            raise ConfigError(msg)
        try:
            config = BotConfig.model_validate(item)
        except ValidationError as exc:
            name = item.get("name")
            label = f"bot [{index}] ({name!r})" if isinstance(name, str) else f"bot [{index}]"
            msg = f"{source}: {label}: {describe_validation_error(exc)}"
            raise ConfigError(msg) from exc
        if config.name in first_index:
            msg = (
                f"{source}: bot [{index}]: duplicate name {config.name!r} "
                f"(already used by bot [{first_index[config.name]}])"
            )
            raise ConfigError(msg)
        first_index[config.name] = index
        configs.append(config)
    return configs


def load_bots(path: str | Path) -> list[BotConfig]:
    """Bot configs from a JSON file (see ``parse_bots``); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"{path}: cannot read the bot config file: {exc.strerror or exc}"
        raise ConfigError(msg) from exc
    except UnicodeDecodeError as exc:
        msg = f"{path}: the bot config file is not UTF-8 text: {exc.reason} at byte {exc.start}"
        raise ConfigError(msg) from exc
    return parse_bots(text, source=str(path))


def validate_strategy(config: BotConfig) -> BaseModel:
    """Check that ``config.strategy`` exists and ``config.params`` fit its config model.

    Returns the strategy's validated params model; raises ``ConfigError`` naming the bot.
    Imports the strategies package lazily, so this module works without it.
    """
    from strategies.registry import get_strategy

    try:
        strategy = get_strategy(config.strategy)
    except (LookupError, ValueError) as exc:
        reason = exc.args[0] if exc.args else f"unknown strategy {config.strategy!r}"
        msg = f"bot {config.name!r}: {reason}"
        raise ConfigError(msg) from exc
    try:
        params: BaseModel = strategy.config_type.model_validate(config.params)
    except ValidationError as exc:
        problems = describe_validation_error(exc, root="params")
        msg = f"bot {config.name!r}: invalid params for strategy {config.strategy!r}: {problems}"
        raise ConfigError(msg) from exc
    return params
