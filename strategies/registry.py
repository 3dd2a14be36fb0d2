"""Find strategies by name: the built-ins, plus plug-ins from the ``tcp.strategies`` entry points.

A plug-in is any installed distribution declaring, in its ``pyproject.toml``::

    [project.entry-points."tcp.strategies"]
    my_strategy = "my_package.my_module:MyStrategy"

where ``MyStrategy`` is a concrete :class:`strategies.base.Strategy` subclass whose ``name`` is
the entry-point name. A plug-in that fails to import or is not such a class is skipped with a
warning naming it; a plug-in cannot replace a built-in (also skipped with a warning). Discovery
runs once and is cached; :func:`clear_cache` forgets it (e.g. after installing a plug-in).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points

from pydantic import ValidationError

from strategies.base import Strategy, StrategyConfig
from strategies.bollinger_breakout import BollingerBreakout
from strategies.ema_crossover import EmaCrossover
from strategies.macd_cross import MacdCross
from strategies.rsi_reversion import RsiReversion

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "InvalidStrategyParams",
    "StrategyClass",
    "UnknownStrategyError",
    "available",
    "clear_cache",
    "get_strategy",
    "make_strategy",
]

log = logging.getLogger(__name__)

#: The entry-point group plug-in strategies are registered under.
ENTRY_POINT_GROUP = "tcp.strategies"

StrategyClass = type[Strategy[StrategyConfig]]

#: The strategies shipped in this package.
BUILTINS: tuple[StrategyClass, ...] = (EmaCrossover, MacdCross, RsiReversion, BollingerBreakout)


class UnknownStrategyError(LookupError):
    """No built-in or plug-in strategy has this name."""


class InvalidStrategyParams(ValueError):
    """The params do not validate against the strategy's config model."""


def _class_problem(name: str, obj: object) -> str | None:
    """Why ``obj`` cannot be registered as strategy ``name`` (``None`` if it can)."""
    if not (isinstance(obj, type) and issubclass(obj, Strategy)):
        return f"{obj!r} is not a Strategy subclass"
    if inspect.isabstract(obj):
        return f"{obj.__qualname__} is abstract"
    declared = getattr(obj, "name", None)
    if declared != name:
        return f"{obj.__qualname__}.name is {declared!r}, not the entry-point name {name!r}"
    config_type = getattr(obj, "config_type", None)
    if not (isinstance(config_type, type) and issubclass(config_type, StrategyConfig)):
        return f"{obj.__qualname__}.config_type is not a StrategyConfig subclass"
    return None


def _load_plugin(entry: EntryPoint, known: Mapping[str, StrategyClass]) -> StrategyClass | None:
    if entry.name in known:
        log.warning(
            "strategy plug-in %r (%s) skipped: the name is already taken by %s",
            entry.name,
            entry.value,
            known[entry.name].__qualname__,
        )
        return None
    try:
        obj = entry.load()
    except Exception as exc:
        log.warning("strategy plug-in %r (%s) skipped: it failed to load: %r", entry.name, entry.value, exc)
        return None
    problem = _class_problem(entry.name, obj)
    if problem is not None:
        log.warning("strategy plug-in %r (%s) skipped: %s", entry.name, entry.value, problem)
        return None
    return obj


@functools.cache
def _discover() -> dict[str, StrategyClass]:
    found: dict[str, StrategyClass] = {cls.name: cls for cls in BUILTINS}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        cls = _load_plugin(entry, found)
        if cls is not None:
            found[entry.name] = cls
    return found


def clear_cache() -> None:
    """Forget the discovered plug-ins; the next lookup scans the entry points again."""
    _discover.cache_clear()


def available() -> dict[str, StrategyClass]:
    """Every usable strategy by name: built-ins first, then plug-ins (a new dict each call)."""
    return dict(_discover())


def get_strategy(name: str) -> StrategyClass:
    """The strategy class called ``name``; ``UnknownStrategyError`` lists the available ones."""
    found = _discover()
    cls = found.get(name)
    if cls is None:
        msg = f"unknown strategy {name!r}; available: {', '.join(sorted(found))}"
        raise UnknownStrategyError(msg)
    return cls


def _format_errors(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False):
        cause = item.get("ctx", {}).get("error")
        text = str(cause) if item["type"] == "value_error" and cause is not None else item["msg"]
        if item["loc"]:
            where = ".".join(str(part) for part in item["loc"])
            parts.append(f"{where}: {text} (got {item['input']!r})")
        else:  # a cross-field rule of the whole config
            parts.append(text)
    return "; ".join(parts)


def make_strategy(name: str, params: Mapping[str, object] | None = None) -> Strategy[StrategyConfig]:
    """A new strategy ``name`` configured with ``params`` (validated by its config model; missing
    params take their defaults). Raises ``UnknownStrategyError`` or ``InvalidStrategyParams``."""
    cls = get_strategy(name)
    try:
        config = cls.config_type.model_validate(dict(params or {}))
    except ValidationError as exc:
        msg = f"invalid params for strategy {name!r}: {_format_errors(exc)}"
        raise InvalidStrategyParams(msg) from exc
    return cls(config)
