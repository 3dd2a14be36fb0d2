"""Sending bot commands: JSON on Kafka ``bots.commands``, keyed by bot name (one partition per
bot, so a bot's commands stay in order). The CLI, the supervisor and the dashboard use this.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping

from bots.config import BotConfig
from bots.lifecycle import Action, Command
from bots.lifecycle import encode as encode_command
from sinks.kafka import KafkaProducer
from tcp import topics
from tcp.config import Settings

__all__ = ["make_command", "send_commands"]


def make_command(
    action: Action,
    bot: str,
    *,
    config: BotConfig | None = None,
    params: Mapping[str, bool | int | float | str] | None = None,
    user: str | None = None,
) -> Command:
    """A command with a fresh unique id and the current time (``Command`` validates it)."""
    return Command(
        id=uuid.uuid4().hex,
        action=action,
        bot=bot,
        at=time.time_ns() // 1_000_000,
        user=user,
        config=config,
        params=dict(params) if params is not None else None,
    )


def send_commands(settings: Settings, commands: Iterable[Command], *, timeout_s: float = 30.0) -> int:
    """Produce ``commands`` and wait until every one is delivered; returns how many were sent.

    Raises ``RuntimeError`` naming the count when some could not be delivered in ``timeout_s``.
    """
    producer = KafkaProducer(settings.kafka_bootstrap, client_id="tcp-bots-commands")
    topic = settings.topic(topics.BOTS_COMMANDS)
    sent = 0
    for command in commands:
        producer.produce(topic, encode_command(command), command.bot.encode())
        sent += 1
    remaining = producer.flush(timeout_s)
    if remaining or producer.stats.failed:
        msg = f"{remaining + producer.stats.failed} of {sent} command(s) not delivered to {topic}"
        raise RuntimeError(msg)
    return sent
