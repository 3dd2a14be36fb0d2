"""Versioned SQL migrations, applied in order at start-up and recorded in ``schema_migrations``.

Migrations are the plain ``NNNN_name.sql`` files beside this module. Each runs in its own
transaction; an advisory lock keeps two processes from applying the same one twice.
"""

from __future__ import annotations

import logging
from importlib import resources

import psycopg

__all__ = ["apply_migrations", "available_migrations"]

log = logging.getLogger(__name__)

_LOCK_ID = 0x7C9D_A5B0  # pg_advisory_lock key for "tcp migrations"


def available_migrations() -> list[tuple[str, str]]:
    """(version, sql) for every migration file, in order."""
    folder = resources.files("sinks") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


def apply_migrations(dsn: str) -> list[str]:
    """Apply the migrations not applied yet; returns their versions."""
    applied_now: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, sql in available_migrations():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql.encode())  # trusted files shipped with the package, no parameters
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied_now.append(version)
                log.info("applied migration %s", version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied_now
