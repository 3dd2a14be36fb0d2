"""Settings: one frozen model, read from the environment (prefix ``TCP_``) and an optional file.

The environment is read once, at the entry point (``Settings.load()``); everything below it
gets the model passed in. Values come, highest first, from: keyword arguments, ``TCP_*``
environment variables, the file named by ``TCP_CONFIG`` (TOML or JSON), the defaults here.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from tcp.timeframes import parse_timeframe

__all__ = ["DEFAULT_INSTRUMENTS", "DEFAULT_TIMEFRAMES", "Settings"]

DEFAULT_INSTRUMENTS = (
    "BTC-USDT",
    "ETH-USDT",
    "SOL-USDT",
    "DOGE-USDT",
    "TON-USDT",
    "ETH-USDC",
    "BTC-USDC",
    "UNI-USDT",
    "PEPE-USDT",
)
DEFAULT_TIMEFRAMES = ("1m", "5m", "15m", "1h", "4h", "1d")


class _FileSource(PydanticBaseSettingsSource):
    """Settings from the TOML or JSON file named by ``TCP_CONFIG`` (keys without the prefix)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is None:
            return
        if not path.is_file():
            msg = f"TCP_CONFIG names {str(path)!r}, which is not a file"
            raise FileNotFoundError(msg)
        text = path.read_text()
        self._data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    """Everything the platform can be told. Unknown keys are rejected."""

    model_config = SettingsConfigDict(
        env_prefix="TCP_",
        frozen=True,
        extra="forbid",
        env_nested_delimiter="__",
    )

    # Where embedded services keep their data, pid and port files. Two homes = two setups.
    home: Path = Path(".tcp")

    # Services: empty means "start an embedded one".
    kafka_bootstrap: str = ""
    postgres_dsn: SecretStr = SecretStr("")
    redis_url: SecretStr = SecretStr("")
    # A configured PostgreSQL or Redis that does not answer at start-up: start an embedded one
    # instead (true: a laptop), or stop with an error (false: deployments, where an embedded
    # database inside a container would take writes that nobody ever reads).
    embedded_fallback: bool = True

    # Kafka topics.
    topic_partitions: Annotated[int, Field(ge=1, le=1024)] = 6
    topic_replication: Annotated[int, Field(ge=1, le=16)] = 1
    topic_prefix: str = ""

    # Market data.
    # Comma-separated in the environment: TCP_INSTRUMENTS=BTC-USDT,ETH-USDT
    instruments: Annotated[tuple[str, ...], NoDecode] = DEFAULT_INSTRUMENTS
    timeframes: Annotated[tuple[str, ...], NoDecode] = DEFAULT_TIMEFRAMES

    # OKX connector.
    okx_ws_url: str = "wss://ws.okx.com:8443/ws/v5/public"
    okx_rest_url: str = "https://www.okx.com"
    okx_ping_after_s: Annotated[float, Field(gt=0, lt=30)] = 25.0
    okx_pong_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    okx_backoff_max_s: Annotated[float, Field(gt=0)] = 30.0

    # Candles (docs/candles.md).
    candle_lateness_ms: Annotated[int, Field(ge=0, le=3_600_000)] = 2_000
    candle_empty: Literal["flat", "skip"] = "flat"
    candle_late_policy: Literal["revise", "drop-to-late-topic-only"] = "revise"
    candle_live_every_ms: Annotated[int, Field(ge=100)] = 1_000
    # Archive every raw trade in PostgreSQL table `trades` (for research and exports): `tcp run`
    # and the demo run the archive dataflow (`tcp archive run`) beside the candle dataflow.
    archive_trades: bool = True

    # Bots (docs/bots.md): a running bot reports itself alive this often; the supervisor marks
    # it stale after `bot_stale_after_s` without a heartbeat, and restarts a failed bot at most
    # `bot_restart_max` times per `bot_restart_window_s`.
    bot_heartbeat_s: Annotated[float, Field(ge=0.1)] = 5.0
    bot_stale_after_s: Annotated[float, Field(gt=0)] = 30.0
    bot_restart_max: Annotated[int, Field(ge=0)] = 3
    bot_restart_window_s: Annotated[float, Field(gt=0)] = 3600.0

    # Bytewax recovery: snapshots of operator state and input offsets, one subdirectory per
    # dataflow (<dir>/candles, <dir>/archive, ...). Empty: <home>/recovery.
    recovery_dir: Path | None = None
    # The Parquet lake (backtest/lake.py: tcp export lake|topic, tcp sql). Empty: <home>/lake.
    lake_dir: Path | None = None
    snapshot_interval_s: Annotated[float, Field(gt=0)] = 5.0

    # The dashboard (bokeh_app/auth.py): anyone who reaches it may look; controls need a login
    # as dashboard_user / dashboard_password (no password: read-only). The cookie secret signs
    # the login cookie (empty: a random one per server start, so logins end with a restart).
    dashboard_user: str = "admin"
    dashboard_password: SecretStr | None = None
    dashboard_cookie_secret: SecretStr | None = None
    dashboard_candles: Annotated[int, Field(ge=100, le=100_000)] = 2000  # final candles a chart loads

    # Observability (tcp/observe.py): log lines as text or JSON; every service serves Prometheus
    # metrics on metrics_addr:metrics_port (0: a free port, announced in <home>/run/).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    metrics: bool = True
    metrics_addr: str = "127.0.0.1"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0

    @field_validator("instruments", "timeframes", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("timeframes")
    @classmethod
    def _check_timeframes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for tf in value:
            parse_timeframe(tf)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("TCP_CONFIG")
        return (init_settings, env_settings, _FileSource(settings_cls, Path(path) if path else None))

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Read the environment (and ``TCP_CONFIG``) once; the entry point calls this."""
        return cls(**overrides)

    def topic(self, name: str) -> str:
        """The full name of one of the platform's topics (``okx.trades`` ...)."""
        return f"{self.topic_prefix}{name}"

    def as_env(self) -> dict[str, str]:
        """Every field as a ``TCP_*`` variable (secrets included): what a child process needs to
        load exactly these settings (``tcp run`` starts the dataflows this way)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = str(value).lower()
            env[f"TCP_{name.upper()}"] = str(value)
        return env
