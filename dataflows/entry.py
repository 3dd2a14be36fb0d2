"""What every dataflow needs before it starts: its services, topics and tables.

``prepare`` is what `tcp candles|archive|bots run` call; ``flow_from_env`` is what the modules'
lazy ``flow`` attribute calls for ``python -m bytewax.run dataflows.<name>:flow``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bytewax.dataflow import Dataflow

from sinks.migrate import apply_migrations
from tcp import services
from tcp.config import Settings
from tcp.topics import ensure_topics

__all__ = ["flow_from_env", "prepare"]


def prepare(settings: Settings, needs: Sequence[services.Service] = ("kafka", "postgres")) -> Settings:
    """The services in ``needs`` up (configured or embedded), the topics made, the migrations
    applied; returns the settings with the services' addresses filled in."""
    settings = services.ensure(settings, tuple(needs))
    ensure_topics(settings)
    apply_migrations(settings.postgres_dsn.get_secret_value())
    return settings


def flow_from_env(
    build: Callable[[Settings], Dataflow], needs: Sequence[services.Service] = ("kafka", "postgres")
) -> Dataflow:
    """``build`` over the settings of the TCP_* environment, its services prepared."""
    return build(prepare(Settings.load(), needs))
