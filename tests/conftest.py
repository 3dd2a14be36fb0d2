"""Fixtures: real services, from the same module the CLI uses (tcp.services).

Whatever TCP_KAFKA_BOOTSTRAP / TCP_POSTGRES_DSN / TCP_REDIS_URL say is used; what is not
configured is started embedded in a throw-away state directory and stopped at the end.
Every test gets its own topic prefix, so tests never see each other's messages.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tcp import services
from tcp.config import Settings
from tcp.topics import ensure_topics


@pytest.fixture(scope="session")
def services_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    home = Path(os.environ.get("TCP_TEST_HOME") or tmp_path_factory.mktemp("tcp-home"))
    settings = services.ensure(Settings.load(home=home))
    yield settings
    services.stop(settings)


@pytest.fixture
def settings(services_settings: Settings) -> Settings:
    """Settings pointing at the live services, with this test's own topics (created)."""
    prefix = f"test-{uuid.uuid4().hex[:10]}."
    result = services_settings.model_copy(update={"topic_prefix": prefix})
    ensure_topics(result)
    return result


@pytest.fixture
def make_database(services_settings: Settings) -> Iterator[Callable[..., str]]:
    """Makes fresh PostgreSQL databases with the migrations applied (``migrated=False``: empty);
    returns their DSNs and drops them after the test."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    from sinks.migrate import apply_migrations

    base = services_settings.postgres_dsn.get_secret_value()
    names: list[str] = []

    def make(*, migrated: bool = True) -> str:
        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        names.append(name)
        dsn = make_conninfo(base, dbname=name)
        if migrated:
            apply_migrations(dsn)
        return dsn

    yield make
    with psycopg.connect(base, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database(make_database: Callable[[], str]) -> str:
    """A fresh PostgreSQL database with the migrations applied; its DSN. Dropped afterwards."""
    return make_database()
