"""The bot supervisor: marks bots whose heartbeat is stale, restarts failed ones (rate-limited).

It reads the ``bots`` table (written by the bots dataflow), and acts through the same doors as a
user: ``stale`` is set in PostgreSQL (the next heartbeat of the bot clears it) and the Redis
status hash; a failed bot gets a ``start`` command from user ``supervisor`` on
``bots.commands``. The bot itself refuses more than ``bot_restart_max`` supervisor restarts per
``bot_restart_window_s`` (its state, recovered with the dataflow), and the supervisor does not
ask more often than that either.

    tcp bots supervise [--once]          (``tcp run`` runs it too)
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import psycopg

from bots.bot import SUPERVISOR
from bots.commands import make_command, send_commands
from bots.lifecycle import RestartPolicy
from sinks.redis import HashSet, RedisWriter, bot_status_key
from tcp.config import Settings

__all__ = ["Supervisor", "SupervisorReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisorReport:
    """What one pass did."""

    stale: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()
    held_back: tuple[str, ...] = ()  # failed, but restarted too often lately


@dataclass
class Supervisor:
    """One supervisor over the services of ``settings``; call :meth:`check` or :meth:`run`."""

    settings: Settings
    restarts: dict[str, list[int]] = field(default_factory=dict)  # bot -> restart times asked (ms)

    @property
    def policy(self) -> RestartPolicy:
        s = self.settings
        return RestartPolicy(s.bot_restart_max, int(s.bot_restart_window_s * 1000))

    def check(self, *, now_ms: int | None = None) -> SupervisorReport:
        """One pass: mark stale bots, restart failed ones. Returns what it did."""
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        stale_after = f"{self.settings.bot_stale_after_s} seconds"
        dsn = self.settings.postgres_dsn.get_secret_value()
        with psycopg.connect(dsn, autocommit=True) as conn:
            stale = [
                row[0]
                for row in conn.execute(
                    "UPDATE bots SET stale = true WHERE state = 'running' AND NOT stale "
                    "AND (last_heartbeat IS NULL OR last_heartbeat < to_timestamp(%s / 1000.0) - %s::interval) "
                    "RETURNING name",
                    (now, stale_after),
                ).fetchall()
            ]
            failed = [
                row[0] for row in conn.execute("SELECT name FROM bots WHERE state = 'failed' ORDER BY name")
            ]
        if stale:
            log.warning("bots without a heartbeat for %s: %s", stale_after, ", ".join(stale))
            self._mark_stale_in_redis(stale)
        restart, held = [], []
        policy = self.policy
        for name in failed:
            history = policy.recent(self.restarts.get(name, ()), now)
            if policy.allow(history, now):
                restart.append(name)
                self.restarts[name] = [*history, now]
            else:
                held.append(name)
                self.restarts[name] = history
        if restart:
            send_commands(self.settings, [make_command("start", name, user=SUPERVISOR) for name in restart])
            log.warning("restarting failed bots: %s", ", ".join(restart))
        return SupervisorReport(tuple(stale), tuple(restart), tuple(held))

    def _mark_stale_in_redis(self, names: list[str]) -> None:
        try:
            writer = RedisWriter(self.settings.redis_url.get_secret_value(), give_up_after_s=5)
            writer.write([HashSet(bot_status_key(name), {"stale": "True"}) for name in names])
            writer.close()
        except Exception as exc:  # Redis is a live view: PostgreSQL already has the fact
            log.warning("could not mark stale bots in Redis: %s", exc)

    def run(self, stop: threading.Event, *, every_s: float = 5.0) -> None:
        """Check every ``every_s`` seconds until ``stop`` is set; errors are logged, not fatal."""
        while not stop.is_set():
            try:
                self.check()
            except (psycopg.Error, RuntimeError) as exc:
                log.warning("supervisor pass failed (%s); trying again in %.0f s", exc, every_s)
            stop.wait(every_s)
