"""The environment for a `tcp` subprocess: settings written back as TCP_* variables."""

from __future__ import annotations

import os

from tcp.config import Settings


def tcp_env(settings: Settings | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without its TCP_* variables, plus every field of ``settings``
    as TCP_* (so the subprocess sees exactly these settings), plus ``extra`` (e.g. TCP_HOME)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCP_")}
    if settings is not None:
        env.update(settings.as_env())
    env.update(extra)
    return env
