"""tcp.services: configured services are used, missing ones started embedded, found again, stopped."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis
from pydantic import SecretStr

from tcp import services
from tcp.config import Settings
from tests.env_util import tcp_env


def _embedded_only(home: Path) -> Settings:
    """Settings that ignore whatever the environment configures: everything embedded in ``home``."""
    return Settings.load(home=home, kafka_bootstrap="", postgres_dsn="", redis_url="")


def test_embedded_services_start_are_found_again_and_stop(tmp_path: Path) -> None:
    settings = _embedded_only(tmp_path / "home")
    first = services.ensure(settings)
    try:
        second = services.ensure(settings)
        assert second.kafka_bootstrap == first.kafka_bootstrap
        assert second.postgres_dsn == first.postgres_dsn
        assert second.redis_url == first.redis_url
        rows = {row.service: row for row in services.status(settings)}
        assert all(row.up and row.mode == "embedded" and row.pid for row in rows.values()), rows

        with psycopg.connect(first.postgres_dsn.get_secret_value(), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (value text)")
            conn.execute("INSERT INTO kept VALUES (%s)", ("survives a restart",))
        client = redis.Redis.from_url(first.redis_url.get_secret_value())
        client.set("k", "v")
        client.close()
    finally:
        assert sorted(services.stop(settings)) == ["kafka", "postgres", "redis"]

    assert not any(row.up for row in services.status(settings))
    # PostgreSQL data lives in the state directory: a restart finds it again.
    again = services.ensure(settings, ("postgres",))
    try:
        with psycopg.connect(again.postgres_dsn.get_secret_value()) as conn:
            assert conn.execute("SELECT value FROM kept").fetchall() == [("survives a restart",)]
    finally:
        services.stop(settings)


def test_two_homes_are_independent(tmp_path: Path) -> None:
    one, two = _embedded_only(tmp_path / "one"), _embedded_only(tmp_path / "two")
    try:
        a = services.ensure(one, ("kafka", "redis"))
        b = services.ensure(two, ("kafka", "redis"))
        assert a.kafka_bootstrap != b.kafka_bootstrap
        assert a.redis_url != b.redis_url
        services.stop(one)
        assert {r.service: r.up for r in services.status(two)}["kafka"]
    finally:
        services.stop(one)
        services.stop(two)


def test_configured_services_are_used_and_nothing_is_started(
    services_settings: Settings, tmp_path: Path
) -> None:
    configured = Settings.load(
        home=tmp_path / "home",
        kafka_bootstrap=services_settings.kafka_bootstrap,
        postgres_dsn=services_settings.postgres_dsn,
        redis_url=services_settings.redis_url,
    )
    ready = services.ensure(configured)
    assert ready.kafka_bootstrap == services_settings.kafka_bootstrap
    assert ready.postgres_dsn == services_settings.postgres_dsn
    assert ready.redis_url == services_settings.redis_url
    assert not list((tmp_path / "home").glob("*/state.json"))
    assert {row.mode for row in services.status(configured)} == {"configured"}


def test_unreachable_kafka_fails_with_name_address_and_fix(tmp_path: Path) -> None:
    settings = Settings.load(home=tmp_path, kafka_bootstrap="127.0.0.1:1")
    with pytest.raises(services.ServiceError) as err:
        services.ensure(settings, ("kafka",))
    text = str(err.value)
    assert "Kafka" in text and "127.0.0.1:1" in text and "Fix:" in text and "TCP_KAFKA_BOOTSTRAP" in text


def test_unreachable_postgres_and_redis_fall_back_to_embedded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.load(
        home=tmp_path,
        kafka_bootstrap="",
        postgres_dsn=SecretStr("postgresql://app:secret@127.0.0.1:1/db"),
        redis_url=SecretStr("redis://127.0.0.1:1/0"),
    )
    with caplog.at_level(logging.WARNING, logger="tcp.services"):
        ready = services.ensure(settings, ("postgres", "redis"))
    try:
        assert ready.postgres_dsn.get_secret_value().startswith("postgresql://postgres@127.0.0.1:")
        assert ready.redis_url.get_secret_value() != "redis://127.0.0.1:1/0"
        warnings = " ".join(r.getMessage() for r in caplog.records)
        assert "not reachable" in warnings
        assert "secret" not in warnings  # the password is redacted
    finally:
        services.stop(settings)


def test_without_the_fallback_an_unreachable_database_is_an_error(tmp_path: Path) -> None:
    """Deployments (compose, Kubernetes) set TCP_EMBEDDED_FALLBACK=false: a configured PostgreSQL
    or Redis that does not answer stops the command with the address (password redacted) and
    the fix, instead of starting an embedded server that would take the writes."""
    for service, update in (
        ("postgres", {"postgres_dsn": SecretStr("postgresql://app:secret@127.0.0.1:1/db")}),
        ("redis", {"redis_url": SecretStr("redis://:secret@127.0.0.1:1/0")}),
    ):
        settings = Settings.load(home=tmp_path, kafka_bootstrap="", embedded_fallback=False, **update)
        with pytest.raises(services.ServiceError) as err:
            services.ensure(settings, (service,))  # type: ignore[arg-type]
        text = str(err.value)
        assert "127.0.0.1:1" in text and "TCP_EMBEDDED_FALLBACK=false" in text and "Fix:" in text
        assert "secret" not in text
        assert not (tmp_path / service).exists() or not any((tmp_path / service).iterdir())


def test_a_stable_port_lies_below_the_ephemeral_range_and_moves_only_when_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL and Redis keep their port across restarts: running clients keep their address.
    It is chosen below the ephemeral range, where no outgoing connection can take it while the
    service is stopped (the PostgreSQL outage drill restarts it under running dataflows)."""
    port = services._stable_port(tmp_path)
    assert 10_000 <= port < services._ephemeral_start()
    assert services._stable_port(tmp_path) == port
    with socket.socket() as squatter:  # something else took it while the service was stopped
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with caplog.at_level(logging.WARNING, logger="tcp.services"):
            moved = services._stable_port(tmp_path)
    assert (
        moved != port
        and f"port {port}, where the service of {tmp_path} listened before, is taken" in caplog.text
    )
    assert services._stable_port(tmp_path) == moved


def test_redact_hides_passwords() -> None:
    assert services.redact("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert services.redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_cli_services_up_status_down(tmp_path: Path) -> None:
    env = tcp_env(TCP_HOME=str(tmp_path / "cli-home"))
    tcp = [sys.executable, "-m", "tcp.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*tcp, *args], env=env, capture_output=True, text=True, timeout=120)

    assert run("services", "status").returncode == 1  # nothing running yet
    up = run("services", "up")
    assert up.returncode == 0, up.stderr
    assert "127.0.0.1" in up.stdout
    status = run("services", "status")
    assert status.returncode == 0, status.stdout
    assert status.stdout.count("embedded") == 3
    down = run("services", "down")
    assert "kafka" in down.stdout and "postgres" in down.stdout and "redis" in down.stdout
    assert run("services", "status").returncode == 1
