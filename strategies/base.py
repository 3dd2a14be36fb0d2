"""The strategy API: validated configs, the ``Strategy`` base class and the ``Signal`` message.

A strategy turns a stream of FINAL candles of one ``(inst_id, timeframe)`` into buy/sell
signals. The candle dataflow only hands final candles to strategies; a re-emitted candle (a
late-trade revision) or a duplicate has a ``ts_close`` that was already processed, and
:meth:`Strategy.on_candle` ignores it (returns ``None``), so a replay with duplicates gives the
same signals as a clean one. Strategy instances are plain picklable objects (their indicators
included): a Bytewax state snapshot pickles them and the restored copy continues identically.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Generic, Literal, TypeVar

import msgspec
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from dataflows.candle_core import Candle

__all__ = [
    "Action",
    "Signal",
    "Strategy",
    "StrategyConfig",
    "decode_signal",
    "encode_signal",
    "params_hash",
]

Action = Literal["buy", "sell"]


class StrategyConfig(BaseModel):
    """Base class of strategy parameters: immutable, unknown keys rejected.

    Subclasses declare each parameter with its range (``Field(ge=..., le=...)``) and cross-field
    rules with ``model_validator(mode="after")``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    @property
    def params_hash(self) -> str:
        """See :func:`params_hash`."""
        return params_hash(self)


def params_hash(config: StrategyConfig) -> str:
    """A stable short id of a parameter set: the first 16 hex digits of the SHA-256 of the
    canonical JSON of ``config.model_dump(mode="json")`` (sorted keys, no whitespace)."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Signal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A strategy's decision on one final candle.

    ``ts_close`` is the close time (epoch ms) of the candle that caused it, ``price`` that
    candle's close exactly as given, ``indicators`` the values behind the decision and
    ``reason`` a human-readable sentence.
    """

    strategy: str
    params_hash: str
    inst_id: str
    timeframe: str
    ts_close: int
    action: Action
    price: str
    indicators: dict[str, float]
    reason: str


_signal_encoder = msgspec.json.Encoder()
_signal_decoder = msgspec.json.Decoder(Signal)


def encode_signal(signal: Signal) -> bytes:
    """Compact JSON; :func:`decode_signal` gives back an equal ``Signal``."""
    return _signal_encoder.encode(signal)


def decode_signal(data: bytes | str) -> Signal:
    """Parse and validate a ``Signal`` (unknown fields and wrong types are rejected)."""
    return _signal_decoder.decode(data)


C = TypeVar("C", bound=StrategyConfig, covariant=True)


class Strategy(ABC, Generic[C]):
    """Base class of strategies. One instance handles one ``(inst_id, timeframe)`` stream.

    Subclasses set ``name`` and ``config_type`` and implement :meth:`on_new_candle`, which sees
    each final candle once, in increasing ``ts_close`` order, and may keep any picklable state
    (typically indicators from :mod:`strategies.indicators`).
    """

    name: ClassVar[str]
    config_type: ClassVar[type[StrategyConfig]]

    def __init__(self, config: C) -> None:
        if not isinstance(config, self.config_type):
            msg = f"{type(self).__name__} needs a {self.config_type.__name__}, got {type(config).__name__}"
            raise TypeError(msg)
        self.config: C = config
        self._params_hash = config.params_hash
        self._last_ts_close: int | None = None
        self._stream: tuple[str, str] | None = None

    @property
    def params_hash(self) -> str:
        """The config's :func:`params_hash`."""
        return self._params_hash

    @property
    def last_ts_close(self) -> int | None:
        """The ``ts_close`` of the last candle processed (``None`` before the first)."""
        return self._last_ts_close

    def on_candle(self, candle: Candle) -> Signal | None:
        """Process one FINAL candle; return a signal or ``None``.

        A candle whose ``ts_close`` is not after the last processed one (a duplicate or a
        revision re-emit) is ignored: ``None``, and the state does not change. A candle of
        another ``(inst_id, timeframe)`` than the first one seen raises ``ValueError``.
        """
        stream = self._stream
        if stream is None:
            self._stream = (candle.inst_id, candle.timeframe)
        else:
            if candle.inst_id != stream[0] or candle.timeframe != stream[1]:
                msg = (
                    f"strategy {self.name!r} handles {stream[0]} {stream[1]} candles, "
                    f"got one of {candle.inst_id} {candle.timeframe}"
                )
                raise ValueError(msg)
            last = self._last_ts_close
            if last is not None and candle.ts_close <= last:
                return None
        self._last_ts_close = candle.ts_close
        return self.on_new_candle(candle)

    @abstractmethod
    def on_new_candle(self, candle: Candle) -> Signal | None:
        """Decide on a candle newer than every candle seen before (called by :meth:`on_candle`)."""

    def signal(self, candle: Candle, action: Action, *, indicators: dict[str, float], reason: str) -> Signal:
        """Build this strategy's ``Signal`` for ``candle`` (price = the candle's close string)."""
        return Signal(
            strategy=self.name,
            params_hash=self._params_hash,
            inst_id=candle.inst_id,
            timeframe=candle.timeframe,
            ts_close=candle.ts_close,
            action=action,
            price=candle.close,
            indicators=indicators,
            reason=reason,
        )

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.config.model_dump().items())
        return f"{type(self).__name__}({params})"
